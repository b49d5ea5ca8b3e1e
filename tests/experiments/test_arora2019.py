"""Arora et al. (2019) fine-grained analysis: the pieces against independent truths, and
the tiny preset end to end (acceptance: the GD loss stays within 2% of the initial loss
of the (I - eta H)^k prediction at every step at the widest width; random labels train
slower than true labels)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkexp.experiments.arora2019 as A
from conftest import needs_x64, run_tiny
from ntkexp import config as C
from ntkexp.cli import main
from ntkexp.data import DataError
from ntkexp.empirical import empirical_ntk

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "arora2019_finegrained.yaml")


def _sphere(n, d, dtype, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype)


# --------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------


def test_binary_labels_from_onehot_ids_and_signs():
    ids = np.array([0, 3, 4, 7, 9, 2])
    onehot = np.full((6, 10), -0.1)
    onehot[np.arange(6), ids] = 0.9
    even = np.where(ids % 2 == 0, 1.0, -1.0)
    np.testing.assert_array_equal(A.binary_labels(onehot, (0, 2, 4, 6, 8)), even)
    np.testing.assert_array_equal(A.binary_labels(ids[:, None], (0, 2, 4, 6, 8)), even)
    # digits with a class subset: column j is data.classes[j]
    cfg = C.DataConfig(name="digits", dim=64, classes=(3, 8))
    two = np.array([[0.9, -0.1], [-0.1, 0.9]])
    np.testing.assert_array_equal(A.binary_labels(two, (8,), cfg), [-1.0, 1.0])
    # +-1 labels pass through untouched
    pm = np.array([[1.0], [-1.0], [-1.0]])
    np.testing.assert_array_equal(A.binary_labels(pm, (0,)), [1.0, -1.0, -1.0])
    with pytest.raises(DataError, match="class ids"):
        A.binary_labels(np.array([[0.3], [1.2]]), (0,))


def test_randomized_labels_are_nested_and_of_the_right_size():
    n = 400
    y = np.where(np.arange(n) % 3 == 0, 1.0, -1.0)
    fr = (0.0, 0.3, 0.6, 1.0)
    out = A.randomized_labels(y, fr, jax.random.key(5))
    assert out.shape == (4, n) and set(np.unique(out)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(out[0], y)
    changed = out != y[None, :]
    # a replaced label keeps its sign with probability 1/2: changes <= round(p n)
    for i, p in enumerate(fr):
        assert changed[i].sum() <= round(p * n)
    # nested: whatever changed at a smaller fraction is changed identically later
    for i in range(1, 4):
        prev = changed[i - 1]
        np.testing.assert_array_equal(out[i][prev], out[i - 1][prev])
    # fully random labels agree with the truth about half the time (binomial, 4 sd)
    agree = np.mean(out[-1] == y)
    assert abs(agree - 0.5) < 4 * 0.5 / np.sqrt(n)


# --------------------------------------------------------------------------
# Gram matrices and the symmetric initialisation
# --------------------------------------------------------------------------


def test_gram_at_is_the_empirical_ntk_of_the_two_layer_net(dtype, tol):
    cfg = C.resolve({"experiment": A.NAME, "model": {"arch": "two_layer_relu", "width": 64},
                     "params": {"init": "standard"}})
    x = _sphere(7, 5, dtype)
    apply_fn, params = A.init_params(cfg, 64, 5, jax.random.key(1), dtype)
    K = empirical_ntk(apply_fn, params, x, method="jacobian")
    H = A.gram_at(params["W"], x)
    np.testing.assert_allclose(np.asarray(H), np.asarray(K), rtol=50 * tol["exact"],
                               atol=50 * tol["exact"])


@needs_x64
def test_gram_at_converges_to_h_inf_at_rate_sqrt_m():
    x = _sphere(12, 6, jnp.float64, seed=2)
    Hinf = np.asarray(A.gram_inf(x))
    # the closed form on the diagonal: x.x (pi - 0) / 2pi = 1/2 for unit inputs (arccos
    # of a cosine 1 - 1e-16 costs about half the digits, hence 1e-7)
    np.testing.assert_allclose(np.diag(Hinf), 0.5, rtol=1e-7)
    errs = []
    for m in (256, 16384):
        e = [np.abs(np.asarray(A.gram_at(jax.random.normal(jax.random.key(s), (6, m),
                                                           jnp.float64), x)) - Hinf).max()
             for s in range(4)]
        errs.append(np.mean(e))
    # Monte Carlo error ~ m^-1/2: a factor 8 expected over a factor 64 in m; demand 4
    assert errs[1] < errs[0] / 4


def test_symmetric_init_has_zero_output_and_paired_units(dtype):
    cfg = C.resolve({"experiment": A.NAME, "model": {"arch": "two_layer_relu", "width": 40},
                     "params": {"kappa": 0.7}})
    apply_fn, params = A.init_params(cfg, 40, 9, jax.random.key(3), dtype)
    x = _sphere(11, 9, dtype)
    # the pairs cancel up to rounding of the sum over units (a standard init gives O(1))
    eps = float(jnp.finfo(dtype).eps)
    assert np.abs(np.asarray(apply_fn(params, x))).max() < 100 * eps
    W, a = np.asarray(params["W"]), np.asarray(params["a"])
    np.testing.assert_array_equal(W[:, :20], W[:, 20:])
    np.testing.assert_array_equal(a[:20], -a[20:])
    # 180 independent N(0, 0.7^2) draws: the sample sd has standard error 0.7 / sqrt(360);
    # allow 4 of them (was 0.25, about 7)
    assert params["W"].dtype == dtype and abs(W.std() - 0.7) < 4 * 0.7 / np.sqrt(2 * 180)


def test_config_errors_are_one_line():
    with pytest.raises(C.ConfigError, match="even"):
        C.load(CONFIG, preset="tiny", overrides=["model.width=[51, 2000]"])
    with pytest.raises(C.ConfigError, match="two_layer_relu"):
        C.load(CONFIG, preset="tiny", overrides=["model.arch=mlp"])
    with pytest.raises(C.ConfigError, match="random_fractions"):
        C.load(CONFIG, preset="tiny", overrides=["params.random_fractions=[0.0, 1.5]"])


# --------------------------------------------------------------------------
# The tiny preset end to end
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d, s = run_tiny(tmp_path_factory, CONFIG, "arora")
    r = dict(np.load(os.path.join(d, "results.npz")))
    return d, s, r


def test_tiny_loss_tracks_the_theorem_4_1_prediction(tiny):
    _, s, r = tiny
    # acceptance: within 2% of the prediction's initial loss at every step, widest width
    assert s["widest"]["max_rel_dev_true"] < 0.02
    # recompute from the raw curves (true labels = fraction 0), independently of summarize
    wi = int(np.argmax(r["widths"]))
    loss, pred = r["loss"][wi, 0, 0, 0], r["pred"][wi, 0, 0, 0]
    assert np.max(np.abs(loss - pred)) / pred[0] < 0.02
    # step 0: both are 1/2 ||y - u0||^2 = n/2 (u0 = 0, +-1 labels)
    n = s["n_train"]
    np.testing.assert_allclose([loss[0], pred[0]], n / 2, rtol=1e-5)
    # the prediction itself is the spectral formula 1/2 sum (1 - eta l_i)^2k (v_i.y)^2
    lam, proj, eta = r["limit_eigvals"], r["limit_proj_true"], float(r["limit_eta"])
    k = loss.shape[0] - 1
    spectral = 0.5 * np.sum((1 - eta * lam) ** (2 * k) * proj)
    np.testing.assert_allclose(r["limit_pred0"][0, 0, -1], spectral, rtol=1e-3)
    # the narrow net is further from the prediction than the wide one
    assert s["per_width"]["50"]["max_rel_dev_true"] > s["widest"]["max_rel_dev_true"]


def test_tiny_random_labels_train_slower_and_spread_over_the_spectrum(tiny):
    _, s, r = tiny
    assert s["random_trains_slower"]
    for pw in s["per_width"].values():
        assert pw["final_loss_ratio_random"] > 1.5 * pw["final_loss_ratio_true"]
    share = s["top_eigvec_share"]
    assert share["true"] > 3 * share["random"]
    # projections add up to ||y||^2 = n (V orthogonal): an independent check of the basis
    np.testing.assert_allclose(r["limit_proj_true"].sum(), s["n_train"], rtol=1e-4)
    np.testing.assert_allclose(r["limit_proj_random"].sum(-1), s["n_train"], rtol=1e-4)


def test_tiny_bound_and_test_error_rise_with_label_noise(tiny):
    _, s, _ = tiny
    b = s["bound"]
    assert b[0] < b[-1]
    err = s["widest"]["test_error"]
    assert err[0] < err[-1] and err[0] < 0.3  # even/odd from 60 digits: well above chance
    assert s["kernel_test_error"][0] < s["kernel_test_error"][-1]


def test_tiny_outputs_and_redraw(tiny):
    d, _, _ = tiny
    png = os.path.join(d, "figures", f"{A.NAME}.png")
    assert os.path.getsize(png) > 0
    os.remove(png)
    assert main(["plot", d]) == 0 and os.path.getsize(png) > 0
    rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    assert len(rows) == 2 * 1 * 3  # widths x inits x fractions
