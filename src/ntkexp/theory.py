"""The infinite-width side of training, and the diagnostics of the papers.

Kernel regression and the linearised dynamics (Jacot et al. 2018, section 5;
Lee et al. 2019, section 2; Du et al. 2019; Arora et al. 2019):

* :func:`kernel_regression`: ``f(x) = k(x, X) (K + lambda I)^(-1) y``, in
  float64 by a checked Cholesky factorisation (:func:`cholesky_solve`) or by
  matrix-free conjugate gradients (:func:`cg_solve`, over arrays, ``.npy``
  memory maps or kernel tiles); :func:`precision_gap` measures what float32
  would change (Lee et al. 2020, sec. 3.4).
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

Singular systems: never NaN and never a silent jitter. A system whose Cholesky
factorisation fails, or whose condition number exceeds ``1 / RCOND_MIN``
(~4.5e12), raises :class:`SingularKernelError` naming ``ridge`` (e.g. a
duplicated training point with ``ridge=0``). The check runs on concrete
inputs; under ``jax.jit`` the JAX Cholesky path runs unchecked.

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
import numpy as np

from ntkexp.kernels.tiling import _pad

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
# Float64 solves: Cholesky with a singularity check, conjugate gradients
# --------------------------------------------------------------------------

#: A system whose reciprocal condition number (LAPACK ``dpocon``, 1-norm) is below
#: this is singular to float64 working precision (condition number above ~4.5e12,
#: where a solve keeps fewer than ~4 significant digits).
RCOND_MIN = 1e3 * float(np.finfo(np.float64).eps)


class SingularKernelError(ValueError):
    """A kernel system is singular (or not positive definite) to working precision.

    ntkexp never adds a jitter silently: the message names the ``ridge`` to pass.
    """


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """What a float64 kernel solve did.

    Attributes:
      method: ``"cholesky"`` or ``"cg"``.
      n: system size.
      ridge: the ridge added to the diagonal.
      condition_number: 1-norm condition number estimate of ``K + ridge I``
        (Cholesky: LAPACK ``dpocon``; CG: from the Lanczos tridiagonal of the
        CG coefficients, of the Jacobi-preconditioned system, first column).
      iterations: CG iterations (None for Cholesky).
      relative_residual: ``max_j ||(K + ridge I) a_j - y_j|| / ||y_j||``.
    """

    method: str
    n: int
    ridge: float
    condition_number: float | None
    iterations: int | None
    relative_residual: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _singular(name: str, n: int, ridge: float, why: str, diag_mean: float) -> SingularKernelError:
    hint = 1e-6 * diag_mean if diag_mean > 0 else 1e-6
    return SingularKernelError(
        f"{name} ({n} x {n}) with ridge = {ridge:g} is singular or not positive definite to "
        f"float64 precision ({why}), so the solve would return NaN or noise; pass ridge > 0 "
        f"(for example ridge = {hint:.3g}, 1e-6 x its mean diagonal) or remove duplicated "
        "training points")


def cholesky_solve(K, B, *, ridge: float = 0.0, name: str = "k_train_train"
                   ) -> tuple[np.ndarray, SolveInfo]:
    """``(K + ridge I)^{-1} B`` in float64 by Cholesky, refusing singular systems.

    Args:
      K: ``(n, n)`` symmetric positive semi-definite (any float dtype, or a numpy
        memory map); symmetrised as ``(K + K^T) / 2``.
      B: ``(n,)`` or ``(n, k)`` right-hand sides.
      ridge: ``lambda >= 0`` added to the diagonal.
      name: the matrix's name in error messages.

    Returns:
      ``(X float64 shaped like B, SolveInfo)``.

    Raises:
      SingularKernelError: Cholesky fails, or the condition number exceeds
        ``1 / RCOND_MIN`` (naming ``ridge``; never NaN).
      ValueError: K contains NaN or inf.
    """
    import scipy.linalg

    _check_ridge(ridge)
    A = np.array(K, dtype=np.float64, copy=True)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) matrix, got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError(f"{name} contains NaN or infinite values")
    n = A.shape[0]
    A += A.T
    A *= 0.5
    diag_mean = float(np.mean(np.diag(A))) if n else 0.0
    A[np.diag_indices(n)] += ridge
    anorm = float(np.max(np.sum(np.abs(A), axis=0))) if n else 0.0
    Bf = np.asarray(B, np.float64)
    try:
        c, lower = scipy.linalg.cho_factor(A, lower=True, overwrite_a=False,
                                           check_finite=False)
    except np.linalg.LinAlgError:
        raise _singular(name, n, ridge, "Cholesky factorisation failed", diag_mean) from None
    rcond, info = scipy.linalg.lapack.dpocon(c, anorm, uplo="L")
    if info != 0 or not rcond >= RCOND_MIN:
        cond = 1.0 / rcond if rcond > 0 else float("inf")
        raise _singular(name, n, ridge, f"condition number ~ {cond:.2g} > "
                        f"{1 / RCOND_MIN:.2g}", diag_mean)
    X = scipy.linalg.cho_solve((c, lower), Bf, check_finite=False)
    A[np.diag_indices(n)] -= ridge  # residual against K + ridge I, without a second copy
    R = A @ X.reshape(n, -1) + ridge * X.reshape(n, -1) - Bf.reshape(n, -1)
    res = float(np.max(np.linalg.norm(R, axis=0)
                       / np.maximum(np.linalg.norm(Bf.reshape(n, -1), axis=0), 1e-300)))
    return X, SolveInfo("cholesky", n, float(ridge), float(1.0 / rcond), None, res)


def array_operator(K, *, block_rows: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``V -> K @ V`` in float64, reading ``K`` (an array or ``.npy`` memory map) in
    blocks of ``block_rows`` rows (default: about 64 MiB of float64 per block), so
    a kernel on disk is never loaded whole."""
    n = K.shape[0]
    rows = block_rows or max(1, (64 * 2**20) // (8 * max(K.shape[1], 1)))

    def mv(V):
        V = np.asarray(V, np.float64)
        out = np.empty((n,) + V.shape[1:], np.float64)
        for i in range(0, n, rows):
            out[i:i + rows] = np.asarray(K[i:i + rows], np.float64) @ V
        return out

    mv.diagonal = lambda: np.array([float(K[i, i]) for i in range(n)])
    mv.shape = tuple(K.shape)
    return mv


def tile_operator(fn, x, *, args: tuple = (), tile_size: int = 256, leaf: str | int = "ntk"
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """Matrix-free ``V -> K(x, x) @ V``: every product recomputes the kernel tile by tile
    with the tile function ``fn(a, b, *args)`` (see :mod:`ntkexp.kernels.tiling`), so
    memory is one tile, never ``n x n``. ``leaf`` picks the output of a ``Kernel``
    (``"nngp"``/``"ntk"``) or a leaf index."""
    xn = np.asarray(x)
    n = xn.shape[0]
    t = min(int(tile_size), n)
    jfn = jax.jit(fn)
    starts = list(range(0, n, t))

    def pick(res):
        if isinstance(leaf, str) and hasattr(res, leaf):
            return getattr(res, leaf)
        leaves = jax.tree_util.tree_leaves(res)
        return leaves[leaf if isinstance(leaf, int) else 0]

    def tile(a, b):
        v = np.asarray(pick(jfn(_pad(xn, a, t), _pad(xn, b, t), *args)), np.float64)
        return v[:min(t, n - a), :min(t, n - b)]

    def mv(V):
        V = np.asarray(V, np.float64)
        out = np.zeros((n,) + V.shape[1:], np.float64)
        for i, a in enumerate(starts):
            for b in starts[i:]:
                T = tile(a, b)
                out[a:a + T.shape[0]] += T @ V[b:b + T.shape[1]]
                if b != a:
                    out[b:b + T.shape[1]] += T.T @ V[a:a + T.shape[0]]
        return out

    mv.diagonal = lambda: np.concatenate([np.diag(tile(a, a)) for a in starts])
    mv.shape = (n, n)
    return mv


def cg_solve(K, B, *, ridge: float = 0.0, tol: float = 1e-10, maxiter: int | None = None,
             name: str = "k_train_train") -> tuple[np.ndarray, SolveInfo]:
    """``(K + ridge I)^{-1} B`` in float64 by Jacobi-preconditioned conjugate gradients.

    Matrix-free: ``K`` is an array, a ``.npy`` memory map (read in row blocks,
    :func:`array_operator`) or a callable ``V -> K @ V`` (e.g. :func:`tile_operator`),
    so kernels that do not fit in memory as one matrix can be solved. All
    columns of ``B`` run together (one product per iteration).

    Args:
      tol: stop when every column's relative residual is below ``tol``.
      maxiter: at most this many iterations (default ``10 n``).

    Returns:
      ``(X, SolveInfo)``; ``condition_number`` is the Lanczos estimate from the
      CG coefficients (of the preconditioned system).

    Raises:
      SingularKernelError: a non-positive curvature ``p^T A p`` (singular or
        indefinite system) or no convergence within ``maxiter`` (naming ``ridge``).
    """
    _check_ridge(ridge)
    mv = K if callable(K) else array_operator(K)
    Bf = np.asarray(B, np.float64)
    vec = Bf.ndim == 1
    B2 = Bf[:, None] if vec else Bf
    n = B2.shape[0]
    if hasattr(mv, "diagonal"):
        diag = np.asarray(mv.diagonal(), np.float64) + ridge
    else:
        diag = np.ones(n)
    diag_mean = float(np.mean(diag)) - ridge
    Minv = np.where(diag > 0, 1.0 / np.where(diag > 0, diag, 1.0), 1.0)[:, None]

    def A(V):
        return mv(V) + ridge * V

    X = np.zeros_like(B2)
    R = B2.copy()
    bnorm = np.maximum(np.linalg.norm(B2, axis=0), 1e-300)
    Z = Minv * R
    P = Z.copy()
    rz = np.sum(R * Z, axis=0)
    alphas, betas = [], []
    maxiter = maxiter or 10 * n
    it = 0
    res = np.linalg.norm(R, axis=0) / bnorm
    while np.max(res) > tol and it < maxiter:
        AP = A(P)
        pap = np.sum(P * AP, axis=0)
        active = res > tol
        if np.any(pap[active] <= 0):
            raise _singular(name, n, ridge, "conjugate gradients met non-positive curvature",
                            diag_mean)
        alpha = np.where(active, rz / np.where(pap > 0, pap, 1.0), 0.0)
        X += alpha * P
        R -= alpha * AP
        Z = Minv * R
        rz_new = np.sum(R * Z, axis=0)
        beta = np.where(active, rz_new / np.where(rz > 0, rz, 1.0), 0.0)
        P = Z + beta * P
        alphas.append(float(alpha[0]))
        betas.append(float(beta[0]))
        rz = rz_new
        it += 1
        res = np.linalg.norm(R, axis=0) / bnorm
    if np.max(res) > tol:
        raise _singular(name, n, ridge, f"conjugate gradients did not reach tol {tol:g} in "
                        f"{it} iterations (residual {np.max(res):.2g})", diag_mean)
    cond = _lanczos_condition(alphas, betas)
    true_res = np.linalg.norm(A(X) - B2, axis=0) / bnorm
    info = SolveInfo("cg", n, float(ridge), cond, it, float(np.max(true_res)))
    return (X[:, 0] if vec else X), info


def _lanczos_condition(alphas, betas) -> float | None:
    """``lambda_max / lambda_min`` of the Lanczos tridiagonal built from CG's
    ``alpha_j, beta_j`` (Saad, "Iterative methods for sparse linear systems", 6.7.3)."""
    k = len(alphas)
    if k == 0 or alphas[0] == 0:
        return None
    d = np.empty(k)
    e = np.empty(max(k - 1, 0))
    d[0] = 1.0 / alphas[0]
    for j in range(1, k):
        if alphas[j] == 0 or alphas[j - 1] == 0:
            k = j
            d, e = d[:k], e[:k - 1]
            break
        d[j] = 1.0 / alphas[j] + betas[j - 1] / alphas[j - 1]
        e[j - 1] = np.sqrt(max(betas[j - 1], 0.0)) / alphas[j - 1]
    T = np.diag(d) + np.diag(e, 1) + np.diag(e, -1)
    lam = np.linalg.eigvalsh(T)
    return float(lam[-1] / lam[0]) if lam[0] > 0 else float("inf")


def _matmul_rows(A, X, block_rows: int | None = None) -> np.ndarray:
    """``A @ X`` in float64 (``A`` an array, memory map or callable ``V -> A @ V``)."""
    if callable(A):
        return np.asarray(A(X), np.float64)
    return array_operator(A, block_rows=block_rows)(X)


def _out_dtype(*arrays):
    dts = [a.dtype for a in arrays if hasattr(a, "dtype")
           and np.issubdtype(np.dtype(a.dtype), np.floating)]
    dt = np.result_type(*dts) if dts else np.dtype(np.float32)
    return jnp.dtype(dt) if jax.config.jax_enable_x64 or dt != np.float64 else jnp.float32


# --------------------------------------------------------------------------
# Kernel regression and linear dynamics
# --------------------------------------------------------------------------


def kernel_regression(k_test_train, k_train_train, y, *, ridge: float = 0.0,
                      method: str = "cholesky", tol: float = 1e-10,
                      maxiter: int | None = None, return_info: bool = False):
    """Kernel ridge regression ``k(x, X) (K + ridge I)^(-1) y``, solved in float64.

    Concrete inputs are solved on the host in float64 (whatever their dtype) by a
    Cholesky factorisation with a condition-number check (``method="cholesky"``)
    or by matrix-free conjugate gradients (``method="cg"``, :func:`cg_solve`)
    for kernels that do not fit in memory as one matrix (``.npy`` memory maps
    of :func:`ntkexp.kernels.tiling.tiled_kernel`, or callables ``V -> K V``).
    A singular system raises :class:`SingularKernelError` naming ``ridge``:
    no jitter is ever added silently, and the result is never NaN. Under
    ``jax.jit`` (traced inputs) the Cholesky solve runs in JAX in the inputs'
    dtype, without the check.

    Args:
      k_test_train: ``(m, n)`` kernel between test and training points (array,
        memory map, or with ``method="cg"`` a callable ``V -> k_test_train @ V``).
      k_train_train: ``(n, n)`` positive-definite training kernel (array, memory
        map, or with ``method="cg"`` a callable ``V -> K @ V``).
      y: ``(n,)`` or ``(n, k)`` targets.
      ridge: ``lambda >= 0``.
      method: ``"cholesky"`` or ``"cg"``.
      tol, maxiter: CG stopping rule (relative residual per column).
      return_info: also return the :class:`SolveInfo` (condition number,
        residual, iterations).

    Returns:
      ``(m,)`` or ``(m, k)`` predictions in the inputs' floating dtype (the
      t = infinity limit of the NTK dynamics with ``f0 = 0``; Arora et al.
      2019, Theorem 3.2); with ``return_info``, ``(predictions, SolveInfo)``.

    Raises:
      SingularKernelError: the system is singular to float64 precision.
      ValueError: bad shapes, a negative ridge, an unknown method.
    """
    _check_ridge(ridge)
    if method not in ("cholesky", "cg"):
        raise ValueError(f"method must be 'cholesky' or 'cg', got {method!r}")
    if not _is_concrete(k_test_train, k_train_train, y):
        if method != "cholesky" or return_info:
            raise ValueError("under jax.jit only method='cholesky' without return_info works; "
                             "call kernel_regression outside jit for the float64 solves")
        K = _square("k_train_train", k_train_train)
        kx = jnp.asarray(k_test_train)
        if kx.ndim != 2 or kx.shape[1] != K.shape[0]:
            raise ValueError(f"k_test_train must have shape (m, {K.shape[0]}), got "
                             f"{tuple(kx.shape)}")
        y2, vec = _as_2d("y", y, K.shape[0])
        out = kx @ _cho_solve(K, y2.astype(K.dtype), ridge)
        return out[:, 0] if vec else out
    n = _n_of(k_train_train, "k_train_train")
    if not callable(k_test_train):
        shape = tuple(np.shape(k_test_train))
        if len(shape) != 2 or shape[1] != n:
            raise ValueError(f"k_test_train must have shape (m, {n}), got {shape}")
    y2, vec = _as_2d("y", np.asarray(y), n)
    y2 = np.asarray(y2, np.float64)
    if method == "cholesky":
        if callable(k_train_train):
            raise ValueError("method='cholesky' needs k_train_train as a matrix; use "
                             "method='cg' for an operator")
        coef, info = cholesky_solve(k_train_train, y2, ridge=ridge)
    else:
        coef, info = cg_solve(k_train_train, y2, ridge=ridge, tol=tol, maxiter=maxiter)
    out = _matmul_rows(k_test_train, coef)
    dt = _out_dtype(*(a for a in (k_test_train, k_train_train, y) if not callable(a)))
    out = jnp.asarray(out.astype(dt))
    out = out[:, 0] if vec else out
    return (out, info) if return_info else out


def _n_of(K, name: str) -> int:
    shape = tuple(getattr(K, "shape", np.shape(K) if not callable(K) else ()))
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{name} must be a square (n, n) matrix (or an operator with a "
                         f"shape), got shape {shape}")
    return int(shape[0])


def precision_gap(k_test_train, k_train_train, y, *, ridge: float = 0.0) -> dict:
    """How much float32 changes kernel-regression predictions (Lee et al. 2020, sec. 3.4).

    Solves by Cholesky once in float32 (LAPACK ``spotrf``, on float32 copies of the
    kernels) and once in float64.

    Returns:
      ``{"relative_gap": ||p32 - p64|| / ||p64||, "max_abs_gap", "argmax_agreement"
      (fraction of test points whose argmax over the columns agrees; 1-column
      targets: sign), "condition_number" (float64), "float32_failed" (True when
      float32 Cholesky failed: the gap is then inf)}``.
    """
    import scipy.linalg

    p64, info = kernel_regression(k_test_train, k_train_train, y, ridge=ridge,
                                  return_info=True)
    p64 = np.asarray(p64, np.float64)
    K32 = np.array(k_train_train, np.float32)
    K32 = (K32 + K32.T) / np.float32(2)
    K32[np.diag_indices(K32.shape[0])] += np.float32(ridge)
    y32 = np.asarray(y, np.float32)
    try:
        c = scipy.linalg.cho_factor(K32, lower=True, check_finite=False)
        p32 = (np.asarray(k_test_train, np.float32) @ scipy.linalg.cho_solve(
            c, y32, check_finite=False)).astype(np.float64)
        failed = not bool(np.all(np.isfinite(p32)))
    except np.linalg.LinAlgError:
        p32, failed = None, True
    if failed:
        return {"relative_gap": float("inf"), "max_abs_gap": float("inf"),
                "argmax_agreement": 0.0, "condition_number": info.condition_number,
                "float32_failed": True}
    if p64.ndim == 2 and p64.shape[1] > 1:
        agree = float(np.mean(np.argmax(p32, 1) == np.argmax(p64, 1)))
    else:
        agree = float(np.mean(np.sign(p32) == np.sign(p64)))
    return {"relative_gap": float(np.linalg.norm(p32 - p64) / max(np.linalg.norm(p64), 1e-300)),
            "max_abs_gap": float(np.max(np.abs(p32 - p64))), "argmax_agreement": agree,
            "condition_number": info.condition_number, "float32_failed": False}


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


def _transfer(Theta, t, steps, learning_rate: float, loss_reduction: str, xp=jnp):
    """``Theta^-1 (I - e^{-eta t Theta_eff})`` (or the discrete / t = inf version), ``(n, n)``.

    ``Theta`` is the unscaled kernel; for "mean" ``Theta_eff = Theta / n`` and
    the ``Theta^-1`` factor cancels the 1/n, so the result is
    ``Theta^-1 (I - decay(Theta_eff))``. ``xp`` is ``jax.numpy`` (traced inputs)
    or ``numpy`` (the float64 host path); eigenvalues ``<= 0`` (a singular
    ``Theta``) take the finite limit ``eta t`` of ``(1 - decay(l)) / l``.
    Returns None for t = infinity (plain ``Theta^-1``, solved by Cholesky).
    """
    if steps is not None and t is not None:
        raise ValueError("give either t (gradient flow) or steps (discrete GD), not both")
    if steps is None and (t is None or (isinstance(t, float) and math.isinf(t))):
        return None  # t = infinity: plain Theta^-1
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    lam, V = xp.linalg.eigh(Theta)
    scale = 1.0 / Theta.shape[0] if loss_reduction == "mean" else 1.0
    lam_eff = lam * scale
    if steps is not None:
        base = 1.0 - learning_rate * lam_eff
        decay = xp.sign(base) ** steps * xp.abs(base) ** steps
        small = learning_rate * scale * steps  # limit of (1 - decay) / lam as lam -> 0
    else:
        decay = xp.exp(-learning_rate * xp.asarray(t, Theta.dtype) * lam_eff)
        small = learning_rate * scale * t
    safe = xp.where(lam > 0, lam, 1.0)
    g = xp.where(lam > 0, (1.0 - decay) / safe, small)
    return (V * g[None, :]) @ V.T


def _host64(name: str, a, ridge: float = 0.0) -> np.ndarray:
    """A square kernel as float64 numpy, symmetrised, ``ridge`` on the diagonal."""
    A = np.array(a, np.float64, copy=True)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) matrix, got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError(f"{name} contains NaN or infinite values")
    A = 0.5 * (A + A.T)
    A[np.diag_indices(A.shape[0])] += ridge
    return A


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
    ridge: float = 0.0,
) -> Array:
    """The trained infinite-width network given its initial function (Jacot et al. 2018, sec. 5).

    ``f_t(x) = f0(x) + Theta(x, X) Theta^-1 (I - e^{-eta t Theta_eff}) (y - f0(X))``;
    with ``steps`` the discrete-GD factor ``I - (I - eta Theta_eff)^steps``;
    with neither (or ``t = inf``), ``Theta^-1``. Concrete inputs are computed in
    float64 (eigendecomposition for finite t, checked Cholesky at t = inf);
    traced ones in JAX in their dtype.

    Args:
      ntk_test_train: ``(m, n)``; ntk_train_train: ``(n, n)``.
      y: ``(n,)``/``(n, k)`` targets; f0_test ``(m,)``/``(m, k)`` and
        f0_train the initial outputs on test and training points.
      t, steps, learning_rate, loss_reduction: time, see module docstring.
      ridge: added to the diagonal of ``Theta`` (needed at t = inf when it is singular).

    Returns:
      predictions on the test points, shaped like ``f0_test``.

    Raises:
      SingularKernelError: ``t = inf`` and ``Theta + ridge I`` singular (names ``ridge``).
    """
    _check_ridge(ridge)
    if _is_concrete(ntk_test_train, ntk_train_train, y, f0_test, f0_train):
        Theta = _host64("ntk_train_train", ntk_train_train, ridge)
        y2, vec = _as_2d("y", np.asarray(y), Theta.shape[0])
        f0tr, _ = _as_2d("f0_train", np.asarray(f0_train), Theta.shape[0])
        kx = np.asarray(ntk_test_train, np.float64)
        f0te = np.asarray(f0_test, np.float64).reshape(kx.shape[0], -1)
        res = np.asarray(y2, np.float64) - np.asarray(f0tr, np.float64)
        T = _transfer(Theta, t, steps, learning_rate, loss_reduction, xp=np)
        coef = cholesky_solve(Theta, res, name="ntk_train_train")[0] if T is None else T @ res
        out = f0te + kx @ coef
        dt = _out_dtype(*(np.asarray(a) if not hasattr(a, "dtype") else a
                          for a in (ntk_test_train, ntk_train_train, y, f0_test)))
        out = jnp.asarray(out.astype(dt))
        return out[:, 0] if vec else out
    Theta = _square("ntk_train_train", ntk_train_train)
    Theta = Theta + ridge * jnp.eye(Theta.shape[0], dtype=Theta.dtype)
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
    ridge: float = 0.0,
) -> tuple[Array, Array]:
    """Mean and covariance of the trained infinite network, f0 ~ GP(0, NNGP).

    Lee et al. 2019, eq. 16.

    With ``T = Theta(x, X) Theta^-1 (I - e^{-eta t Theta_eff})`` (``Theta(x, X) Theta^-1``
    at t = infinity; Jacot et al. 2018, sec. 5)::

        mean(x)   = T y
        cov(x, x') = K(x, x') + T K(X, X) T'^T - T K(X, x') - K(x, X) T'^T

    Concrete inputs are computed in float64: ``Theta^-1`` at t = infinity by a
    checked Cholesky factorisation (a singular ``Theta`` raises
    :class:`SingularKernelError` naming ``ridge``), finite t by the
    eigendecomposition of ``Theta``. Traced inputs run in JAX in their dtype.

    Args:
      ntk_*: NTK blocks ``(m, n)``, ``(n, n)``; nngp_*: NNGP blocks
        ``(m, n)``, ``(n, n)``, ``(m, m)``; y: ``(n,)`` or ``(n, k)``.
      t, steps, learning_rate, loss_reduction: as in :func:`ntk_predict`.
      ridge: added to the diagonal of ``Theta``.

    Returns:
      ``(mean (m,) or (m, k), cov (m, m))`` (cov is per output).
    """
    _check_ridge(ridge)
    args = (ntk_test_train, ntk_train_train, nngp_test_train, nngp_train_train,
            nngp_test_test, y)
    if _is_concrete(*args):
        Theta = _host64("ntk_train_train", ntk_train_train, ridge)
        y2, vec = _as_2d("y", np.asarray(y), Theta.shape[0])
        kx = np.asarray(ntk_test_train, np.float64)
        Tr = _transfer(Theta, t, steps, learning_rate, loss_reduction, xp=np)
        if Tr is None:
            T = cholesky_solve(Theta, kx.T, name="ntk_train_train")[0].T
        else:
            T = kx @ Tr
        mean = T @ np.asarray(y2, np.float64)
        Kxx = np.asarray(nngp_test_test, np.float64)
        KxX = np.asarray(nngp_test_train, np.float64)
        KXX = _host64("nngp_train_train", nngp_train_train)
        cross = T @ KxX.T
        cov = Kxx + T @ KXX @ T.T - cross - cross.T
        cov = 0.5 * (cov + cov.T)
        dt = _out_dtype(*(a for a in args if hasattr(a, "dtype")))
        mean = jnp.asarray(mean.astype(dt))
        return (mean[:, 0] if vec else mean), jnp.asarray(cov.astype(dt))
    Theta = _square("ntk_train_train", ntk_train_train)
    Theta = Theta + ridge * jnp.eye(Theta.shape[0], dtype=Theta.dtype)
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
