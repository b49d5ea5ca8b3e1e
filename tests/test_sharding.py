"""Sharded equals unsharded on 4 forced host devices (float64, 1e-10), and the helpers' errors.

The multi-device checks run in a subprocess, because
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` only takes effect if it
is set before jax is imported (this test process already imported jax).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import X64, rel_err
from ntkexp.models.analytic import analytic_kernel
from ntkexp.models.mlp import MLPSpec
from ntkexp.sharding import (
    DistributedConfig,
    make_mesh,
    maybe_init_distributed,
    shard_ensemble,
    sharded_kernel,
    sharded_vmap,
)

SCRIPT = r"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
from ntkexp.empirical import empirical_ntk
from ntkexp.models.analytic import analytic_kernel
from ntkexp.models.cnn import cnn_kernel
from ntkexp.models.cnn import CNNSpec
from ntkexp.models.mlp import MLPApply, MLPSpec, init_params
from ntkexp.sharding import shard_ensemble, sharded_kernel, sharded_vmap

SLOW = sys.argv[1] == "slow"
res = {"n_devices": len(jax.devices())}


def md(a, b):
    # max |a - b| / max |b| over the leaves of two pytrees
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / np.abs(np.asarray(v)).max())
               for u, v in pairs)


x = jax.random.normal(jax.random.key(0), (10, 5), jnp.float64)
x2 = jax.random.normal(jax.random.key(1), (7, 5), jnp.float64)
spec = MLPSpec(depth=3, width=64, W_std=1.4, b_std=0.1)
app = MLPApply(spec)
f = lambda a, b: analytic_kernel(spec, a, b)
res["analytic_cross"] = md(sharded_kernel(f, x, x2), analytic_kernel(spec, x, x2))
ks = sharded_kernel(f, x)
res["analytic_sym"] = md(ks, analytic_kernel(spec, x))
res["analytic_sym_exact"] = bool(np.array_equal(np.asarray(ks.ntk), np.asarray(ks.ntk).T))
res["analytic_sharded_on"] = len(ks.ntk.sharding.device_set)
if SLOW:
    res["analytic_blocked"] = md(sharded_kernel(f, x, x2, block_size=2),
                                 analytic_kernel(spec, x, x2))
    cs = CNNSpec(depth=2, width=1, image_shape=(4, 4), readout="gap", W_std=1.4, b_std=0.1)
    xi = jax.random.normal(jax.random.key(2), (6, 4, 4, 2), jnp.float64)
    # row blocks pair each block with all of xi (x2 given), so the unsharded truth is the
    # same (xi, xi) call; cnn_kernel(cs, xi) treats self-pairs at exact angle 0 instead
    res["cntk_gap"] = md(sharded_kernel(lambda a, b: cnn_kernel(cs, a, b), xi),
                         cnn_kernel(cs, xi, xi))
    params = init_params(spec, 5, jax.random.key(3), jnp.float64)
    emp = lambda a, b, p: empirical_ntk(app, p, a, b, method="jacobian")
    res["empirical"] = md(sharded_kernel(emp, x, x2, args=(params,)), emp(x, x2, params))

# ensemble: 4 inits, 25 full-batch GD steps (lax.scan), vmapped over inits
keys = jax.random.split(jax.random.key(4), 4)
stack = jax.vmap(lambda k: init_params(spec, 5, k, jnp.float64))(keys)
y = jnp.sin(x[:, 0])


def train(p, x, y):
    def loss(p):
        return 0.5 * jnp.mean((app(p, x)[:, 0] - y) ** 2)

    def step(p, _):
        val, g = jax.value_and_grad(loss)(p)
        return jax.tree_util.tree_map(lambda a, b: a - 0.5 * b, p, g), val

    return jax.lax.scan(step, p, None, length=25)


vtrain = jax.jit(jax.vmap(train, in_axes=(0, None, None)))
ref = vtrain(stack, x, y)
sh = shard_ensemble(stack)
res["ensemble_placed_on"] = len(jax.tree_util.tree_leaves(sh)[0].sharding.device_set)
out = vtrain(sh, x, y)
res["ensemble_gspmd"] = md(out, ref)
res["ensemble_out_on"] = len(out[1].sharding.device_set)
res["ensemble_shard_map"] = md(sharded_vmap(train)(stack, x, y), ref)
res["loss_decreased"] = bool(np.all(np.asarray(ref[1][:, -1]) < np.asarray(ref[1][:, 0])))
if SLOW:
    stack3 = jax.tree_util.tree_map(lambda a: a[:3], stack)
    res["ensemble_shard_map_uneven"] = md(sharded_vmap(train)(stack3, x, y),
                                          vtrain(stack3, x, y))
    # the library's own training loop (ntkexp.training.train, ensemble=True)
    from ntkexp.optim import gd
    from ntkexp.training import train as nx_train

    r_ref = nx_train(app, stack, x, y, optimizer=gd(0.5), steps=25, ensemble=True)
    r_sh = nx_train(app, shard_ensemble(stack), x, y, optimizer=gd(0.5), steps=25,
                    ensemble=True)
    res["train_losses"] = md(r_sh.losses, r_ref.losses)
    res["train_params"] = md(r_sh.params, r_ref.params)
    res["train_params_on"] = len(jax.tree_util.tree_leaves(r_sh.params)[0].sharding.device_set)
print("RESULT " + json.dumps(res))
"""

TOL = 1e-10


def _run(tmp_path_factory, mode):
    if not X64:
        # the script turns x64 on itself, so it computes the same in both modes:
        # run it once, in the x64 run of the suite
        pytest.skip("the 4-device script always runs in float64; checked with JAX_ENABLE_X64=1")
    path = tmp_path_factory.mktemp("sharding") / "check.py"
    path.write_text(SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(path), mode], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """MLP analytic kernel and a vmapped GD ensemble on 4 devices (about 8 s of CPU)."""
    return _run(tmp_path_factory, "fast")


@pytest.fixture(scope="module")
def four_devices_all(tmp_path_factory):
    """Everything: + blocked rows, CNTK-GAP, empirical NTK, uneven ensemble, train()."""
    return _run(tmp_path_factory, "slow")


def test_four_devices_present(four_devices):
    assert four_devices["n_devices"] == 4


@pytest.mark.parametrize("key", ["analytic_cross", "analytic_sym"])
def test_sharded_kernels_equal_unsharded(four_devices, key):
    """Analytic MLP kernel, cross and symmetric (x2=None)."""
    assert four_devices[key] < TOL


@pytest.mark.slow
@pytest.mark.parametrize("key", ["analytic_cross", "analytic_sym", "analytic_blocked", "cntk_gap",
                                 "empirical", "ensemble_gspmd", "ensemble_shard_map",
                                 "ensemble_shard_map_uneven", "train_losses", "train_params"])
def test_all_sharded_equal_unsharded(four_devices_all, key):
    """Also row blocks, CNTK-GAP, the empirical NTK, a 3-member ensemble on 4 devices
    (padding) and ntkexp.training.train(ensemble=True) on sharded initialisations."""
    assert four_devices_all["loss_decreased"]
    assert four_devices_all[key] < TOL
    assert four_devices_all["train_params_on"] == 4


def test_sharded_kernel_is_spread_and_symmetric(four_devices):
    assert four_devices["analytic_sharded_on"] == 4
    assert four_devices["analytic_sym_exact"]


@pytest.mark.parametrize("key", ["ensemble_gspmd", "ensemble_shard_map"])
def test_sharded_training_equals_unsharded(four_devices, key):
    """vmapped GD (lax.scan) over 4 inits: placed by shard_ensemble, and by sharded_vmap."""
    assert four_devices["loss_decreased"]
    assert four_devices[key] < TOL


def test_ensemble_runs_on_all_devices(four_devices):
    assert four_devices["ensemble_placed_on"] == 4
    assert four_devices["ensemble_out_on"] == 4


# ---------------------------------------------------------------- in process (1 device)


def test_single_device_mesh_matches(dtype, tol):
    x = jax.random.normal(jax.random.key(0), (5, 3), dtype)
    spec = MLPSpec(depth=2, width=8, b_std=0.1)
    k = sharded_kernel(lambda a, b: analytic_kernel(spec, a, b), x, mesh=make_mesh(1),
                       block_size=2)
    ref = analytic_kernel(spec, x)
    assert k.ntk.dtype == dtype and k.ntk.shape == (5, 5)
    assert rel_err(k.ntk, ref.ntk) < tol["agree"]
    out = sharded_vmap(lambda p, s: jnp.sum(p["w"]) * s)({"w": jnp.ones((3, 2), dtype)},
                                                          jnp.asarray(2.0, dtype))
    np.testing.assert_allclose(np.asarray(out), [4.0, 4.0, 4.0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="devices"):
        make_mesh(len(jax.devices()) + 1)
    with pytest.raises(TypeError, match="callable"):
        sharded_kernel(3, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="block_size"):
        sharded_kernel(lambda a, b: a @ b.T, jnp.ones((2, 2)), block_size=0)
    with pytest.raises(ValueError, match="leading"):
        shard_ensemble({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))})
    with pytest.raises(TypeError, match="Mesh"):
        shard_ensemble({"a": jnp.ones((3, 2))}, mesh="cpu")


def test_maybe_init_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert maybe_init_distributed(None) is False
    assert maybe_init_distributed({"distributed": {"enabled": False}}) is False
    assert calls == []
    assert maybe_init_distributed(True) is True
    assert calls[-1] == {}
    cfg = {"enabled": True, "coordinator_address": "10.0.0.1:1234", "num_processes": 2,
           "process_id": 1, "local_device_ids": [0, 1]}
    assert maybe_init_distributed(cfg) is True
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                         "process_id": 1, "local_device_ids": [0, 1]}

    class Run:
        distributed = DistributedConfig(enabled=True, num_processes=1, process_id=0)

    assert maybe_init_distributed(Run()) is True
    assert calls[-1] == {"num_processes": 1, "process_id": 0}
    with pytest.raises(ValueError, match="unknown distributed"):
        maybe_init_distributed({"enabled": True, "coordinater": "x"})
    with pytest.raises(ValueError, match="num_processes"):
        maybe_init_distributed({"enabled": True, "num_processes": -1})
    with pytest.raises(TypeError, match="maybe_init_distributed"):
        maybe_init_distributed(3.5)
