"""Finite-width corrections at initialisation: theory values and their estimators.

Two 1/n effects of a deep MLP at initialisation, at one input ``x``:

* **NTK fluctuations** (Hanin & Nica 2019, "Finite Depth and Width Corrections
  to the Neural Tangent Kernel", ICLR 2020, Thm. 1): for a ReLU net with
  He-initialised weights (variance ``2 / fan_in``) and zero biases, the
  normalised second moment of the NTK diagonal obeys
  ``E[K(x,x)^2] / E[K(x,x)]^2 = exp(5 beta) (1 + O(sum_l 1/n_l^2))`` with
  ``beta = sum over hidden layers of 1/n_l``. :func:`moment_ratio` estimates
  the left side from samples over initialisations, :func:`fit_through_origin`
  fits the coefficient ``c`` of ``log ratio = c beta``.

* **The four-point vertex** (Roberts, Yaida & Hanin 2022, "The Principles of
  Deep Learning Theory" (PDLT), ch. 4-5): given layer ``l``, a preactivation
  of layer ``l + 1`` is exactly Gaussian with the random variance
  ``G_hat = C_b + C_W / n_l * sum_j sigma(z_j)^2``, so its fourth cumulant is
  ``E[z^4] - 3 E[z^2]^2 = 3 Var(G_hat) = 3 V / n`` (PDLT eq. 4.59 with all
  neuron indices equal). The normalised vertex ``V / (n G^2) =
  Var(G_hat) / E[G_hat]^2`` is estimated by :func:`normalized_variance` from
  ``G_hat`` itself (a Rao-Blackwellised estimator: no fourth power of a
  Gaussian is averaged). To leading order in 1/n it obeys the recursion
  (PDLT eqs. 4.90-4.91, derived again in :func:`vertex_recursion`)

      G' = C_b + C_W <sigma^2>_G,
      V' = C_W^2 (<sigma^4>_G - <sigma^2>_G^2) + chi^2 V,
      chi = dG'/dG = C_W d<sigma^2>_G/dG = C_W <sigma^2 (z^2 - G)> / (2 G^2),

  with ``V = 0`` at the first layer (its preactivations are Gaussian for a
  fixed input). For ReLU at criticality (``C_W = 2, C_b = 0``):
  ``<sigma^2> = G/2, <sigma^4> = 3 G^2 / 2``, so ``chi = 1`` and
  ``V' / G^2 = 5 + V / G^2``: the normalised vertex at the output of a net
  with ``d`` hidden layers is ``5 d / n``, slope 5 in ``d / n``. For tanh at
  ``C_W = 1, C_b = 0`` (the ``K* = 0`` universality class) ``G`` decays like
  ``1 / (2 l)`` and the slope tends to 2/3 (PDLT sec. 5.3);
  :func:`vertex_slope` computes it from the recursion, not as a constant.

All functions are float64 numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ntkexp.activations import get_activation
from ntkexp.kernels.quadrature import gaussian_rule

QUADRATURE_NODES = 2001


# --------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------


def moment_ratio(samples, axis: int = -1) -> np.ndarray:
    """``mean(K^2) / mean(K)^2`` over ``axis`` (the Hanin-Nica ratio, biased but
    consistent: for a log-normal ``K`` with log-variance ``s^2`` it tends to
    ``exp(s^2)``)."""
    k = np.asarray(samples, np.float64)
    return np.mean(k * k, axis=axis) / np.mean(k, axis=axis) ** 2


def normalized_variance(samples, axis: int = -1) -> np.ndarray:
    """``Var(G) / mean(G)^2`` over ``axis`` (unbiased variance, ``ddof=1``): the
    normalised four-point vertex ``V / (n G^2)`` when ``samples`` are the
    conditional variances ``G_hat`` over initialisations."""
    g = np.asarray(samples, np.float64)
    return np.var(g, axis=axis, ddof=1) / np.mean(g, axis=axis) ** 2


def fit_through_origin(x, y, mask=None) -> float:
    """Least-squares slope ``c`` of ``y = c x`` (no intercept) over ``mask``:
    ``sum x y / sum x^2``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if mask is not None:
        x, y = x[mask], y[mask]
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size == 0 or not np.any(x != 0):
        return float("nan")
    return float(np.sum(x * y) / np.sum(x * x))


def fit_linear(X, y, mask=None) -> np.ndarray:
    """Least-squares coefficients ``b`` of ``y = X b`` (no intercept unless a column of
    ``X`` is constant) over ``mask`` and the finite ``y``: ``(p,)``; a 1-d ``X`` is one
    regressor (:func:`fit_through_origin`)."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if mask is not None:
        X, y = X[mask], y[mask]
    ok = np.isfinite(y)
    X, y = X[ok], y[ok]
    if X.shape[0] < X.shape[1]:
        return np.full(X.shape[1], np.nan)
    return np.linalg.lstsq(X, y, rcond=None)[0]


def bootstrap_fit(samples, x, statistic: Callable, transform: Callable, mask=None, *,
                  resamples: int = 1000, seed: int = 0, level: float = 0.95):
    """A slope fitted over cells and its percentile bootstrap interval.

    ``x`` may be ``(C, p)``: several regressors (:func:`fit_linear`); the slope
    reported (and bootstrapped) is the coefficient of the first column.

    Each cell ``i`` holds ``M`` independent samples over initialisations
    (``samples (C, M)``). The point estimate fits ``transform(statistic(samples_i))``
    against ``x_i`` through the origin (:func:`fit_through_origin`); each bootstrap
    replicate resamples the ``M`` initialisations of every cell independently with
    replacement and refits (Efron & Tibshirani 1993, ch. 13, percentile interval).

    Args:
      samples: ``(C, M)`` per-cell samples.
      x: ``(C,)`` regressor (``beta`` or ``depth / width``) or ``(C, p)``.
      statistic: ``(C, M) -> (C,)``, e.g. :func:`moment_ratio` over the last axis.
      transform: applied to the statistic before fitting (``np.log``, identity).
      mask: ``(C,)`` cells used in the fit (default all).

    Returns:
      ``(slope, (lo, hi), replicates (resamples,))``.
    """
    s = np.asarray(samples, np.float64)
    C, M = s.shape
    slope = float(fit_linear(x, transform(statistic(s)), mask)[0])
    rng = np.random.default_rng(seed)
    reps = np.empty(resamples)
    rows = np.arange(C)[:, None]
    for b in range(resamples):
        idx = rng.integers(0, M, size=(C, M))
        reps[b] = fit_linear(x, transform(statistic(s[rows, idx])), mask)[0]
    a = (1 - level) / 2
    lo, hi = np.nanquantile(reps, [a, 1 - a])
    return slope, (float(lo), float(hi)), reps


# --------------------------------------------------------------------------
# Theory: the leading-order 1/n recursion of the preactivation statistics
# --------------------------------------------------------------------------


def _gauss_mean(fn, G: float, nodes: int = QUADRATURE_NODES) -> float:
    """``<fn(z)>`` for ``z ~ N(0, G)`` (trapezoid rule of ``kernels.quadrature``)."""
    z, w = gaussian_rule(nodes)
    return float(np.sum(w * fn(np.sqrt(G) * z)))


def vertex_recursion(activation: str, C_W: float, C_b: float, G1: float, layers: int):
    """The leading-order kernel ``G^(l)`` and normalised vertex ``V^(l) / G^(l)^2``
    for ``l = 1 .. layers`` (PDLT eqs. 4.90-4.91; see the module docstring).

    Layer 1 is the first preactivation, ``G^(1) = G1`` (``C_b + C_W |x|^2 / n_0``)
    and ``V^(1) = 0``; a net with ``d`` hidden layers has its output at ``l = d + 1``,
    where the normalised vertex of width-``n`` layers is ``V / (n G^2)``: this
    function returns ``V / G^2``, to be divided by ``n``.

    Returns:
      ``(G (layers,), V / G^2 (layers,))``, float64.
    """
    act = get_activation(activation)

    def sig(z):
        return np.asarray(act(z), np.float64)

    G, V = float(G1), 0.0
    Gs, rs = [G], [0.0]
    for _ in range(layers - 1):
        m2 = _gauss_mean(lambda z: sig(z) ** 2, G)
        m4 = _gauss_mean(lambda z: sig(z) ** 4, G)
        dm2 = _gauss_mean(lambda z, G=G: sig(z) ** 2 * (z * z - G), G) / (2 * G * G)
        chi = C_W * dm2
        V = C_W ** 2 * (m4 - m2 * m2) + chi * chi * V
        G = C_b + C_W * m2
        Gs.append(G)
        rs.append(V / (G * G))
    return np.asarray(Gs), np.asarray(rs)


def vertex_slope(activation: str, C_W: float, C_b: float = 0.0, G1: float = 1.0,
                 layers: int = 4000) -> float:
    """The asymptotic slope of ``V^(l) / (n G^2)`` in ``l / n`` from
    :func:`vertex_recursion`: ``(r(L) - r(L/2)) / (L/2)`` at ``L = layers``
    (ReLU at ``C_W = 2``: 5 exactly; tanh at ``C_W = 1``: tends to 2/3)."""
    _, r = vertex_recursion(activation, C_W, C_b, G1, layers)
    h = layers // 2
    return float((r[-1] - r[h - 1]) / (layers - h))


def relu_output_vertex_exact(widths) -> float:
    """Exact ``Var(G_hat) / E[G_hat]^2`` at the output of a zero-bias ReLU net with
    ``C_W = 2`` and hidden widths ``widths`` (any input).

    Given layer ``l`` the next preactivations are ``sqrt(G_hat_l) xi_j``, ``xi_j``
    iid ``N(0, 1)``, so ``G_hat_{l+1} = G_hat_l * (2 / n) sum_j relu(xi_j)^2``: a
    product of independent factors of mean 1 and second moment
    ``(4 / n^2)(n Var(relu(xi)^2) + n^2 / 4) = 1 + 5 / n`` (``E relu^2 = 1/2``,
    ``E relu^4 = 3/2``). Hence ``prod_l (1 + 5 / n_l) - 1``, whose first order is
    the recursion's ``5 sum 1/n_l``."""
    return float(np.prod([1.0 + 5.0 / n for n in widths]) - 1.0)


__all__ = ["bootstrap_fit", "fit_linear", "fit_through_origin", "moment_ratio",
           "normalized_variance", "relu_output_vertex_exact", "vertex_recursion",
           "vertex_slope"]
