"""Mercer spectra of dot-product kernels on the sphere, and smoothness constants.

Normalisation (Bietti & Mairal 2019, section 3.1; Smola et al. 2001): a kernel
``K(x, y) = kappa(<x, y>)`` on ``S^{p-1}`` has the Mercer decomposition
``kappa(<x, y>) = sum_k mu_k sum_{j=1}^{N(p,k)} Y_kj(x) Y_kj(y)`` with respect to
the *uniform probability* measure, i.e. ``kappa(t) = sum_k mu_k N(p, k) P_k(t)``
with ``P_k`` the Legendre (Gegenbauer) polynomial in dimension ``p``
(``P_k(1) = 1``) and ``N(p, k)`` the number of spherical harmonics of degree ``k``::

    mu_k = (|S^{p-2}| / |S^{p-1}|) int_{-1}^{1} kappa(t) P_k(t) (1 - t^2)^{(p-3)/2} dt.

``mu_k`` is the eigenvalue of the integral operator (each with multiplicity
``N(p, k)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.activations import Activation, get_activation
from ntkexp.kernels.quadrature import gaussian_rule


def gauss_jacobi(n: int, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Jacobi rule for ``int_{-1}^{1} g(t) (1-t)^alpha (1+t)^beta dt`` (Golub-Welsch).

    The nodes are the eigenvalues of the symmetric tridiagonal Jacobi matrix of
    the three-term recurrence of the Jacobi polynomials; the weights are
    ``mu_0 v_0^2`` with ``v_0`` the first component of each unit eigenvector
    (Golub & Welsch 1969).

    Returns:
      float64 ``(t (n,), w (n,))``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if alpha <= -1 or beta <= -1:
        raise ValueError(f"alpha and beta must be > -1, got {alpha}, {beta}")
    k = np.arange(n, dtype=np.float64)
    ab = alpha + beta
    with np.errstate(divide="ignore", invalid="ignore"):
        den = (2 * k + ab) * (2 * k + ab + 2)
        diag = np.where(np.abs(den) > 0, (beta**2 - alpha**2) / np.where(den == 0, 1, den), 0.0)
    if n >= 1 and abs(ab + 2) > 0:
        diag[0] = (beta - alpha) / (ab + 2)
    j = np.arange(1, n, dtype=np.float64)
    off2 = (4 * j * (j + alpha) * (j + beta) * (j + ab)
            / ((2 * j + ab) ** 2 * (2 * j + ab + 1) * (2 * j + ab - 1 + (j == 1) * (ab == -1))))
    if n > 1:
        # j = 1 written without the (2j + ab - 1)(j + ab) 0/0 when ab = -1.
        off2[0] = 4 * (1 + alpha) * (1 + beta) / ((2 + ab) ** 2 * (3 + ab))
    jm = np.diag(diag) + np.diag(np.sqrt(off2), 1) + np.diag(np.sqrt(off2), -1)
    t, v = np.linalg.eigh(jm)
    mu0 = 2 ** (ab + 1) * math.exp(
        math.lgamma(alpha + 1) + math.lgamma(beta + 1) - math.lgamma(ab + 2))
    return t, mu0 * v[0] ** 2


def sphere_area(m: int) -> float:
    """``|S^m| = 2 pi^{(m+1)/2} / Gamma((m+1)/2)``."""
    return 2 * math.pi ** ((m + 1) / 2) / math.gamma((m + 1) / 2)


def legendre_sphere(k_max: int, p: int, t: np.ndarray) -> np.ndarray:
    """``P_k(t)``, ``k = 0..k_max``, Legendre polynomials in dimension ``p`` (``P_k(1) = 1``).

    Recurrence (Atkinson & Han 2012, eq. 2.79):
    ``(k + p - 3) P_k = (2k + p - 4) t P_{k-1} - (k - 1) P_{k-2}``.

    Returns:
      ``(k_max + 1, *t.shape)``.
    """
    t = np.asarray(t, np.float64)
    out = np.zeros((k_max + 1,) + t.shape)
    out[0] = 1.0
    if k_max >= 1:
        out[1] = t
    for k in range(2, k_max + 1):
        out[k] = ((2 * k + p - 4) * t * out[k - 1] - (k - 1) * out[k - 2]) / (k + p - 3)
    return out


def harmonic_dimension(p: int, k: int) -> int:
    """``N(p, k)``: number of linearly independent spherical harmonics of degree k on S^{p-1}."""
    if k == 0:
        return 1
    return (2 * k + p - 2) * math.comb(k + p - 3, k - 1) // k


def mercer_eigenvalues(kappa: Callable, p: int, k_max: int, *, nodes: int = 2000,
                       variable: str = "angle") -> np.ndarray:
    """Mercer eigenvalues ``mu_0 .. mu_{k_max}`` of ``kappa(<x, y>)`` on ``S^{p-1}``.

    Args:
      kappa: vectorised ``kappa(t)`` for ``t`` in ``[-1, 1]`` (numpy or jax).
      p: ambient dimension (``p >= 2``).
      k_max: largest degree.
      nodes: quadrature nodes.
      variable: ``"angle"`` (default): substitute ``t = cos(phi)``, so the weight
        becomes ``sin(phi)^{p-2}`` and endpoint singularities such as the
        ``sqrt(1 - t^2)`` of the arc-cosine kernels become analytic; integrate
        with Gauss-Legendre (Golub-Welsch, ``alpha = beta = 0``) on ``[0, pi]``.
        ``"t"``: Gauss-Jacobi with ``alpha = beta = (p-3)/2`` directly in ``t``
        (exact for polynomial ``kappa``; only algebraically convergent for
        ``kappa`` with a ``sqrt(1 - t^2)`` term).

    Returns:
      float64 ``(k_max + 1,)`` (normalisation in the module docstring).
    """
    if p < 2:
        raise ValueError(f"p must be >= 2, got {p}")
    if variable == "angle":
        s, w = gauss_jacobi(nodes, 0.0, 0.0)
        phi = (s + 1) * math.pi / 2
        w = w * math.pi / 2 * np.sin(phi) ** (p - 2)
        t = np.cos(phi)
    elif variable == "t":
        a = (p - 3) / 2
        t, w = gauss_jacobi(nodes, a, a)
    else:
        raise ValueError(f"variable must be 'angle' or 't', got {variable!r}")
    vals = np.asarray(kappa(t), np.float64)
    P = legendre_sphere(k_max, p, t)
    return sphere_area(p - 2) / sphere_area(p - 1) * (P * (vals * w)).sum(axis=1)


class DecayFit(NamedTuple):
    """``mu_k ~ prefactor * k^(-exponent)`` (least squares in log-log)."""

    exponent: float
    prefactor: float


def fit_decay_exponent(ks, mus) -> DecayFit:
    """Fit ``mus ~ C ks^(-a)`` by least squares on ``log mus`` vs ``log ks``.

    Args:
      ks: positive degrees; mus: positive values (same length, >= 2).

    Returns:
      :class:`DecayFit` with ``exponent = a`` and ``prefactor = C``.
    """
    ks = np.asarray(ks, np.float64)
    mus = np.asarray(mus, np.float64)
    if ks.shape != mus.shape or ks.ndim != 1 or ks.size < 2:
        raise ValueError("ks and mus must be 1-D arrays of the same length >= 2")
    if np.any(ks <= 0) or np.any(mus <= 0):
        raise ValueError("ks and mus must be positive to fit a power law")
    slope, icpt = np.polyfit(np.log(ks), np.log(mus), 1)
    return DecayFit(float(-slope), float(np.exp(icpt)))


def smoothness_gammas(activation: str | Activation, *,
                      nodes: int = 4001) -> tuple[float, float, float]:
    """``gamma_j = E[(sigma^(j)(u))^2]``, ``u ~ N(0, 1)``, ``j = 0, 1, 2``.

    Bietti & Mairal 2019, Proposition 9.

    Derivatives by autodiff of the activation; expectations by the trapezoid rule
    of :func:`ntkexp.kernels.quadrature.gaussian_rule` (float64 when x64 is on).
    """
    act = get_activation(activation)
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    z, w = gaussian_rule(nodes)
    zj, wj = jnp.asarray(z, dt), jnp.asarray(w, dt)
    f0 = act.fn
    f1 = jax.grad(lambda s: act.fn(s))
    f2 = jax.grad(f1)
    out = []
    for f in (f0, jax.vmap(f1), jax.vmap(f2)):
        v = f(zj)
        out.append(float(jnp.sum(wj * v * v)))
    return tuple(out)


def lipschitz_constant_prop9(activation: str | Activation, *, nodes: int = 4001) -> float:
    """Lipschitz constant of the kernel map on the unit sphere (Bietti & Mairal 2019, Prop. 9).

    ``L = sqrt((g0 + g1) max(1, (2 g1 + g2) / (g0 + g1)))`` with
    ``g_j = E[(sigma^(j)(u))^2]``: ``||Phi(x) - Phi(y)|| <= L ||x - y||``.
    What the formula gives: ``exp(u - 2)``: ``sqrt(3)/e ~= 0.637``;
    ``exp(u - 1)``: ``sqrt(3)``; softplus: ``~1.102`` (the seed quotes sqrt(3)
    for ``exp(u - 2)`` and ~1.75 for softplus; those are not what this formula
    gives).
    """
    g0, g1, g2 = smoothness_gammas(activation, nodes=nodes)
    if not g0 > 0:
        raise ValueError(f"Proposition 9 needs gamma_0 > 0, got {g0}")
    return math.sqrt((g0 + g1) * max(1.0, (2 * g1 + g2) / (g0 + g1)))
