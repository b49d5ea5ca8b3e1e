"""Mercer eigenvalues on the sphere, decay fits and the Prop. 9 Lipschitz constant."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import X64, needs_x64
from ntkexp.activations import get_activation
from ntkexp.kernels import (
    fit_decay_exponent,
    gauss_jacobi,
    lipschitz_constant_prop9,
    mercer_eigenvalues,
    smoothness_gammas,
    two_layer_relu_ntk_sphere,
)
from ntkexp.kernels.spectra import harmonic_dimension, legendre_sphere


@pytest.mark.parametrize("a", [-0.5, 0.0, 1.0, 2.5])
def test_gauss_jacobi_moments(a):
    # int t^2 (1-t^2)^a dt = B(3/2, a+1); exact for polynomials of degree <= 2n-1
    t, w = gauss_jacobi(8, a, a)
    exact = math.gamma(1.5) * math.gamma(a + 1) / math.gamma(a + 2.5)
    assert np.sum(w * t**2) == pytest.approx(exact, rel=1e-13)


@pytest.mark.parametrize("p", [3, 4, 7])
@pytest.mark.parametrize("variable", ["t", "angle"])
def test_polynomial_kernels_known_expansion(p, variable):
    # u = p * (1/p) P_1 ; u^2 = 1/p + (p-1)/p P_2  =>  mu_1 = 1/p, mu_2 = 2/(p(p+2))
    mu = mercer_eigenvalues(lambda t: t, p, 3, variable=variable, nodes=64)
    np.testing.assert_allclose(mu, [0, 1 / p, 0, 0], atol=1e-14)
    mu2 = mercer_eigenvalues(lambda t: t**2, p, 4, variable=variable, nodes=64)
    np.testing.assert_allclose(mu2, [1 / p, 0, 2 / (p * (p + 2)), 0, 0], atol=1e-14)
    # exp(t): reconstruct kappa from its eigenvalues (Funk-Hecke)
    mue = mercer_eigenvalues(np.exp, p, 30, variable=variable, nodes=128)
    t = np.linspace(-1, 1, 7)
    P = legendre_sphere(30, p, t)
    n = np.array([harmonic_dimension(p, k) for k in range(31)])
    np.testing.assert_allclose((mue * n) @ P, np.exp(t), rtol=1e-12)


@needs_x64  # float64 inputs and float64 tolerances
@pytest.mark.parametrize("p", [3, 5])
def test_relu_ntk_spectrum(p):
    mu = mercer_eigenvalues(lambda t: np.asarray(two_layer_relu_ntk_sphere(jnp.asarray(t))),
                            p, 60, nodes=600)
    assert mu[0] > 0 and mu[1] > 0
    assert np.max(np.abs(mu[3::2])) < 1e-10 * mu[0]  # odd k >= 3 vanish (Bietti & Mairal 2019)
    ks = np.arange(20, 61, 2)
    fit = fit_decay_exponent(ks, mu[20::2])
    assert abs(fit.exponent - p) < 0.1 * p  # mu_k ~ k^-p


def test_fit_decay_exponent_recovers_power_law():
    ks = np.arange(2, 50)
    fit = fit_decay_exponent(ks, 3.0 * ks**-2.5)
    assert fit.exponent == pytest.approx(2.5, rel=1e-12)
    assert fit.prefactor == pytest.approx(3.0, rel=1e-12)
    with pytest.raises(ValueError):
        fit_decay_exponent([1, 2], [1.0, -1.0])


def test_lipschitz_prop9_closed_forms():
    # the Gauss-Hermite rule is float64 with x64, float32 without
    rtol = 1e-12 if X64 else 1e-6
    # gamma_j = E[exp(u - c)^2] = e^(2 - 2c) for every j
    for shift in (1.0, 2.0):
        g = smoothness_gammas(get_activation("exp", {"shift": shift}))
        np.testing.assert_allclose(g, [math.exp(2 - 2 * shift)] * 3, rtol=rtol)
    assert lipschitz_constant_prop9(get_activation("exp", {"shift": 2.0})) == pytest.approx(
        math.sqrt(3) / math.e, rel=rtol)
    assert lipschitz_constant_prop9(get_activation("exp", {"shift": 1.0})) == pytest.approx(
        math.sqrt(3), rel=rtol)
    # softplus: the gammas by adaptive quadrature (scipy), independent of the code's
    # Gauss-Hermite rule; measured 1.9e-14 (x64) / 2.6e-8 (x64 off, float32 rule)
    g = [_gauss_expectation(lambda u, f=f: f(u) ** 2) for f in _SOFTPLUS_DERIVATIVES]
    want = math.sqrt((g[0] + g[1]) * max(1, (2 * g[1] + g[2]) / (g[0] + g[1])))
    assert lipschitz_constant_prop9("softplus") == pytest.approx(want, rel=rtol)


def _sigmoid(u):
    return 1 / (1 + math.exp(-u)) if u >= 0 else math.exp(u) / (1 + math.exp(u))


# softplus and its first two derivatives, sigmoid and sigmoid (1 - sigmoid)
_SOFTPLUS_DERIVATIVES = (lambda u: max(u, 0.0) + math.log1p(math.exp(-abs(u))), _sigmoid,
                         lambda u: _sigmoid(u) * (1 - _sigmoid(u)))


def _gauss_expectation(f):
    """``E[f(u)]``, ``u ~ N(0, 1)``, by adaptive quadrature (scipy.integrate.quad)."""
    from scipy import integrate

    val, _ = integrate.quad(lambda u: f(u) * math.exp(-u * u / 2) / math.sqrt(2 * math.pi),
                            -math.inf, math.inf, epsabs=0, epsrel=1e-13, limit=200)
    return val
