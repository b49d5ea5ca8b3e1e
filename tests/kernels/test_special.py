"""The seed's special cases equal the general recursion (and their own papers' formulas)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_x64
from ntkexp.kernels import arora_ntk, c_sigma, du_gram, two_layer_relu_ntk_sphere
from ntkexp.models.analytic import analytic_kernel
from ntkexp.models.mlp import MLPSpec


def _unit(seed, n, d):
    x = np.asarray(jax.random.normal(jax.random.key(seed), (n, d), jnp.float64))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _arora_direct(x, depth):
    # Arora et al. 2019, eqs. 4-6 with the ReLU closed forms (c_sigma = 2), in numpy.
    sig = x @ x.T
    theta = sig.copy()
    for _ in range(depth):
        d = np.sqrt(np.diag(sig))
        cos = np.clip(sig / np.outer(d, d), -1, 1)
        t = np.arccos(cos)
        sig_new = np.outer(d, d) * (np.sin(t) + (np.pi - t) * cos) / np.pi
        sdot = (np.pi - t) / np.pi
        theta = sig_new + sdot * theta
        sig = sig_new
    return theta


@needs_x64
@pytest.mark.parametrize("depth", [1, 3])
def test_arora_ntk_matches_its_recursion(depth):
    x = np.asarray(jax.random.normal(jax.random.key(depth), (6, 5), jnp.float64))
    np.testing.assert_allclose(np.asarray(arora_ntk(x, depth=depth)), _arora_direct(x, depth),
                               rtol=1e-7)


@needs_x64  # float64 inputs and float64 tolerances
def test_c_sigma_values():
    assert c_sigma("relu") == pytest.approx(2.0, rel=1e-15)
    assert c_sigma("identity") == pytest.approx(1.0, rel=1e-15)
    # erf: E[erf(z)^2] = (2/pi) asin(2/3)
    assert c_sigma("erf") == pytest.approx(1 / (2 / np.pi * np.arcsin(2 / 3)), rel=1e-12)
    # tanh by quadrature; check against a brute-force trapezoid in numpy
    z = np.linspace(-12, 12, 200_001)
    m = np.sum(np.tanh(z) ** 2 * np.exp(-z * z / 2)) * (z[1] - z[0]) / np.sqrt(2 * np.pi)
    assert c_sigma("tanh") == pytest.approx(1 / m, rel=1e-9)


@needs_x64  # float64 inputs and float64 tolerances
def test_two_layer_sphere_equals_general_recursion():
    x = _unit(0, 7, 4)
    x[1] = -x[0]
    x[2] = x[3]
    u = np.clip(x @ x.T, -1, 1)
    # the exact cosines of the edge pairs (the Gram matrix rounds them to 1 - 1e-16,
    # where kappa's sqrt(1 - u^2) turns rounding into 1e-8)
    np.fill_diagonal(u, 1.0)
    u[0, 1] = u[1, 0] = -1.0
    u[2, 3] = u[3, 2] = 1.0
    spec = MLPSpec(depth=1, width=1, activation="relu", W_std=np.sqrt(2.0), b_std=0.0)
    k = analytic_kernel(spec, x * np.sqrt(4 / 2))
    np.testing.assert_allclose(np.asarray(two_layer_relu_ntk_sphere(u)), np.asarray(k.ntk),
                               rtol=1e-9, atol=1e-12)
    # kappa(1) = 2 and kappa(-1) = 0 exactly, finite gradient everywhere
    np.testing.assert_allclose(np.asarray(two_layer_relu_ntk_sphere(jnp.asarray([1.0, -1.0]))),
                               [2.0, 0.0], atol=1e-15)
    g = jax.vmap(jax.grad(two_layer_relu_ntk_sphere))(jnp.asarray([1.0, -1.0, 0.3]))
    assert bool(jnp.all(jnp.isfinite(g)))


@needs_x64  # float64 inputs and float64 tolerances
def test_du_gram_formula_and_recursion():
    x = _unit(1, 6, 5)
    x[1] = x[0]
    u = np.clip(x @ x.T, -1, 1)
    formula = u * (np.pi - np.arccos(u)) / (2 * np.pi)
    h = np.asarray(du_gram(x))
    np.testing.assert_allclose(h, formula, rtol=1e-7, atol=1e-12)
    assert np.array_equal(h, h.T)
    assert np.linalg.eigvalsh(h).min() >= -1e-12
    np.testing.assert_allclose(np.asarray(du_gram(x[:2], x[2:])), formula[:2, 2:], rtol=1e-7)
