"""The infinite-width side of training, and the diagnostics of the papers.

Kernel regression and the linearised dynamics (Jacot et al. 2018, section 5;
Lee et al. 2019, section 2; Du et al. 2019; Arora et al. 2019):

* :func:`kernel_regression`: ``f(x) = k(x, X) (K + lambda I)^(-1) y``.
* :func:`gradient_flow`: ``u(t) = y + exp(-eta t H)(u0 - y)``.
* :func:`gd_residuals` / :func:`gd_loss_curve`: discrete GD,
  ``u(k) - y = (I - eta H)^k (u0 - y)`` and ``1/2 ||(I - eta H)^k (u0 - y)||^2``.
* :func:`ntk_predict`: the trained infinite network given its initial
  function, ``f_t(x) = f0(x) + Theta(x, X) Theta^-1 (I - e^{-eta t Theta})(y - f0(X))``.
* :func:`ntk_gp`: its mean and covariance over the NNGP draw of ``f0``
  (Lee et al. 2019, eq. 16), at time t or t = infinity.
* :func:`linearize`: the first-order Taylor model in the parameters, trainable
  by :func:`ntkexp.training.train` with the same optimizer.

Scaling convention (``loss_reduction``): for the "sum" loss
``1/2 ||u - y||^2`` the function-space dynamics use ``H`` itself; for the
"mean" loss ``1/(2n) ||u - y||^2`` (Jacot et al.) they use ``H / n``, and the
loss is ``||u - y||^2 / (2n)``. Time ``t`` is ``steps * learning_rate``.

Diagnostics: :func:`kernel_drift`, :func:`pattern_flip_fraction`,
:func:`max_weight_distance`, :func:`lambda_min`, :func:`generalization_bound`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


# --------------------------------------------------------------------------
# Small linear-algebra helpers
# --------------------------------------------------------------------------


def _square(name: str, K) -> Array:
    K = jnp.asarray(K)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) matrix, got shape {tuple(K.shape)}")
    return 0.5 * (K + K.T)


def _as_2d(name: str, y, n: int) -> tuple[Array, bool]:
    y = jnp.asarray(y)
    vec = y.ndim == 1
    y2 = y[:, None] if vec else y
    if y2.ndim != 2 or y2.shape[0] != n:
        raise ValueError(
            f"{name} must have {n} rows to match the kernel, got shape {tuple(y.shape)}"
        )
    return y2, vec


def _scale(H: Array, loss_reduction: str) -> Array:
    if loss_reduction == "sum":
        return H
    if loss_reduction == "mean":
        return H / H.shape[0]
    raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")


def _check_ridge(ridge):
    if not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")


def _cho_solve(K: Array, b: Array, ridge: float) -> Array:
    K = K + ridge * jnp.eye(K.shape[0], dtype=K.dtype)
    L = jnp.linalg.cholesky(K)
    return jax.scipy.linalg.cho_solve((L, True), b)


# --------------------------------------------------------------------------
# Kernel regression and linear dynamics
# --------------------------------------------------------------------------


def kernel_regression(k_test_train, k_train_train, y, *, ridge: float = 0.0) -> Array:
    """Kernel ridge regression ``k(x, X) (K + ridge I)^(-1) y`` by Cholesky.

    Args:
      k_test_train: ``(m, n)`` kernel between test and training points.
      k_train_train: ``(n, n)`` positive-definite training kernel.
      y: ``(n,)`` or ``(n, k)`` targets.
      ridge: ``lambda >= 0``.

    Returns:
      ``(m,)`` or ``(m, k)`` predictions (the t = infinity limit of the NTK
      dynamics with ``f0 = 0``; Arora et al. 2019, Theorem 3.2).
    """
    _check_ridge(ridge)
    K = _square("k_train_train", k_train_train)
    kx = jnp.asarray(k_test_train)
    if kx.ndim != 2 or kx.shape[1] != K.shape[0]:
        raise ValueError(f"k_test_train must have shape (m, {K.shape[0]}), got {tuple(kx.shape)}")
    y2, vec = _as_2d("y", y, K.shape[0])
    out = kx @ _cho_solve(K, y2.astype(K.dtype), ridge)
    return out[:, 0] if vec else out


def gradient_flow(H, u0, y, t, *, learning_rate: float = 1.0, loss_reduction: str = "sum") -> Array:
    """Training outputs under gradient flow, ``u(t) = y + exp(-eta t H_eff)(u0 - y)``.

    Args:
      H: ``(n, n)`` NTK / Gram matrix on the training points.
      u0: ``(n,)`` or ``(n, k)`` initial outputs.
      y: targets, same shape as ``u0``.
      t: scalar or ``(T,)`` times (``steps``; multiplied by ``learning_rate``).
      learning_rate: eta.
      loss_reduction: "sum" (``H_eff = H``) or "mean" (``H_eff = H / n``).

    Returns:
      ``u(t)`` of shape ``u0.shape`` (scalar t) or ``(T,) + u0.shape``
      (via the eigendecomposition ``H = V diag(l) V^T``; Du et al. 2019, eq. 4).
    """
    H = _scale(_square("H", H), loss_reduction)
    r0, vec = _as_2d("u0 - y", jnp.asarray(u0) - jnp.asarray(y), H.shape[0])
    lam, V = jnp.linalg.eigh(H)
    t = jnp.asarray(t, H.dtype)
    decay = jnp.exp(-learning_rate * t[..., None] * lam.reshape((1,) * t.ndim + lam.shape))
    proj = V.T @ r0  # (n, k)
    r = jnp.einsum("ij,...j,jk->...ik", V, decay, proj)
    y2 = jnp.asarray(y).reshape(r0.shape).astype(r.dtype)
    u = y2.reshape((1,) * (r.ndim - 2) + y2.shape) + r
    return u[..., 0] if vec else u


def gd_residuals(H, r0, steps: int, *, learning_rate: float, loss_reduction: str = "sum") -> Array:
    """Discrete-GD residuals ``r_k = (I - eta H_eff)^k r_0`` for ``k = 0..steps``.

    Args:
      H: ``(n, n)`` Gram matrix.
      r0: ``(n,)`` or ``(n, k)`` initial residual ``u0 - y``.
      steps: last k.
      learning_rate: eta.
      loss_reduction: "sum" or "mean" (``H_eff = H / n``).

    Returns:
      ``(steps + 1,) + r0.shape`` (Arora et al. 2019, Theorem 4.1).
    """
    H = _scale(_square("H", H), loss_reduction)
    r, vec = _as_2d("r0", r0, H.shape[0])
    lam, V = jnp.linalg.eigh(H)
    k = jnp.arange(steps + 1, dtype=H.dtype)[:, None]
    base = (1.0 - learning_rate * lam)[None, :]
    # (1 - eta l)^k with the sign kept for negative bases (eta l > 1)
    powk = jnp.sign(base) ** k * jnp.abs(base) ** k  # (steps + 1, n)
    out = jnp.einsum("ij,kj,jl->kil", V, powk, V.T @ r.astype(H.dtype))
    return out[..., 0] if vec else out


def gd_loss_curve(
    H, u0, y, steps: int, *, learning_rate: float, loss_reduction: str = "sum"
) -> Array:
    """Predicted loss ``1/2 ||(I - eta H_eff)^k (u0 - y)||^2`` (divided by n for "mean").

    Returns:
      ``(steps + 1,)``, scaled like :func:`ntkexp.training.train`'s losses.
    """
    r = gd_residuals(H, jnp.asarray(u0) - jnp.asarray(y), steps, learning_rate=learning_rate,
                     loss_reduction=loss_reduction)
    sq = 0.5 * jnp.sum(r.reshape(r.shape[0], -1) ** 2, axis=1)
    return sq / H.shape[0] if loss_reduction == "mean" else sq


def _transfer(Theta: Array, t, steps, learning_rate: float, loss_reduction: str) -> Array:
    """``Theta^-1 (I - e^{-eta t Theta_eff})`` (or the discrete / t = inf version), ``(n, n)``.

    ``Theta`` is the unscaled kernel; for "mean" ``Theta_eff = Theta / n`` and
    the ``Theta^-1`` factor cancels the 1/n, so the result is
    ``Theta^-1 (I - decay(Theta_eff))``.
    """
    if steps is not None and t is not None:
        raise ValueError("give either t (gradient flow) or steps (discrete GD), not both")
    if steps is None and (t is None or (isinstance(t, float) and math.isinf(t))):
        return None  # t = infinity: plain Theta^-1
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    lam, V = jnp.linalg.eigh(Theta)
    scale = 1.0 / Theta.shape[0] if loss_reduction == "mean" else 1.0
    lam_eff = lam * scale
    if steps is not None:
        base = 1.0 - learning_rate * lam_eff
        decay = jnp.sign(base) ** steps * jnp.abs(base) ** steps
        small = learning_rate * scale * steps  # limit of (1 - decay) / lam as lam -> 0
    else:
        decay = jnp.exp(-learning_rate * jnp.asarray(t, Theta.dtype) * lam_eff)
        small = learning_rate * scale * t
    safe = jnp.where(lam > 0, lam, 1.0)
    g = jnp.where(lam > 0, (1.0 - decay) / safe, small)
    return (V * g[None, :]) @ V.T


def ntk_predict(
    ntk_test_train,
    ntk_train_train,
    y,
    f0_test,
    f0_train,
    *,
    t: float | None = None,
    steps: int | None = None,
    learning_rate: float = 1.0,
    loss_reduction: str = "mean",
) -> Array:
    """The trained infinite-width network given its initial function (Jacot et al. 2018, sec. 5).

    ``f_t(x) = f0(x) + Theta(x, X) Theta^-1 (I - e^{-eta t Theta_eff}) (y - f0(X))``;
    with ``steps`` the discrete-GD factor ``I - (I - eta Theta_eff)^steps``;
    with neither (or ``t = inf``), ``Theta^-1``.

    Args:
      ntk_test_train: ``(m, n)``; ntk_train_train: ``(n, n)``.
      y: ``(n,)``/``(n, k)`` targets; f0_test ``(m,)``/``(m, k)`` and
        f0_train the initial outputs on test and training points.
      t, steps, learning_rate, loss_reduction: time, see module docstring.

    Returns:
      predictions on the test points, shaped like ``f0_test``.
    """
    Theta = _square("ntk_train_train", ntk_train_train)
    y2, vec = _as_2d("y", y, Theta.shape[0])
    f0tr, _ = _as_2d("f0_train", f0_train, Theta.shape[0])
    kx = jnp.asarray(ntk_test_train)
    f0te = jnp.asarray(f0_test).reshape(kx.shape[0], -1)
    res = (y2 - f0tr).astype(Theta.dtype)
    T = _transfer(Theta, t, steps, learning_rate, loss_reduction)
    coef = _cho_solve(Theta, res, 0.0) if T is None else T @ res
    out = f0te + kx @ coef
    return out[:, 0] if vec else out


def ntk_gp(
    ntk_test_train,
    ntk_train_train,
    nngp_test_train,
    nngp_train_train,
    nngp_test_test,
    y,
    *,
    t: float | None = None,
    steps: int | None = None,
    learning_rate: float = 1.0,
    loss_reduction: str = "mean",
) -> tuple[Array, Array]:
    """Mean and covariance of the trained infinite network, f0 ~ GP(0, NNGP).

    Lee et al. 2019, eq. 16.

    With ``T = Theta(x, X) Theta^-1 (I - e^{-eta t Theta_eff})`` (``Theta(x, X) Theta^-1``
    at t = infinity; Jacot et al. 2018, sec. 5)::

        mean(x)   = T y
        cov(x, x') = K(x, x') + T K(X, X) T'^T - T K(X, x') - K(x, X) T'^T

    Args:
      ntk_*: NTK blocks ``(m, n)``, ``(n, n)``; nngp_*: NNGP blocks
        ``(m, n)``, ``(n, n)``, ``(m, m)``; y: ``(n,)`` or ``(n, k)``.
      t, steps, learning_rate, loss_reduction: as in :func:`ntk_predict`.

    Returns:
      ``(mean (m,) or (m, k), cov (m, m))`` (cov is per output).
    """
    Theta = _square("ntk_train_train", ntk_train_train)
    y2, vec = _as_2d("y", y, Theta.shape[0])
    kx = jnp.asarray(ntk_test_train)
    Tr = _transfer(Theta, t, steps, learning_rate, loss_reduction)
    if Tr is None:
        T = _cho_solve(Theta, kx.T, 0.0).T
    else:
        T = kx @ Tr
    mean = T @ y2.astype(Theta.dtype)
    Kxx = jnp.asarray(nngp_test_test)
    KxX = jnp.asarray(nngp_test_train)
    KXX = _square("nngp_train_train", nngp_train_train)
    cross = T @ KxX.T
    cov = Kxx + T @ KXX @ T.T - cross - cross.T
    cov = 0.5 * (cov + cov.T)
    return (mean[:, 0] if vec else mean), cov


# --------------------------------------------------------------------------
# Linearised network
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearizedApply:
    """``f_lin(p, x) = f(theta0, x) + J(theta0, x) (theta - theta0)``, ``p = {"theta", "theta0"}``.

    ``theta0`` is read through ``stop_gradient`` (and masked as frozen), so it
    never moves; vmapping over initialisations works because the expansion
    point is part of the parameters. Hashable (compiled steps are reused).
    """

    apply_fn: Callable

    def __call__(self, params, x):
        theta, theta0 = params["theta"], jax.lax.stop_gradient(params["theta0"])
        delta = jax.tree_util.tree_map(lambda a, b: a - b, theta, theta0)
        out, tangent = jax.jvp(lambda p: self.apply_fn(p, x), (theta0,), (delta,))
        return out + tangent

    @staticmethod
    def trainable_mask(params):
        return {"theta": True, "theta0": False}


def linearize(apply_fn: Callable, params0) -> tuple[LinearizedApply, Any]:
    """First-order Taylor model of ``apply_fn`` around ``params0`` (Lee et al. 2019, eq. 6).

    Returns:
      ``(apply_lin, params_lin)`` with ``params_lin = {"theta": params0,
      "theta0": params0}``; train it with ``train(apply_lin, params_lin, ...)``
      and the same optimizer as the network (``ensemble=True`` works with
      stacked ``params0``). The trained parameters are
      ``result.params["theta"]``.
    """
    return LinearizedApply(apply_fn), {"theta": params0, "theta0": params0}


# --------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------


def kernel_drift(K_t, K_0) -> Array:
    """Relative kernel change ``||K_t - K_0||_F / ||K_0||_F`` (Jacot et al. 2018, Fig. 1)."""
    K_t, K_0 = jnp.asarray(K_t), jnp.asarray(K_0)
    if K_t.shape != K_0.shape:
        raise ValueError(f"kernels differ in shape: {tuple(K_t.shape)} vs {tuple(K_0.shape)}")
    return jnp.linalg.norm(K_t - K_0) / jnp.linalg.norm(K_0)


def hidden_preactivations(apply_fn, params, x) -> list[Array] | None:
    """Pre-activations of every hidden layer, ``[(n, units)]``, or None if unknown.

    Asks the model protocol: ``apply_fn.preactivations(params, x)`` (layer
    compositions of :mod:`ntkexp.layers`, the MLP, the two-layer net).
    """
    if hasattr(apply_fn, "preactivations"):
        return apply_fn.preactivations(params, x)
    return None


def hidden_weights(apply_fn, params) -> Array | None:
    """Incoming weights of the first hidden layer's units, ``(m, d)``, or None."""
    if hasattr(apply_fn, "hidden_weights"):
        return apply_fn.hidden_weights(params)
    return None


def supports_patterns(apply_fn) -> bool:
    """True when :func:`pattern_flip_fraction` and :func:`max_weight_distance` apply.

    That is when the model exposes pre-activations and first-layer weights and
    has at least one hidden activation (checked on abstract shapes only).
    """
    if not (hasattr(apply_fn, "preactivations") and hasattr(apply_fn, "hidden_weights")):
        return False
    probe = getattr(apply_fn, "has_hidden_units", None)
    return True if probe is None else bool(probe)


def pattern_flip_fraction(apply_fn, params_t, params_0, x) -> Array:
    """Fraction of (point, hidden unit) pairs whose activation pattern changed.

    Du et al. 2019, Fig. 1b:

    ``sum_{i,r} 1{sign(z_ir(t)) != sign(z_ir(0))} / (n * units)``, over all
    hidden layers, with ``z`` the pre-activations on ``x (n, d)``; a unit is
    "on" when ``z > 0``.
    """
    zt = hidden_preactivations(apply_fn, params_t, x)
    z0 = hidden_preactivations(apply_fn, params_0, x)
    if zt is None:
        raise TypeError(f"activation patterns are not known for {type(apply_fn).__name__}")
    flips = sum(jnp.sum((a > 0) != (b > 0)) for a, b in zip(zt, z0, strict=True))
    total = sum(a.size for a in zt)
    return flips / total


def max_weight_distance(apply_fn, params_t, params_0) -> Array:
    """``max_r ||w_r(t) - w_r(0)||_2`` over the first hidden layer (Du et al. 2019, Fig. 1c)."""
    wt, w0 = hidden_weights(apply_fn, params_t), hidden_weights(apply_fn, params_0)
    if wt is None:
        raise TypeError(f"hidden weights are not known for {type(apply_fn).__name__}")
    return jnp.max(jnp.linalg.norm(wt - w0, axis=1))


def lambda_min(K) -> Array:
    """Smallest eigenvalue of a symmetric kernel matrix (``lambda_0`` of Du et al. 2019)."""
    return jnp.linalg.eigvalsh(_square("K", K))[0]


def generalization_bound(H, y) -> Array:
    """``sqrt(2 y^T H^-1 y / n)`` (Arora et al. 2019, Theorem 5.1; Zhang et al. 2019, eq. 18)."""
    H = _square("H", H)
    y = jnp.asarray(y).astype(H.dtype)
    if y.shape != (H.shape[0],):
        raise ValueError(f"y must have shape ({H.shape[0]},), got {tuple(y.shape)}")
    return jnp.sqrt(2.0 * y @ _cho_solve(H, y, 0.0) / H.shape[0])
