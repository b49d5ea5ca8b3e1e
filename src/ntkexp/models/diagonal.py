"""The diagonal linear network of Woodworth et al. (2020) and its exact implicit bias.

Woodworth, Gunasekar, Lee, Moroshko, Savarese, Golan, Soudry & Srebro (COLT 2020),
"Kernel and Rich Regimes in Overparametrized Models", section 4: a linear
predictor written as

    f(x) = <beta, x>,   beta = w_plus^2 - w_minus^2   (elementwise squares),

with ``w_plus, w_minus in R^d`` both initialised at ``alpha * 1`` (so ``beta(0) = 0``
and ``f(0) = 0`` for every ``alpha``). Gradient flow on the square loss of an
underdetermined regression ``X beta = y`` (``X (n, d)``, ``n < d``) converges to
(their Theorem 1)

    beta_alpha = argmin Q_alpha(beta)  s.t.  X beta = y,
    Q_alpha(beta) = alpha^2 sum_i q(beta_i / alpha^2),
    q(z) = 2 - sqrt(4 + z^2) + z arcsinh(z / 2),

which tends to the minimum-l1 interpolator as ``alpha -> 0`` (rich regime) and
to the minimum-l2 interpolator as ``alpha -> inf`` (kernel regime: the tangent
kernel at initialisation is ``8 alpha^2 x.x'``, a rescaled linear kernel).

Proof sketch used by :func:`solve_q_alpha` (Woodworth et al. 2020, eq. (9)):
``d w_pm / dt = -+ 2 w_pm * X^T r(t)``, so ``w_plus w_minus = alpha^2`` for all t and
``beta(t) = 2 alpha^2 sinh(X^T nu(t))`` with ``nu(t) = -4 int_0^t r``; this is the
KKT condition ``grad Q_alpha(beta) = arcsinh(beta / (2 alpha^2)) in range(X^T)``
of the problem above. The solver here finds ``nu`` by damped Newton on the
convex dual ``D(nu) = 2 alpha^2 sum_i cosh((X^T nu)_i) - y^T nu``, independently of
any training.

Parameters as a pytree: ``{"w_plus": (d,), "w_minus": (d,)}``; ``apply_fn(params,
x) -> (n, 1)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linprog

from ntkexp.kernels.base import Kernel
from ntkexp.models.registry import register_architecture
from ntkexp.models.validation import promote

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DiagonalSpec:
    """Diagonal linear net ``beta = w_plus^2 - w_minus^2`` (hashable record).

    Attributes:
      width: number of coordinates d (must equal the input dimension).
      alpha: initialisation scale (> 0): ``w_plus(0) = w_minus(0) = alpha``.
    """

    width: int
    alpha: float = 1.0

    def __post_init__(self):
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"DiagonalSpec.width must be an integer >= 1, got {self.width!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise ValueError(f"DiagonalSpec.alpha must be a finite number > 0, got {a!r}")
        object.__setattr__(self, "alpha", float(a))


def beta_of(params) -> Array:
    """The linear predictor ``beta = w_plus^2 - w_minus^2`` ``(..., d)``."""
    return params["w_plus"] ** 2 - params["w_minus"] ** 2


@dataclasses.dataclass(frozen=True)
class DiagonalApply:
    """Pure ``apply_fn(params, x) -> (n, 1)``: ``x @ beta``; hashable."""

    spec: DiagonalSpec

    def __call__(self, params, x: Array) -> Array:
        x = jnp.asarray(x)
        d = params["w_plus"].shape[-1]
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"inputs must have shape (n, {d}), got {tuple(x.shape)}")
        x, params = promote(x, params)
        return (x @ beta_of(params))[:, None]


def init_params(spec: DiagonalSpec, dtype=None):
    """``w_plus = w_minus = alpha * 1`` (deterministic: no key needed)."""
    w = jnp.full((spec.width,), spec.alpha, dtype or jnp.float32)
    return {"w_plus": w, "w_minus": w}


def _build(spec: DiagonalSpec, in_dim: int, key, dtype=None):
    if in_dim != spec.width:
        raise ValueError(f"diagonal net: model.width ({spec.width}) must equal the input "
                         f"dimension ({in_dim})")
    return DiagonalApply(spec), init_params(spec, dtype)


def _analytic(spec: DiagonalSpec, x1, x2=None):
    """The kernel at initialisation: ``f(0) = 0`` (NNGP 0) and
    ``Theta(x, x') = <df/dw, df/dw'> = 4 alpha^2 x.x' + 4 alpha^2 x.x' = 8 alpha^2 x.x'``."""
    x2 = x1 if x2 is None else x2
    g = jnp.asarray(x1) @ jnp.asarray(x2).T
    return Kernel(nngp=jnp.zeros_like(g), ntk=8.0 * spec.alpha**2 * g)


register_architecture("diagonal", make_spec=DiagonalSpec, analytic=_analytic)(_build)


# --------------------------------------------------------------------------
# Exact theory (numpy, float64)
# --------------------------------------------------------------------------


def q(z) -> np.ndarray:
    """``q(z) = 2 - sqrt(4 + z^2) + z arcsinh(z / 2)`` (Woodworth et al. 2020, Thm. 1)."""
    z = np.asarray(z, np.float64)
    return 2.0 - np.sqrt(4.0 + z * z) + z * np.arcsinh(z / 2.0)


def q_alpha(beta, alpha: float) -> float:
    """``Q_alpha(beta) = alpha^2 sum_i q(beta_i / alpha^2)``."""
    a2 = float(alpha) ** 2
    return float(a2 * np.sum(q(np.asarray(beta, np.float64) / a2)))


def solve_q_alpha(X, y, alpha: float, *, tol: float = 1e-10, max_iter: int = 200,
                  nu0=None) -> tuple[np.ndarray, np.ndarray]:
    """``argmin Q_alpha(beta) s.t. X beta = y`` by damped Newton on the dual.

    The minimiser is ``beta = 2 alpha^2 sinh(X^T nu)`` with ``nu`` the minimiser of
    the smooth, strictly convex (``X`` of full row rank) dual
    ``D(nu) = 2 alpha^2 sum_i cosh((X^T nu)_i) - y^T nu`` (see the module docstring).

    Args:
      X: design ``(n, d)`` of full row rank, ``n <= d``.
      y: targets ``(n,)``.
      alpha: the initialisation scale (> 0).
      tol: stop when ``||X beta - y|| <= tol * max(1, ||y||)``.
      max_iter: Newton iterations at most.
      nu0: a warm start ``(n,)`` (e.g. the solution at a nearby alpha).

    Returns:
      ``(beta (d,), nu (n,))``.

    Raises:
      RuntimeError: no convergence within ``max_iter`` iterations.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64).reshape(-1)
    c = 2.0 * float(alpha) ** 2
    nu = np.zeros(X.shape[0]) if nu0 is None else np.asarray(nu0, np.float64).copy()

    def dual(v):
        with np.errstate(over="ignore"):  # an overflowing trial step is rejected (inf)
            return c * np.sum(np.cosh(X.T @ v)) - y @ v

    scale = max(1.0, float(np.linalg.norm(y)))
    for _ in range(max_iter):
        u = X.T @ nu
        beta = c * np.sinh(u)
        grad = X @ beta - y
        if np.linalg.norm(grad) <= tol * scale:
            return beta, nu
        H = (X * (c * np.cosh(u))[None, :]) @ X.T
        step = np.linalg.solve(H, grad)
        decrement = grad @ step  # the Newton decrement^2: D falls by about half of it
        t = 1.0
        if decrement > 1e-13 * max(1.0, abs(dual(nu))):  # damped phase: backtracking
            f0 = dual(nu)
            while t > 1e-12 and dual(nu - t * step) > f0 - 0.25 * t * decrement:
                t *= 0.5
        # else the quadratic phase, where D's changes are below its rounding: full steps
        nu = nu - t * step
    u = X.T @ nu
    beta = c * np.sinh(u)
    if np.linalg.norm(X @ beta - y) <= 1e3 * tol * scale:  # the rounding floor of X beta
        return beta, nu
    raise RuntimeError(f"solve_q_alpha: no convergence at alpha={alpha:g} in {max_iter} "
                       "Newton iterations")


def min_l2_interpolator(X, y) -> np.ndarray:
    """``argmin ||beta||_2 s.t. X beta = y`` = ``X^+ y`` ``(d,)``."""
    return np.linalg.lstsq(np.asarray(X, np.float64), np.asarray(y, np.float64).reshape(-1),
                           rcond=None)[0]


def min_l1_interpolator(X, y) -> np.ndarray:
    """``argmin ||beta||_1 s.t. X beta = y`` as a linear programme (``beta = u - v``,
    ``u, v >= 0``), solved by ``scipy.optimize.linprog`` (HiGHS) ``(d,)``."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64).reshape(-1)
    d = X.shape[1]
    res = linprog(np.ones(2 * d), A_eq=np.hstack([X, -X]), b_eq=y, bounds=(0, None),
                  method="highs")
    if not res.success:
        raise RuntimeError(f"min_l1_interpolator: linprog failed: {res.message}")
    return res.x[:d] - res.x[d:]
