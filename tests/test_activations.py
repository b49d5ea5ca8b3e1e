"""Closed-form dual maps against independent truths (quadrature, textbook formulas, limits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkexp.activations import get_activation
from ntkexp.kernels.quadrature import NumericalDual

RNG = np.random.default_rng(0)


def _points(n=12):
    q1 = RNG.uniform(0.05, 4.0, n)
    q2 = RNG.uniform(0.05, 4.0, n)
    rho = np.concatenate([RNG.uniform(-0.95, 0.95, n - 4), [1.0, -1.0, 0.999999, -0.999999]])
    return q1, rho * np.sqrt(q1 * q2), q2


@pytest.mark.parametrize("name", ["erf", "gelu", "sin", "cos"])
def test_smooth_closed_forms_match_quadrature(name):
    # Independent method: Mehler expansion with exact tails (smooth phi: spectrally accurate).
    act = get_activation(name)
    q1, c, q2 = (jnp.asarray(a) for a in _points())
    nd = NumericalDual(act)
    for closed, num in ((act.T, nd.T), (act.Tdot, nd.Tdot)):
        a, b = np.asarray(closed(q1, c, q2)), np.asarray(num(q1, c, q2))
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


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
    np.testing.assert_allclose(np.asarray(act.T(q, q, q)), (sig**2 + dl**2) * np.asarray(q), rtol=1e-15)
    np.testing.assert_allclose(np.asarray(act.T(q, -q, q)), (dl**2 - sig**2) * np.asarray(q),
                               rtol=1e-14, atol=1e-16)


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


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "abs", "identity", "erf", "gelu", "sin", "cos"])
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
