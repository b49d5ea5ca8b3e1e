"""Optimizers as optax gradient transformations: ``gd``, ``sgd`` and ``ngd``.

All three return ``optax.GradientTransformationExtraArgs`` with NamedTuple
states, so they compose with ``optax.chain`` and accept optax schedules as the
learning rate. ``gd`` and ``sgd`` are the same update rule,
``theta <- theta - eta * grad``; mini-batching is done by
:func:`ntkexp.training.train` through its ``batch_size`` argument.

``ngd`` is natural-gradient descent for the squared loss (Zhang, Martens &
Grosse 2019, eq. 4), where the Fisher is the Gauss-Newton matrix ``J^T J``:

    theta <- theta - eta * J^T (J J^T + lambda I)^(-1) (u - y),

``J = d u / d theta`` the ``(n * out_dim, P)`` Jacobian of the outputs ``u`` on
the batch. It is computed in function space: the empirical NTK ``J J^T``
(``ntkexp.empirical_ntk``), a Cholesky solve, and one vector-Jacobian product
``J^T alpha``; no ``P x P`` matrix is formed. The update needs the batch, so
it is called as::

    updates, state = tx.update(grads, state, params, x=x_batch, residual=u - y)

(``grads`` is ignored: the direction depends on the residual only, so it is
the same for the "mean" and the "sum" loss). ``ntkexp.training.train`` passes
``x``, ``residual`` and ``apply_fn`` (the model restricted to its trainable
parameters) to every optimizer as extra arguments; an ``apply_fn`` extra
argument overrides the one given to :func:`ngd`.

Optimizers are registered in :data:`OPTIMIZERS` under ``"gd"``, ``"sgd"`` and
``"ngd"``; each entry is a builder taking the config's keyword arguments.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ntkexp.empirical import empirical_ntk
from ntkexp.registry import Registry

Array = jax.Array
ScalarOrSchedule = float | Callable[[Array], Array]

#: ``ngd``'s default damping (see :func:`ngd`).
DEFAULT_DAMPING = 1e-6
# Retries of a failed NGD solve, each with a jitter ten times larger.
_JITTER_TRIES = 16

OPTIMIZERS: Registry[Callable[..., optax.GradientTransformationExtraArgs]] = Registry("optimizer")


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`gd` / :func:`sgd`: the step count (for schedules)."""

    count: Array


class NGDState(NamedTuple):
    """State of :func:`ngd`.

    Attributes:
      count: the step count (for schedules).
      jitter: the largest jitter :func:`ngd` had to add to ``damping`` so far
        (0 when every solve was well posed); see :func:`ngd_dual_coefficients`.
    """

    count: Array
    jitter: Array


def _cached(factory):
    """Return the same transformation for equal (hashable) arguments.

    ``train`` compiles one program per optimizer object; caching makes
    ``gd(0.5)`` called twice reuse the compiled steps instead of recompiling.
    """
    cache: dict = {}

    @functools.wraps(factory)
    def wrapper(learning_rate, **kwargs):
        try:
            key = (learning_rate, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:
            return factory(learning_rate, **kwargs)
        if key not in cache:
            cache[key] = factory(learning_rate, **kwargs)
        return cache[key]

    return wrapper


def _check_learning_rate(learning_rate, who: str) -> None:
    if callable(learning_rate):
        return
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
        try:
            learning_rate = float(learning_rate)
        except (TypeError, ValueError):
            raise TypeError(
                f"{who}: learning_rate must be a positive number or an optax schedule, "
                f"got {type(learning_rate).__name__}"
            ) from None
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"{who}: learning_rate must be a finite number > 0, got {learning_rate!r}")


def _lr_at(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _scale_by_lr(
    learning_rate: ScalarOrSchedule, who: str
) -> optax.GradientTransformationExtraArgs:
    _check_learning_rate(learning_rate, who)

    def init(params):
        del params
        return ScaleByLearningRateState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, **extra):
        del params, extra
        lr = _lr_at(learning_rate, state.count)
        updates = jax.tree_util.tree_map(lambda g: (-lr * g).astype(g.dtype), updates)
        return updates, ScaleByLearningRateState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


@_cached
def gd(learning_rate: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """Full-batch gradient descent ``theta <- theta - eta * grad``.

    Args:
      learning_rate: ``eta > 0`` or an optax schedule ``count -> eta``.

    Returns:
      An optax ``GradientTransformationExtraArgs`` (extra arguments ignored).
    """
    return _scale_by_lr(learning_rate, "gd")


@_cached
def sgd(learning_rate: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """Stochastic gradient descent: the :func:`gd` rule on mini-batch gradients.

    Mini-batches are drawn by :func:`ntkexp.training.train` (``batch_size``,
    ``key``, ``replace``); this transformation only scales the gradient.
    """
    return _scale_by_lr(learning_rate, "sgd")


@_cached
def ngd(
    learning_rate: ScalarOrSchedule,
    *,
    damping: float = DEFAULT_DAMPING,
    apply_fn: Callable | None = None,
    ntk_method: str = "auto",
    loss: str = "squared",
) -> optax.GradientTransformationExtraArgs:
    """Natural-gradient descent for the squared loss (Zhang et al. 2019, eq. 4).

    ``delta = -eta * J^T (J J^T + damping * I)^(-1) residual`` with ``J`` the
    Jacobian of ``apply_fn(params, x)`` on the batch ``x (n, d)`` and
    ``residual = u - y`` of shape ``(n,)`` or ``(n, out_dim)``. ``J J^T`` is
    the ``(n * out_dim)^2`` empirical NTK; it is solved by Cholesky and
    mapped back by one vjp.

    With ``loss="softmax_cross_entropy"`` the Fisher is the generalized
    Gauss-Newton matrix ``J^T H J`` (Martens 2014; Zhang et al. 2019, sec. 2),
    ``H = blockdiag_i(diag(p_i) - p_i p_i^T)`` the softmax Hessian at
    ``p_i = softmax(u_i)``, and ``residual = p - y``. By the push-through
    identity ``(J^T H J + lambda I)^(-1) J^T = J^T (H J J^T + lambda I)^(-1)``
    the step is ``-eta * J^T (H Theta + lambda I)^(-1) (p - y)``, again in
    function space (an LU solve: ``H Theta`` is not symmetric). ``H`` is
    singular (``H 1 = 0``), so this needs ``damping > 0``. With ``eta = 1``
    and little damping the step is a full Newton step on the logits, valid
    only while the network stays close to its linearisation: measured on 24
    points in 3 classes, a width-512 one-hidden-layer net fell from loss
    1.39 to 6e-4 in 10 steps, while at width 64 the same step diverged;
    ``damping=0.1`` trained both (the width-512 case is
    ``tests/test_training.py::test_gauss_newton_ngd_beats_gd_on_cross_entropy``).

    Args:
      learning_rate: ``eta > 0`` or a schedule. ``eta = 1`` with zero damping
        interpolates the batch in one step for a linear model.
      damping: ``lambda >= 0`` added to the diagonal of ``J J^T``. The
        default, ``DEFAULT_DAMPING = 1e-6``, is negligible next to an NTK
        diagonal of order one (``Theta(x, x) = (depth + 1) |x|^2 / d`` for a
        ReLU MLP in NTK parameterization without bias) and keeps the step
        defined when the batch repeats a point. ``damping=0`` is exact NGD
        (Zhang et al. 2019, eq. 4). Whatever the damping, a solve that is
        singular or ill-conditioned in the working precision gets a jitter
        added to its diagonal (never a NaN); the largest one is recorded in
        the state, ``NGDState.jitter`` (see :func:`ngd_dual_coefficients`).
      apply_fn: ``apply_fn(params, x) -> (n, out_dim)``. May be omitted if the
        caller passes it as an extra argument (``train`` does).
      ntk_method: ``method`` passed to ``ntkexp.empirical_ntk``.
      loss: ``"squared"`` or ``"softmax_cross_entropy"``; a ``loss`` extra
        argument to ``update`` overrides it (``ntkexp.train`` passes its own).

    Returns:
      An optax ``GradientTransformationExtraArgs``; ``update(grads, state,
      params, *, x, residual, apply_fn=None, loss=None)``.
    """
    _check_learning_rate(learning_rate, "ngd")
    if (isinstance(damping, bool) or not isinstance(damping, (int, float))
            or not math.isfinite(damping)):
        raise TypeError(f"ngd: damping must be a finite number >= 0, got {damping!r}")
    if damping < 0:
        raise ValueError(f"ngd: damping must be >= 0, got {damping!r}")
    _check_ngd_loss(loss, damping)
    default_apply, default_loss = apply_fn, loss

    def init(params):
        leaves = jax.tree_util.tree_leaves(params)
        dt = jnp.result_type(*leaves) if leaves else jnp.float32
        return NGDState(count=jnp.zeros([], jnp.int32), jitter=jnp.zeros([], dt))

    def update(grads, state, params=None, *, x=None, residual=None, apply_fn=None, loss=None,
               **extra):
        del grads, extra
        fn = apply_fn if apply_fn is not None else default_apply
        if fn is None:
            raise ValueError("ngd needs apply_fn: pass ngd(..., apply_fn=f) or the extra argument")
        if params is None or x is None or residual is None:
            raise ValueError("ngd.update needs params and the extra arguments x= and residual=")
        kind = default_loss if loss is None else loss
        _check_ngd_loss(kind, damping)
        out, vjp = jax.vjp(lambda p: fn(p, x), params)
        probs = jax.nn.softmax(out, axis=-1) if kind == "softmax_cross_entropy" else None
        alpha, jitter = _dual_coefficients(fn, params, x, residual, damping=damping,
                                           method=ntk_method, probs=probs)
        (direction,) = vjp(alpha.reshape(out.shape).astype(out.dtype))
        lr = _lr_at(learning_rate, state.count)
        updates = jax.tree_util.tree_map(lambda d, p: (-lr * d).astype(p.dtype), direction, params)
        jitter = jnp.maximum(state.jitter, jitter.astype(state.jitter.dtype))
        return updates, NGDState(count=optax.safe_increment(state.count), jitter=jitter)

    return optax.GradientTransformationExtraArgs(init, update)


_NGD_LOSSES = ("squared", "softmax_cross_entropy")


def _check_ngd_loss(loss, damping) -> None:
    if loss not in _NGD_LOSSES:
        raise ValueError(f"ngd: loss must be one of {', '.join(_NGD_LOSSES)}, got {loss!r}")
    if loss == "softmax_cross_entropy" and damping <= 0:
        raise ValueError("ngd: the softmax cross-entropy Gauss-Newton matrix is singular "
                         "(H 1 = 0); give damping > 0")


def ngd_dual_coefficients(apply_fn, params, x, residual, *, damping=DEFAULT_DAMPING,
                          method="auto", probs=None) -> Array:
    """``(J J^T + damping I)^(-1) residual`` by Cholesky: shape ``(n, out_dim)``.

    ``J J^T`` is the empirical NTK of ``apply_fn`` on ``x`` with output blocks
    (``trace_outputs=False``), flattened to ``(n * out_dim, n * out_dim)``.
    With ``probs`` ``(n, out_dim)`` (softmax outputs) it is
    ``(H J J^T + damping I)^(-1) residual`` instead, ``H`` the block-diagonal
    softmax Hessian ``diag(p_i) - p_i p_i^T`` (LU solve).

    Singular and ill-conditioned systems (a repeated point with
    ``damping=0``, or a damping below the working precision) never give a
    NaN: a solve counts as failed when its factor is not finite or when a
    pivot (``L_ii^2`` for Cholesky, ``|U_ii|`` for LU) falls below
    ``m eps max_i |A_ii|`` (the factorisation's backward error; ``A`` the
    damped matrix, ``m = n * out_dim``, ``eps`` the dtype's machine
    epsilon), and is then retried with a jitter ``m eps max_i A_ii
    10^k``, ``k = 0, 1, ...`` (at most 16 tries) added to the damping. The
    jitter used is returned by the optimizer's state (``NGDState.jitter``);
    here it is only applied.
    """
    return _dual_coefficients(apply_fn, params, x, residual, damping=damping, method=method,
                              probs=probs)[0]


def _dual_coefficients(apply_fn, params, x, residual, *, damping, method, probs):
    """:func:`ngd_dual_coefficients` and the jitter it added (a 0-d array, 0 if none)."""
    out = jax.eval_shape(lambda p: apply_fn(p, x), params)
    n, k = out.shape[0], (out.shape[1] if len(out.shape) > 1 else 1)
    r = jnp.asarray(residual).reshape(n, k)
    if k == 1:
        G = empirical_ntk(apply_fn, params, x, method=method)
        G = G.reshape(n, n)
    else:
        G4 = empirical_ntk(apply_fn, params, x, method=method, outputs="full")  # (n, n, k, k)
        G = jnp.transpose(G4, (0, 2, 1, 3)).reshape(n * k, n * k)
    G = 0.5 * (G + G.T)
    rhs = r.reshape(n * k).astype(G.dtype)
    m = n * k
    eps = jnp.finfo(G.dtype).eps
    if probs is not None:
        p = jnp.asarray(probs, G.dtype).reshape(n, k)
        H = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)  # (n, k, k)
        A = jnp.einsum("iab,ibjc->iajc", H, G.reshape(n, k, n, k)).reshape(n * k, n * k)
    else:
        A = G
    scale = jnp.max(jnp.abs(jnp.diagonal(A))) + damping
    floor = m * eps * jnp.where(scale > 0, scale, 1.0)  # the factorisations' backward error
    if probs is not None:

        def solve(A_):
            lu, piv = jax.scipy.linalg.lu_factor(A_)
            ok = jnp.all(jnp.isfinite(lu)) & (jnp.min(jnp.abs(jnp.diagonal(lu))) > floor)
            return jax.scipy.linalg.lu_solve((lu, piv), rhs), ok
    else:

        def solve(A_):
            L = jnp.linalg.cholesky(A_)
            piv = jnp.diagonal(L) ** 2
            ok = jnp.all(jnp.isfinite(L)) & (jnp.min(piv) > floor)
            return jax.scipy.linalg.cho_solve((L, True), rhs), ok

    eye = jnp.eye(m, dtype=G.dtype)
    alpha, jitter = _solve_with_jitter(solve, A + damping * eye, eye, floor)
    return alpha.reshape(n, k), jitter


def _solve_with_jitter(solve, A, eye, base):
    """``solve(A)``, retried with ``A + base 10^k I`` (k = 0, 1, ...) until it reports ok.

    Returns ``(solution, jitter)`` with ``jitter`` 0 when the first solve was fine.
    """
    z0, ok0 = solve(A)
    zero = jnp.zeros([], A.dtype)

    def cond(c):
        return (~c[2]) & (c[3] < _JITTER_TRIES)

    def body(c):
        _, _, _, t = c
        j = base * jnp.asarray(10.0, A.dtype) ** t.astype(A.dtype)
        z, ok = solve(A + j * eye)
        return z, j, ok, t + 1

    z, jitter, _, _ = jax.lax.while_loop(cond, body, (z0, zero, ok0, jnp.zeros([], jnp.int32)))
    return z, jitter


def _opt_builder(factory):
    def build(**kwargs: Any):
        lr = kwargs.pop("learning_rate", kwargs.pop("lr", None))
        if lr is None:
            raise ValueError(f"optimizer {factory.__name__!r} needs learning_rate")
        try:
            return factory(lr, **kwargs)
        except TypeError as e:
            if "unexpected keyword" in str(e):
                raise ValueError(f"bad options for optimizer {factory.__name__!r}: {e}") from None
            raise

    build.__doc__ = factory.__doc__
    build.factory = factory  # its signature names the options (config checks them)
    return build


OPTIMIZERS.register("gd", _opt_builder(gd))
OPTIMIZERS.register("sgd", _opt_builder(sgd))
OPTIMIZERS.register("ngd", _opt_builder(ngd))
