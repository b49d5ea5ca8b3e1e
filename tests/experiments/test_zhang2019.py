"""NGD vs GD vs SGD (Zhang et al. 2019) on the tiny preset, and the claim behind it:
NGD's per-step contraction is (1 - eta) whatever lambda_min(H), GD's is not."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkexp.experiments.zhang2019 as zh
from conftest import needs_x64, run_tiny
from ntkexp import config as C
from ntkexp.cli import main
from ntkexp.experiments.du2019 import h_infinity
from ntkexp.models.two_layer import TwoLayerApply, TwoLayerSpec, init_two_layer
from ntkexp.optim import gd, ngd
from ntkexp.training import train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "zhang2019_ngd.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_tiny(tmp_path_factory, CONFIG, "zhang", allow_rank_promotion=True)


def test_tiny_run_outputs(tiny_run):
    d, s = tiny_run
    for f in ("config.yaml", "meta.json", "results.npz", "metrics.jsonl",
              "figures/zhang2019_ngd.png", "figures/zhang2019_ngd.pdf"):
        assert os.path.getsize(os.path.join(d, f)) > 0, f
    r = np.load(os.path.join(d, "results.npz"))
    assert r["loss_ngd"].shape == (2, 1, 1, 1, 9) and r["loss_gd"].shape == (2, 1, 1, 9)
    os.remove(os.path.join(d, "figures", "zhang2019_ngd.png"))
    assert main(["plot", d]) == 0
    assert os.path.exists(os.path.join(d, "figures", "zhang2019_ngd.png"))


def test_ngd_contraction_is_one_minus_eta_at_large_width(tiny_run):
    _, s = tiny_run
    wide = s["per_width"]["4096"]
    ngd_ = wide["ngd"]["0.5"]
    # Zhang et al. 2019, Thm 3: ||r(k+1)|| ~ (1 - eta) ||r(k)|| for wide nets (10% acceptance)
    assert ngd_["contraction"] == pytest.approx(0.5, rel=0.10)
    # NGD beats GD, and GD's rate is bounded by its smallest-eigenvalue rate
    assert ngd_["final_loss"] < wide["final_loss_gd"] < wide["initial_loss"]
    assert wide["final_loss_sgd"] < wide["initial_loss"]
    assert wide["gd_late_rate"] > ngd_["contraction"]


def _sphere(n, d, key, dtype, near_duplicate: float | None = None):
    x = jax.random.normal(key, (n, d), dtype)
    if near_duplicate is not None:  # point 1 a tiny rotation of point 0: lambda_min -> 0
        x = x.at[1].set(x[0] + near_duplicate * x[1])
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


@needs_x64
@pytest.mark.parametrize("dup", [None, 0.2], ids=["spread", "near_duplicate"])
def test_ngd_rate_ignores_lambda_min_gd_rate_follows_it(dup):
    """Two datasets whose lambda_min(H^inf) differ ~4x: NGD contracts by 1 - eta on both;
    GD's late-time contraction sits near 1 - eta lambda_min(H^inf) (Du et al. 2019)."""
    dtype = jnp.float64
    n, d, m, steps = 8, 8, 4096, 40
    x = _sphere(n, d, jax.random.key(0), dtype, dup)
    y = jax.random.normal(jax.random.key(1), (n, 1), dtype)
    lam = np.linalg.eigvalsh(np.asarray(h_infinity(x)))
    spec = TwoLayerSpec(width=m)
    f, p0 = TwoLayerApply(spec), init_two_layer(spec, d, jax.random.key(2), dtype)
    eta = 0.5
    r_ngd = train(f, p0, x, y, optimizer=ngd(eta), steps=3, loss_reduction="sum")
    c = zh.contraction(np.asarray(r_ngd.losses), 0, 3)
    assert c == pytest.approx(1 - eta, rel=0.05)
    lr = 1.0
    r_gd = train(f, p0, x, y, optimizer=gd(lr), steps=steps, loss_reduction="sum")
    late = zh.contraction(np.asarray(r_gd.losses), steps // 2, steps)
    # between the fastest and the slowest mode, and close to the slowest one
    assert 1 - lr * lam[-1] < late < 1.0
    assert late == pytest.approx(1 - lr * lam[0], abs=0.05)
    if dup is not None:
        assert lam[0] < 0.07 and late > 0.93  # GD crawls, NGD does not


@needs_x64
def test_ngd_needs_more_width_when_lambda_min_is_tiny():
    """Zhang et al.'s width requirement grows as lambda_min shrinks: with a near-duplicate
    pair (lambda_min(H^inf) ~ 0.012) NGD's contraction misses 1 - eta at m = 4096 and
    approaches it as m grows 8x."""
    dtype = jnp.float64
    x = _sphere(8, 8, jax.random.key(0), dtype, 0.05)
    y = jax.random.normal(jax.random.key(1), (8, 1), dtype)
    assert np.linalg.eigvalsh(np.asarray(h_infinity(x)))[0] < 0.02
    errs = []
    for m in (4096, 32768):
        spec = TwoLayerSpec(width=m)
        f, p0 = TwoLayerApply(spec), init_two_layer(spec, 8, jax.random.key(2), dtype)
        r = train(f, p0, x, y, optimizer=ngd(0.5), steps=3, loss_reduction="sum")
        errs.append(abs(zh.contraction(np.asarray(r.losses), 0, 3) - 0.5))
    assert errs[0] > 0.1 and errs[1] < errs[0] / 2


def test_contraction_of_a_geometric_sequence():
    loss = 3.0 * 0.7 ** (2 * np.arange(10))
    assert zh.contraction(loss, 0, 9) == pytest.approx(0.7, rel=1e-12)
    assert zh.contraction(loss, 4, 6) == pytest.approx(0.7, rel=1e-12)
    assert np.isnan(zh.contraction(np.zeros(3), 0, 2))


def test_config_errors():
    with pytest.raises(C.ConfigError, match="sgd_batch_size"):
        C.load(CONFIG, preset="tiny", overrides=["params.sgd_batch_size=100"])
    with pytest.raises(C.ConfigError, match="ngd_learning_rates"):
        C.load(CONFIG, preset="tiny", overrides=["params.ngd_learning_rates=[1.5]"])
