"""Lee et al. (2020) finite vs infinite: the pieces against independent truths, and the
tiny preset end to end. What the tiny run checks: NNGP/NTK kernel regression and the
widest centred NTK-parameterized net beat chance (10%) by more than 40 points; the wide
centred net's test accuracy is within 5 points of the NTK's (same steps), and its test
outputs approach the NTK-GP mean: the relative distance shrinks by > 2x from width 32
to 512 (theory: like width^-1/2)."""

import dataclasses
import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import ntkexp.experiments.lee2020 as L
from conftest import needs_x64, run_tiny
from ntkexp import config as C
from ntkexp.cli import main
from ntkexp.data import DataError
from ntkexp.models import ARCHITECTURES
from ntkexp.models.mlp import MLPSpec
from ntkexp.optim import gd
from ntkexp.training import train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "lee2020_finite_vs_infinite.yaml")


@pytest.fixture(autouse=True)
def _allow_bias_broadcast():
    # the MLP with biases adds (n, w) + (w,); the CLI runs with JAX's default promotion
    with jax.numpy_rank_promotion("allow"):
        yield


def _net(param, width, out_dim, dtype, seed=0, d=5):
    spec = MLPSpec(depth=1, width=width, activation="relu", W_std=1.4, b_std=0.1,
                   parameterization=param, out_dim=out_dim)
    return ARCHITECTURES.get("mlp").build(spec, d, jax.random.key(seed), dtype)


def _x(n, d, dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)), dtype)


@pytest.mark.parametrize("out_dim", [1, 3])
def test_power_iteration_matches_the_jacobian_eigenvalue(dtype, out_dim):
    apply_fn, params = _net("ntk", 16, out_dim, dtype)
    x = _x(6, 5, dtype)
    # truth: the full Jacobian of the flattened outputs, J J^T, eigvalsh in float64
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    J = jax.jacfwd(lambda v: apply_fn(unravel(v), x).reshape(-1))(flat)
    J = np.asarray(J, np.float64)
    truth = np.linalg.eigvalsh(J @ J.T)[-1]
    lam = float(L.ntk_lambda_max(apply_fn, params, x, jax.random.key(0), 200))
    assert lam == pytest.approx(truth, rel=1e-3 if dtype == jnp.float32 else 1e-6)


@needs_x64
def test_standard_parameterization_ntk_grows_with_width():
    # NTK param.: lambda_max(Theta_0) has a width-independent limit; standard param.: the
    # hidden-to-output gradients grow with width, so the step eta ~ 1/lambda must shrink
    x = _x(20, 5, jnp.float64)
    lam = {p: [float(L.ntk_lambda_max(*_net(p, w, 1, jnp.float64, seed=w), x,
                                      jax.random.key(0), 60)) for w in (64, 1024)]
           for p in ("ntk", "standard")}
    assert abs(lam["ntk"][1] / lam["ntk"][0] - 1) < 0.3
    assert lam["standard"][1] / lam["standard"][0] > 6  # 16x width, output layer dominates


def test_class_targets_zero_mean_one_hot():
    ids = np.array([0, 3, 9, 3, 5])
    ttr, tte, ltr, lte = L.class_targets(ids[:, None].astype(float), np.array([[1.0], [9.0]]))
    assert ttr.shape == (5, 10)
    np.testing.assert_allclose(ttr.sum(1), 0.0, atol=1e-12)
    np.testing.assert_allclose(ttr[np.arange(5), ids], 0.9)
    np.testing.assert_array_equal(ltr, ids)
    np.testing.assert_array_equal(lte, [1, 9])
    np.testing.assert_array_equal(np.argmax(ttr, 1), ids)
    with pytest.raises(DataError, match="class ids"):
        L.class_targets(np.array([[0.5], [1.0]]), np.zeros((0, 1)))


@needs_x64  # float64 inputs and float64 tolerances
def test_preprocess_standardize():
    rng = np.random.default_rng(0)
    xtr, xte = rng.uniform(size=(30, 8)), rng.uniform(size=(10, 8))
    a, b = L.preprocess(jnp.asarray(xtr), jnp.asarray(xte), "standardize")
    # rows of norm sqrt(d), built from the training mean (not the test mean)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(a), axis=1), np.sqrt(8), rtol=1e-10)
    c = xte[0] - xtr.mean(0)
    np.testing.assert_allclose(np.asarray(b[0]), c / np.linalg.norm(c) * np.sqrt(8), rtol=1e-10)


@dataclasses.dataclass(frozen=True)
class _Centred:
    """The centred model f(theta, x) - f(theta0, x), written out directly."""

    apply_fn: object

    def __call__(self, p, x):
        return self.apply_fn(p["theta"], x) - self.apply_fn(
            jax.lax.stop_gradient(p["theta0"]), x)

    @staticmethod
    def trainable_mask(p):
        return {"theta": True, "theta0": False}


def test_centred_training_equals_raw_training_on_shifted_targets(dtype, tol):
    apply_fn, params = _net("ntk", 32, 2, dtype)
    x = _x(12, 5, dtype)
    y = jnp.asarray(np.random.default_rng(3).normal(size=(12, 2)), dtype)
    opt = gd(0.5)
    direct = train(_Centred(apply_fn), {"theta": params, "theta0": params}, x, y,
                   optimizer=opt, steps=5)
    shifted = train(apply_fn, params, x, y + apply_fn(params, x), optimizer=opt, steps=5)
    np.testing.assert_allclose(np.asarray(direct.losses), np.asarray(shifted.losses),
                               rtol=100 * tol["exact"])
    for a, b in zip(jax.tree_util.tree_leaves(direct.params["theta"]),
                    jax.tree_util.tree_leaves(shifted.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=100 * tol["exact"],
                                   atol=100 * tol["exact"])


def test_config_errors():
    with pytest.raises(C.ConfigError, match="n_test"):
        C.load(CONFIG, preset="tiny", overrides=["data.n_test=0"])
    with pytest.raises(C.ConfigError, match="parameterizations"):
        C.load(CONFIG, preset="tiny", overrides=["params.parameterizations=[mup]"])


# --------------------------------------------------------------------------
# The tiny preset end to end
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return run_tiny(tmp_path_factory, CONFIG, "lee", allow_rank_promotion=True)


def test_tiny_kernels_and_wide_net_beat_chance_and_agree(tiny):
    _, s = tiny
    chance = s["chance"]
    assert chance == pytest.approx(0.1)
    for name in ("NNGP", "NTK", "NTK, t = T"):
        assert s["kernels"][name] > chance + 0.4, name
    wide = s["per_width"]["512"]["ntk+C"]
    assert wide["single"] > chance + 0.4 and wide["ensemble"] > chance + 0.4
    assert abs(wide["single"] - s["kernels"]["NTK, t = T"]) <= 0.05
    narrow = s["per_width"]["32"]["ntk+C"]
    assert wide["rel_dist_to_ntk_t_single"] < narrow["rel_dist_to_ntk_t_single"] / 2
    # the centred net is closer to the kernel than the raw one (f0 noise at test points)
    assert wide["rel_dist_to_ntk_t_single"] < s["per_width"]["512"]["ntk"][
        "rel_dist_to_ntk_t_single"]


def test_tiny_table_and_outputs(tiny):
    d, s = tiny
    models = {(r["model"], r["width"]) for r in s["table"]}
    assert {("MLP ntk", 32), ("MLP ntk+C", 512), ("NNGP", "inf"), ("NTK", "inf")} <= models
    assert s["table_markdown"].count("\n") == 4  # header, rule, 2 widths, kernels
    r = dict(np.load(os.path.join(d, "results.npz")))
    assert r["test_out"].shape == (2, 1, 2, 2, 150, 10)
    # stored accuracies are those of the stored outputs
    acc = (np.argmax(r["test_out"], -1) == r["limit_labels"]).mean(-1)
    np.testing.assert_allclose(acc, r["test_acc"])
    png = os.path.join(d, "figures", f"{L.NAME}.png")
    os.remove(png)
    assert main(["plot", d]) == 0 and os.path.getsize(png) > 0
