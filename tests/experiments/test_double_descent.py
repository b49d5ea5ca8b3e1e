"""double_descent: the min-norm / ridge readout against numpy's least squares, the
random features against the model they freeze and against their NNGP limit, and the
config checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkexp import config as C
from ntkexp.experiments import double_descent as DD
from ntkexp.experiments.base import Unit
from ntkexp.experiments.common import build_ensemble
from ntkexp.models.analytic import analytic_kernel
from ntkexp.theory import kernel_regression

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "double_descent.yaml")


@pytest.mark.parametrize("w", [7, 30, 45])
def test_min_norm_fit_matches_lstsq_and_ridge(w):
    """Under- and over-parameterized: the pseudo-inverse readout is numpy's lstsq
    (minimum norm), the ridge readout the normal-equation solve."""
    rng = np.random.default_rng(0)
    n, m, k = 20, 9, 3
    phi, phi_t, y = rng.normal(size=(n, w)), rng.normal(size=(m, w)), rng.normal(size=(n, k))
    (ft, ftr), (fr, _) = DD.min_norm_fit(phi, phi_t, y, (0.0, 0.3))
    v = np.linalg.lstsq(phi, y, rcond=None)[0]
    np.testing.assert_allclose(ft, phi_t @ v, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ftr, phi @ v, rtol=1e-8, atol=1e-10)
    if w > n:  # interpolates
        np.testing.assert_allclose(ftr, y, atol=1e-9)
    vr = np.linalg.solve(phi.T @ phi + 0.3 * np.eye(w), phi.T @ y)
    np.testing.assert_allclose(fr, phi_t @ vr, rtol=1e-8, atol=1e-10)


def test_features_are_the_frozen_first_layer_of_the_model():
    """f(x) = W_std * Phi(x) W1 for the model built from the same parameters."""
    cfg = C.load(CONFIG, preset="tiny")
    unit = Unit(width=20, learning_rate=1.0, w_index=0, lr_index=0, inits=(0, 1))
    x = jax.random.normal(jax.random.PRNGKey(0), (5, cfg.data.dim))
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    rtol = 1e-10 if dt == jnp.float64 else 1e-4
    x = x.astype(dt)
    apply_fn, params = build_ensemble(cfg, unit, cfg.data.dim, dt)
    for i in range(2):
        p = jax.tree_util.tree_map(lambda a, i=i: a[i], params)
        phi = DD.features(cfg, p["layers"][0]["W"], x)
        want = np.asarray(apply_fn(p, x), np.float64)
        got = cfg.model.W_std * phi @ np.asarray(p["layers"][1]["W"], np.float64)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 1e-2)


def test_wide_random_features_tend_to_nngp_regression():
    """Phi Phi^T -> NNGP / W_std^2 as w -> infinity, so the min-norm random-feature
    predictor tends to ridgeless NNGP regression (error ~ w^-1/2: 4x width, about half
    the distance)."""
    cfg = C.load(CONFIG, preset="tiny")
    rng = np.random.default_rng(1)
    n, m, d = 12, 6, cfg.data.dim
    x, xt, y = rng.normal(size=(n, d)), rng.normal(size=(m, d)), rng.normal(size=(n, 2))
    spec = cfg.model.spec(1)
    K = np.asarray(analytic_kernel(spec, x).nngp, np.float64)
    Kt = np.asarray(analytic_kernel(spec, xt, x).nngp, np.float64)
    want = np.asarray(kernel_regression(Kt, K, y), np.float64)
    dists = []
    for w in (1_000, 16_000):  # both take the Gram path (w >= 2 n)
        dw = []
        for _ in range(4):  # root-mean-square distance over 4 draws of the features
            W0 = rng.normal(size=(d, w))
            (f, _), = DD.min_norm_fit(DD.features(cfg, W0, x), DD.features(cfg, W0, xt), y)
            dw.append(np.linalg.norm(f - want) ** 2 / np.linalg.norm(want) ** 2)
        dists.append(np.sqrt(np.mean(dw)))
    assert dists[1] < 0.1
    assert dists[1] < 0.5 * dists[0]


def test_config_checks():
    with pytest.raises(C.ConfigError, match="depth: 1"):
        C.load(CONFIG, preset="tiny", overrides=["model.depth=2"])
    with pytest.raises(C.ConfigError, match="b_std 0"):
        C.load(CONFIG, preset="tiny", overrides=["model.b_std=0.1"])
    with pytest.raises(C.ConfigError, match="trained_widths"):
        C.load(CONFIG, preset="tiny", overrides=["params.trained_widths=[7]"])
    with pytest.raises(C.ConfigError, match="n_test"):
        C.load(CONFIG, preset="tiny", overrides=["data.n_test=0"])


@pytest.mark.slow
def test_tiny_run_peaks_at_the_threshold(tmp_path_factory):
    """The tiny preset end to end (n_train 60): the random-feature peak is within a
    factor 2 of w = n, the ensemble and the ridge lower it, and w >= n interpolates."""
    from conftest import run_tiny

    _, s = run_tiny(tmp_path_factory, CONFIG, "dd", allow_rank_promotion=True)
    assert 0.5 <= s["peak_width"] / s["threshold_width"] <= 2.0
    assert s["ensemble_peak_test_error"] < s["peak_test_error"]
    assert s["ridge_peak_test_error"] < s["peak_test_error"]
    for w, e in s["per_width"].items():
        if int(w) >= s["threshold_width"]:
            assert e["rf_train_mse"] < 1e-8
