"""Tiled kernels equal untiled ones (float64, 1e-12), resume after interruption, errors.

The truth is the same kernel computed in one call (``ARCHITECTURES[arch].analytic``,
``empirical_ntk``), an independent code path: it never goes through the tiles.
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_x64
from ntkexp.empirical import empirical_ntk
from ntkexp.kernels.tiling import (
    TilingError,
    parse_bytes,
    plan_tiles,
    tiled_kernel,
)
from ntkexp.models import ARCHITECTURES, MLPApply, MLPSpec, init_params
from ntkexp.models.cnn import CNNSpec
from ntkexp.tiles import MonteCarloTiles, analytic_tiles, empirical_tiles

MLP = MLPSpec(depth=2, width=1, activation="relu", W_std=1.3, b_std=0.2)
CNN = CNNSpec(depth=2, width=1, filter_size=3, activation="relu", W_std=1.4, b_std=0.1,
              readout="gap")
TOL = {jnp.float32: 2e-6, jnp.float64: 1e-12}


def _x(n, d, seed, dtype=np.float64):
    return np.random.RandomState(seed).randn(n, d).astype(dtype)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _check(tiled, ref, tol, sym):
    for name in ("nngp", "ntk"):
        t, r = getattr(tiled, name), getattr(ref, name)
        assert t.shape == r.shape
        assert _rel(t, r) < tol, name
        if sym:
            assert np.array_equal(t, t.T), f"{name} not exactly symmetric"


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "cross"])
def test_tiled_mlp_equals_untiled(dtype, sym):
    x1 = _x(37, 5, 0, dtype)
    x2 = None if sym else _x(22, 5, 1, dtype)
    fn = analytic_tiles(MLP)
    assert fn.arch == "mlp"
    k = tiled_kernel(fn, x1, x2, tile_size=8, quiet=True)  # ragged last tiles
    ref = ARCHITECTURES.get("mlp").analytic(MLP, jnp.asarray(x1),
                                            None if sym else jnp.asarray(x2))
    assert k.ntk.dtype == np.dtype(dtype)
    _check(k, ref, TOL[dtype], sym)


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "cross"])
@needs_x64  # float64 truth at float64 tolerances
def test_tiled_cnn_gap_equals_untiled(sym):
    x1 = _x(11, 8, 2)
    x2 = None if sym else _x(6, 8, 3)
    k = tiled_kernel(analytic_tiles(CNN), x1, x2, tile_size=4, quiet=True)
    ref = ARCHITECTURES.get("cnn").analytic(CNN, jnp.asarray(x1),
                                            None if sym else jnp.asarray(x2))
    _check(k, ref, 1e-12, sym)


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "cross"])
@needs_x64  # float64 truth at float64 tolerances
def test_tiled_empirical_ntk_equals_untiled(sym):
    spec = MLPSpec(depth=2, width=16, activation="tanh", W_std=1.2, b_std=0.3, out_dim=2)
    params = init_params(spec, 4, jax.random.key(0), jnp.float64)
    apply_fn = MLPApply(spec)
    x1 = _x(19, 4, 4)
    x2 = None if sym else _x(9, 4, 5)
    k = tiled_kernel(empirical_tiles(apply_fn), x1, x2, args=(params,), tile_size=5, quiet=True)
    ref = empirical_ntk(apply_fn, params, jnp.asarray(x1), None if sym else jnp.asarray(x2))
    assert _rel(k, ref) < 1e-12
    if sym:
        assert np.array_equal(k, k.T)


@pytest.mark.slow  # compile-bound (~20 s); the same row-separability as the empirical NTK
def test_tiled_monte_carlo_equals_untiled():
    from ntkexp.empirical import monte_carlo_kernel

    x = _x(10, 3, 6)
    key = jax.random.key(3)
    fn = MonteCarloTiles(MLP, n_samples=2, width=4)
    k = tiled_kernel(fn, x, args=(key,), tile_size=6, quiet=True)
    ref = monte_carlo_kernel(MLP, jnp.asarray(x), key=key, n_samples=2, width=4)
    _check(k, ref, 1e-12, True)


def test_budget_picks_largest_tile_that_fits():
    x = _x(64, 8, 7)
    fn = analytic_tiles(CNN)
    plan = plan_tiles(fn, x, memory_budget="8MiB")
    assert 1 <= plan.tile < 64
    assert plan.tile_bytes + plan.result_bytes <= plan.budget
    bigger = plan_tiles(fn, x, memory_budget="8MiB", stream=True)
    assert bigger.tile >= plan.tile and bigger.result_bytes == 0
    with pytest.raises(TilingError, match="tile_size"):
        plan_tiles(fn, x, memory_budget="8MiB", tile_size=plan.tile + 8)


@needs_x64  # float64 truth at float64 tolerances
def test_budget_too_small_is_one_clear_error():
    x = _x(20, 8, 8)
    with pytest.raises(TilingError, match="memory_budget .* too small for one 1 x 1 tile"):
        tiled_kernel(analytic_tiles(CNN), x, memory_budget=1000, quiet=True)
    # the result alone does not fit: the message points at streaming
    with pytest.raises(TilingError, match="out="):
        tiled_kernel(analytic_tiles(MLP), _x(400, 3, 9), memory_budget="2MiB", quiet=True)


@pytest.mark.parametrize("bad", ["lots", -1, 0, True, "2 parsecs"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        parse_bytes(bad)


def test_parse_bytes_units():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512 MB") == 512 * 10**6
    assert parse_bytes(1e9) == 10**9


class _Stop(Exception):
    pass


def _stop_after(k):
    def cb(done, total):
        if done == k:
            raise _Stop

    return cb


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@needs_x64  # float64 truth at float64 tolerances
def test_resume_recomputes_only_unfinished_tiles(tmp_path):
    x = _x(30, 4, 10)
    fn = analytic_tiles(MLP)
    out = str(tmp_path / "k.npy")
    total = len(plan_tiles(fn, x, tile_size=7, stream=True).tiles)  # 5 x 5 grid: 15 upper
    assert total == 15
    with pytest.raises(_Stop):
        tiled_kernel(fn, x, tile_size=7, out=out, quiet=True, on_tile=_stop_after(6))
    with open(out + ".manifest.json") as f:
        assert len(json.load(f)["done"]) == 6
    seen = []
    k = tiled_kernel(fn, x, memory_budget="1GiB", out=out, quiet=True,
                     on_tile=lambda d, t: seen.append(t))
    assert seen and set(seen) == {total - 6}  # only the 9 unfinished tiles, on the old grid
    ref = ARCHITECTURES.get("mlp").analytic(MLP, jnp.asarray(x))
    _check(k, ref, 1e-12, True)
    # a finished file is reused as is
    again = []
    k2 = tiled_kernel(fn, x, tile_size=7, out=out, quiet=True,
                      on_tile=lambda d, t: again.append(d))
    assert again == [] and np.array_equal(k2.ntk, k.ntk)


def test_foreign_kernel_file_is_one_error_and_left_intact(tmp_path):
    x = _x(12, 4, 11)
    fn = analytic_tiles(MLP)
    out = str(tmp_path / "k.npy")
    with pytest.raises(_Stop):
        tiled_kernel(fn, x, tile_size=4, out=out, quiet=True, on_tile=_stop_after(2))
    before = (_sha(out), _sha(out + ".manifest.json"))
    for other_fn, other_x in ((fn, _x(12, 4, 12)),
                              (analytic_tiles(MLP.replace(depth=3)), x)):
        with pytest.raises(TilingError, match="another config or other inputs"):
            tiled_kernel(other_fn, other_x, tile_size=4, out=out, quiet=True)
    assert (_sha(out), _sha(out + ".manifest.json")) == before
    # the interrupted computation still resumes from its 2 tiles
    seen = []
    tiled_kernel(fn, x, tile_size=4, out=out, quiet=True, on_tile=lambda d, t: seen.append(t))
    assert set(seen) == {6 - 2}


def test_npy_without_manifest_is_refused(tmp_path):
    out = str(tmp_path / "k.npy")
    np.save(out, np.zeros((2, 5, 5)))
    before = _sha(out)
    with pytest.raises(TilingError, match="no ntkexp manifest"):
        tiled_kernel(analytic_tiles(MLP), _x(5, 2, 0), out=out, quiet=True)
    assert _sha(out) == before


@needs_x64  # float64 truth at float64 tolerances
def test_processes_split_tiles_round_robin(tmp_path):
    """Two (simulated) processes: each computes tiles g % 2 == its index; the second
    to finish sees the whole kernel."""
    x1, x2 = _x(17, 3, 13), _x(10, 3, 14)
    fn = analytic_tiles(MLP)
    out = str(tmp_path / "k.npy")
    counts = []
    r0 = tiled_kernel(fn, x1, x2, tile_size=4, out=out, processes=(0, 2), quiet=True,
                      on_tile=lambda d, t: counts.append(t))
    assert r0 is None  # process 1's tiles are missing
    r1 = tiled_kernel(fn, x1, x2, tile_size=4, out=out, processes=(1, 2), quiet=True,
                      on_tile=lambda d, t: counts.append(t))
    assert sorted(set(counts)) == [7, 8]  # 15 tiles: 8 for process 0, 7 for process 1
    ref = ARCHITECTURES.get("mlp").analytic(MLP, jnp.asarray(x1), jnp.asarray(x2))
    _check(r1, ref, 1e-12, False)
    assert os.path.exists(out + ".manifest.p0.json") and os.path.exists(out + ".manifest.p1.json")


SHARD_SCRIPT = r"""
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from ntkexp.kernels.tiling import tiled_kernel
from ntkexp.tiles import analytic_tiles
from ntkexp.models import ARCHITECTURES, MLPSpec
assert len(jax.devices()) == 4
spec = MLPSpec(depth=2, width=1, activation="relu", W_std=1.3, b_std=0.2)
x = np.random.RandomState(0).randn(29, 5)
k = tiled_kernel(analytic_tiles(spec), x, tile_size=6, devices="all", quiet=True)
ref = ARCHITECTURES.get("mlp").analytic(spec, x)
err = max(float(np.max(np.abs(np.asarray(getattr(k, n)) - np.asarray(getattr(ref, n)))))
          for n in ("nngp", "ntk"))
print("ERR", err, bool(np.array_equal(k.ntk, k.ntk.T)))
"""


def test_tiles_sharded_over_four_devices_equal_untiled(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERR")][0].split()
    assert float(line[1]) < 1e-12 and line[2] == "True"
