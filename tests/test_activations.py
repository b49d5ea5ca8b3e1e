"""Closed-form dual maps against independent truths (quadrature, textbook formulas, limits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_x64
from ntkexp.activations import get_activation
from ntkexp.kernels.quadrature import NumericalDual

RNG = np.random.default_rng(0)


def _points(n=12):
    q1 = RNG.uniform(0.05, 4.0, n)
    q2 = RNG.uniform(0.05, 4.0, n)
    rho = np.concatenate([RNG.uniform(-0.95, 0.95, n - 4), [1.0, -1.0, 0.999999, -0.999999]])
    return q1, rho * np.sqrt(q1 * q2), q2


@needs_x64  # float64 inputs and float64 tolerances
@pytest.mark.parametrize("name", ["erf", "gelu", "sin", "cos"])
def test_smooth_closed_forms_match_quadrature(name):
    # Independent method: Mehler expansion with exact tails (smooth phi: spectrally accurate).
    act = get_activation(name)
    q1, c, q2 = (jnp.asarray(a) for a in _points())
    nd = NumericalDual(act)
    for closed, num in ((act.T, nd.T), (act.Tdot, nd.Tdot)):
        a, b = np.asarray(closed(q1, c, q2)), np.asarray(num(q1, c, q2))
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


@needs_x64  # float64 inputs and float64 tolerances
@pytest.mark.parametrize("name,params", [("relu", {}), ("leaky_relu", {"slope": 0.2}),
                                         ("abs", {}), ("identity", {})])
def test_angular_duals_match_cho_saul(name, params):
    # Textbook arc-cosine form (Cho & Saul 2009) away from the edges, written independently.
    act = get_activation(name, params)
    alpha = {"relu": 0.0, "leaky_relu": 0.2, "abs": -1.0, "identity": 1.0}[name]
    q1, c, q2 = _points()
    s = np.sqrt(q1 * q2)
    th = np.arccos(np.clip(c / s, -1, 1))

    def j1(t):  # E[relu(u) relu(v)] / s
        return (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi)

    # phi = relu(u) - alpha relu(-u)
    T = s * ((1 + alpha**2) * j1(th) - 2 * alpha * j1(np.pi - th))
    Td = (1 + alpha**2) * (np.pi - th) / (2 * np.pi) + 2 * alpha * th / (2 * np.pi)
    args = tuple(jnp.asarray(a) for a in (q1, c, q2))
    np.testing.assert_allclose(np.asarray(act.T(*args)), T, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(np.asarray(act.Tdot(*args)), Td, rtol=1e-7, atol=1e-12)
    # Exact edges: rho = 1 gives E[phi(u)^2] = J(0) q; rho = -1 with v = -lambda u.
    sig, dl = act.angular.sigma, act.angular.delta
    q = jnp.asarray([0.7, 2.0])
    np.testing.assert_allclose(np.asarray(act.T(q, q, q)), (sig**2 + dl**2) * np.asarray(q),
                               rtol=1e-15)
    np.testing.assert_allclose(np.asarray(act.T(q, -q, q)), (dl**2 - sig**2) * np.asarray(q),
                               rtol=1e-14, atol=1e-16)


@needs_x64
def test_relu_dual_against_monte_carlo():
    act = get_activation("relu")
    key = jax.random.key(1)
    z = jax.random.normal(key, (2, 400_000), jnp.float64)
    q1, q2, rho = 1.3, 0.6, -0.4
    u = np.sqrt(q1) * z[0]
    v = np.sqrt(q2) * (rho * z[0] + np.sqrt(1 - rho**2) * z[1])
    mc = float(jnp.mean(act.fn(u) * act.fn(v)))
    se = float(jnp.std(act.fn(u) * act.fn(v))) / np.sqrt(z.shape[1])
    t = float(act.T(jnp.asarray(q1), jnp.asarray(rho * np.sqrt(q1 * q2)), jnp.asarray(q2)))
    assert abs(mc - t) < 5 * se


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "abs", "identity", "erf", "gelu", "sin",
                                  "cos"])
def test_edges_finite_values_and_gradients(name, dtype):
    act = get_activation(name)
    q = jnp.asarray([1.0, 0.0, 1e-12, 1e4, 2.0], dtype)
    cs = jnp.stack([q, -q, jnp.zeros_like(q), 0.5 * q])

    def total(qq, cc):
        return jnp.sum(act.T(qq, cc, qq) + act.Tdot(qq, cc, qq))

    for c in cs:
        assert bool(jnp.all(jnp.isfinite(act.T(q, c, q))))
        g = jax.grad(total, argnums=(0, 1))(q, c)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)


def test_registry_errors():
    with pytest.raises(KeyError, match="known:"):
        get_activation("relux")
    with pytest.raises(ValueError, match="bad parameters"):
        get_activation("leaky_relu", {"nope": 1})


def test_atan_ratio_matches_arctan_to_ulps(dtype):
    # Cephes range-reduced atan in plain arithmetic vs numpy's arctan2 in float64.
    from ntkexp.activations import atan_ratio

    r = np.concatenate([RNG.uniform(0, 1, 2000), np.logspace(-30, 0, 200),
                        [0.0, 0.41421356237309504, 0.66, 1.0 - 1e-12, 1.0]])
    x = RNG.uniform(0.1, 10.0, r.size)
    y = np.minimum(r * x, x)
    got = np.asarray(atan_ratio(jnp.asarray(y, dtype), jnp.asarray(x, dtype)), np.float64)
    yd = np.asarray(jnp.asarray(y, dtype), np.float64)
    want = np.arctan2(yd, np.asarray(jnp.asarray(x, dtype), np.float64))
    eps = float(jnp.finfo(dtype).eps)
    # inputs rounded to dtype, so allow a few ulps of the result (relative, also at y -> 0)
    assert np.all(np.abs(got - want) <= 4 * eps * np.abs(want))
    assert float(atan_ratio(jnp.zeros((), dtype), jnp.zeros((), dtype))) == 0.0
    g = jax.grad(lambda a: atan_ratio(a, 2 * a + 1.0))(jnp.asarray(0.0, dtype))
    np.testing.assert_allclose(float(g), 1.0, rtol=10 * eps)


@needs_x64
@pytest.mark.parametrize("name,params", [("relu", {}), ("leaky_relu", {"slope": 0.2}), ("abs", {})])
def test_sorted_gap_duals_match_trig_forms(name, params, dtype):
    # The recursion's fast path (gaps -> J, Jdot, jm, jp with one sqrt and one
    # division) against J/Jdot/jm/jp evaluated with sin/cos of the angle.
    ang = get_activation(name, params).angular
    edges = [0.0, 1e-6, 0.3, np.pi / 2, np.pi - 1e-6, np.pi]
    t = np.concatenate([RNG.uniform(0, np.pi, 200), edges])
    s = RNG.uniform(0.1, 5.0, t.size)
    e, f = 2 * s * np.sin(t / 2) ** 2, 2 * s * np.cos(t / 2) ** 2  # s - c, s + c
    mn, mx = np.minimum(e, f), np.maximum(e, f)
    J, Jdot, jm, jp = ang.from_sorted_gaps(*(jnp.asarray(a, dtype) for a in (mn, mx)),
                                           jnp.asarray(e <= f), jnp.asarray(1 / (2 * s), dtype))
    tt = jnp.asarray(t)
    want = (ang.J(tt), ang.Jdot(tt), ang.jm(tt), ang.jp(tt))
    tol = 1e-13 if dtype == jnp.float64 else 2e-6
    for a, b in zip((J, Jdot, jm, jp), want, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b), rtol=tol, atol=tol)
    if dtype == jnp.float64:  # relative accuracy where jm -> 0 (t -> 0) and jp -> 0 (t -> pi, relu)
        k0, kpi = t.size - 5, t.size - 2
        np.testing.assert_allclose(float(jm[k0]), float(want[2][k0]), rtol=1e-12, atol=0)
        np.testing.assert_allclose(float(jp[kpi]), float(want[3][kpi]), rtol=1e-9, atol=0)
