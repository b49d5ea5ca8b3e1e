"""Infinite-width predictions and diagnostics vs closed forms, the training loop, Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import X64, needs_x64, rel_err
from ntkexp.models.mlp import MLPApply, MLPSpec, init_params
from ntkexp.models.two_layer import TwoLayerApply, TwoLayerSpec, init_two_layer
from ntkexp.optim import gd
from ntkexp.theory import (
    gd_loss_curve,
    gd_residuals,
    generalization_bound,
    gradient_flow,
    kernel_drift,
    kernel_regression,
    lambda_min,
    linearize,
    max_weight_distance,
    ntk_gp,
    ntk_predict,
    pattern_flip_fraction,
)
from ntkexp.training import train


def _spd(key, n, dtype):
    A = jax.random.normal(key, (n, n + 3), dtype)
    return A @ A.T / n + 0.1 * jnp.eye(n, dtype=dtype)


def _linear_problem(dtype, n=6, m=4, d=9):
    kx, kt, ky, kw = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (n, d), dtype) / np.sqrt(d)
    xt = jax.random.normal(kt, (m, d), dtype) / np.sqrt(d)
    y = jax.random.normal(ky, (n,), dtype)
    p = {"w": jax.random.normal(kw, (d, 1), dtype)}
    return x, xt, y, p


def _lin(p, x):
    return x @ p["w"]


def test_kernel_regression_matches_solve(dtype, tol):
    K = _spd(jax.random.key(1), 7, dtype)
    kx = jax.random.normal(jax.random.key(2), (3, 7), dtype)
    y = jax.random.normal(jax.random.key(3), (7, 2), dtype)
    for ridge in (0.0, 0.5):
        got = jax.jit(lambda a, b, c, r=ridge: kernel_regression(a, b, c, ridge=r))(kx, K, y)
        Kn = np.asarray(K, np.float64) + ridge * np.eye(7)
        expect = np.asarray(kx, np.float64) @ np.linalg.solve(Kn, np.asarray(y, np.float64))
        assert rel_err(got, expect) < 100 * tol["exact"]
    assert kernel_regression(kx, K, y[:, 0]).shape == (3,)
    with pytest.raises(ValueError, match="ridge"):
        kernel_regression(kx, K, y, ridge=-1.0)
    with pytest.raises(ValueError, match="rows"):
        kernel_regression(kx, K, y[:5])


def test_gradient_flow_solves_the_ode(dtype, tol):
    H = _spd(jax.random.key(4), 5, dtype)
    u0 = jax.random.normal(jax.random.key(5), (5,), dtype)
    y = jax.random.normal(jax.random.key(6), (5,), dtype)
    eta = 0.7
    ts = jnp.asarray([0.0, 1.0, 1e3], dtype)
    u = gradient_flow(H, u0, y, ts, learning_rate=eta)
    assert u.shape == (3, 5)
    assert rel_err(u[0], u0) < tol["exact"]
    assert rel_err(u[2], y) < 10 * tol["exact"]
    if not X64:
        return  # the derivative check below needs float64 (central differences)
    # du/dt = -eta H (u - y), by central differences in float64
    H64, u064, y64 = (np.asarray(a, np.float64) for a in (H, u0, y))
    h = 1e-5
    up, um = (np.asarray(gradient_flow(H64, u064, y64, t, learning_rate=eta))
              for t in (1 + h, 1 - h))
    du = (up - um) / (2 * h)
    u1 = np.asarray(gradient_flow(H64, u064, y64, 1.0, learning_rate=eta))
    assert rel_err(du, -eta * H64 @ (u1 - y64)) < 1e-6


def test_gd_residuals_are_matrix_powers(dtype, tol):
    H = _spd(jax.random.key(7), 6, dtype)
    r0 = jax.random.normal(jax.random.key(8), (6, 2), dtype)
    eta = 1.5 / float(jnp.linalg.eigvalsh(H)[-1])  # some eigen-factors negative
    R = gd_residuals(H, r0, 12, learning_rate=eta)
    M = np.eye(6) - eta * np.asarray(H, np.float64)
    r = np.asarray(r0, np.float64)
    for k in range(13):
        assert rel_err(R[k], r) < 1000 * tol["exact"]
        r = M @ r


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gd_loss_curve_equals_training_a_linear_model(reduction, dtype, tol):
    """A linear model's NTK is constant, so train() must follow the prediction exactly."""
    x, _, y, p = _linear_problem(dtype)
    eta = 0.8
    res = train(_lin, p, x, y, optimizer=gd(eta), steps=30, loss_reduction=reduction)
    H = x @ x.T
    pred = gd_loss_curve(H, _lin(p, x)[:, 0], y, 30, learning_rate=eta, loss_reduction=reduction)
    assert rel_err(res.losses, pred) < 1000 * tol["exact"]


@pytest.mark.parametrize("t_or_steps", [dict(steps=25), dict(t=None)])
def test_ntk_predict_matches_trained_linear_model(t_or_steps, dtype, tol):
    x, xt, y, p = _linear_problem(dtype)
    eta, steps = 0.8, 25 if "steps" in t_or_steps else 20000
    res = train(_lin, p, x, y, optimizer=gd(eta), steps=steps, loss_reduction="mean")
    pred = ntk_predict(xt @ x.T, x @ x.T, y, _lin(p, xt)[:, 0], _lin(p, x)[:, 0],
                       learning_rate=eta, loss_reduction="mean", **t_or_steps)
    assert rel_err(_lin(res.params, xt)[:, 0], pred) < (1000 if steps < 100 else 1e5) * tol["exact"]


@needs_x64
def test_ntk_predict_flow_and_infinity_limits():
    K = np.asarray(_spd(jax.random.key(9), 5, jnp.float64))
    kx = np.random.default_rng(0).standard_normal((3, 5))
    y, f0t, f0 = np.arange(5.0), np.ones(3), np.linspace(-1, 1, 5)
    at0 = ntk_predict(kx, K, y, f0t, f0, t=0.0)
    np.testing.assert_allclose(at0, f0t, atol=1e-12)
    inf = ntk_predict(kx, K, y, f0t, f0)
    np.testing.assert_allclose(inf, f0t + kx @ np.linalg.solve(K, y - f0), rtol=1e-10)
    late = ntk_predict(kx, K, y, f0t, f0, t=1e6, loss_reduction="sum")
    np.testing.assert_allclose(late, inf, rtol=1e-8)
    with pytest.raises(ValueError, match="not both"):
        ntk_predict(kx, K, y, f0t, f0, t=1.0, steps=3)


@needs_x64
def test_ntk_gp_mean_and_cov_match_monte_carlo_over_f0():
    """Lee et al. 2019 eq. 16 vs sampling f0 ~ GP(0, K) and applying ntk_predict to each draw."""
    rng = np.random.default_rng(1)
    n, m = 5, 3
    Theta = np.asarray(_spd(jax.random.key(10), n + m, jnp.float64))
    A = rng.standard_normal((n + m, n + m))
    K = A @ A.T / (n + m)
    tr, te = slice(m, None), slice(0, m)
    y = rng.standard_normal(n)
    for kw in (dict(t=2.0), dict()):
        mean, cov = ntk_gp(Theta[te, tr], Theta[tr, tr], K[te, tr], K[tr, tr], K[te, te], y,
                           loss_reduction="sum", **kw)
        draws = rng.multivariate_normal(np.zeros(n + m), K, size=20000)
        preds = jax.vmap(lambda f, kw=kw: ntk_predict(Theta[te, tr], Theta[tr, tr], y, f[te],
                                                      f[tr], loss_reduction="sum", **kw)
                         )(jnp.asarray(draws))
        preds = np.asarray(preds)
        se = np.sqrt(np.diag(np.asarray(cov)) / len(draws))
        assert np.all(np.abs(preds.mean(0) - np.asarray(mean)) < 5 * se + 1e-12)
        assert rel_err(np.cov(preds.T), cov) < 0.05
    # at t = infinity on the training points: interpolation, no variance
    mean, cov = ntk_gp(Theta[tr, tr], Theta[tr, tr], K[tr, tr], K[tr, tr], K[tr, tr], y)
    np.testing.assert_allclose(mean, y, rtol=1e-8)
    assert np.max(np.abs(cov)) < 1e-8


@needs_x64
def test_linearize_is_first_order_taylor(dtype, tol):
    spec = MLPSpec(depth=1, width=16, activation="tanh")  # smooth: remainder is O(|delta|^2)
    f = MLPApply(spec)
    p0 = init_params(spec, 3, jax.random.key(0), dtype)
    x = jax.random.normal(jax.random.key(1), (5, 3), dtype)
    fl, pl = linearize(f, p0)
    assert rel_err(fl(pl, x), f(p0, x)) < tol["exact"]
    d = jax.tree_util.tree_map(lambda a: 0.05 * jnp.ones_like(a), p0)
    errs = []
    for s in (1.0, 0.5):
        th = jax.tree_util.tree_map(lambda a, b, s=s: a + s * b, p0, d)
        errs.append(float(jnp.linalg.norm(fl({"theta": th, "theta0": p0}, x) - f(th, x))))
    if dtype == jnp.float64:
        assert 3.5 < errs[0] / errs[1] < 4.5
    # a model linear in its parameters is its own linearisation
    lx, _, _, lp = _linear_problem(dtype)
    fl2, _ = linearize(_lin, lp)
    q = {"theta": {"w": lp["w"] + 1.0}, "theta0": lp}
    assert rel_err(fl2(q, lx), _lin(q["theta"], lx)) < 10 * tol["exact"]


def test_diagnostics_against_closed_forms(dtype, tol):
    K = _spd(jax.random.key(11), 6, dtype)
    assert abs(float(kernel_drift(K, K))) == 0
    assert abs(float(kernel_drift(1.1 * K, K)) - 0.1) < 10 * tol["exact"]
    Kn = np.asarray(K, np.float64)
    assert abs(float(lambda_min(K)) - np.linalg.eigvalsh(Kn)[0]) < 100 * tol["exact"]
    y = jnp.arange(6.0, dtype=dtype)
    bound = float(generalization_bound(K, y))
    yn = np.arange(6.0)
    assert abs(bound - np.sqrt(2 * yn @ np.linalg.solve(Kn, yn) / 6)) < 100 * tol["exact"] * bound
    with pytest.raises(ValueError, match="kernels differ"):
        kernel_drift(K, K[:3, :3])


def test_pattern_flips_and_weight_distance_on_constructed_change(dtype):
    spec = TwoLayerSpec(10)
    f = TwoLayerApply(spec)
    p0 = init_two_layer(spec, 4, jax.random.key(0), dtype)
    x = jax.random.normal(jax.random.key(1), (7, 4), dtype)
    W = p0["W"].at[:, 3].multiply(-1.0)  # unit 3 flips on every point
    W = W.at[:, 5].add(jnp.asarray([0.0, 0.0, 0.0, 1e-7], dtype))  # tiny move, no flip
    p1 = {"W": W, "a": p0["a"]}
    assert abs(float(pattern_flip_fraction(f, p1, p0, x)) - 1 / 10) < 1e-7
    expect = 2 * float(jnp.linalg.norm(p0["W"][:, 3]))
    assert abs(float(max_weight_distance(f, p1, p0)) - expect) < 1e-5 * expect
    with pytest.raises(TypeError, match="patterns"):
        pattern_flip_fraction(_lin, {"w": x}, {"w": x}, x)
