"""Analytic infinite-width NNGP and NTK of an MLP (any activation).

Convention (``shared/reference/README.md``; Jacot et al. 2018, Theorem 1 and
Proposition 1; Lee et al. 2019, eqs. 4-7), NTK parameterization::

    nngp_1 = W_std^2 <x, x'> / d + b_std^2,          ntk_1 = nngp_1,
    nngp_{h+1} = W_std^2 T_h + b_std^2,              ntk_{h+1} = nngp_{h+1} + W_std^2 Tdot_h ntk_h,

with ``T_h = E[phi(u) phi(v)]``, ``Tdot_h = E[phi'(u) phi'(v)]`` under
``(u, v) ~ N(0, [[nngp_h(x,x), nngp_h(x,x')], [., nngp_h(x',x')]])``.

Three ways to get ``T, Tdot`` (chosen from the activation, see :func:`dual_method`):

* ``"angular"``: ``phi(u) = sigma u + delta |u|`` (relu, leaky_relu, abs,
  identity; :class:`ntkexp.activations.AngularDual`). The recursion carries the
  *gaps* ``e = s - c`` and ``f = s + c`` (``s = sqrt(q1 q2)``) instead of the
  cosine, each updated as a sum of non-negative terms, and the angle is
  ``2 atan2(sqrt e, sqrt f)``. At the first layer the gaps come from
  ``||x/|x| -+ x'/|x'| ||^2`` (pairwise differences, when ``exact_angles``),
  so collinear and antipodal inputs keep full precision in every layer (a plain
  ``arccos(c/s)`` loses half the digits there).
* ``"closed_form"``: the activation's own ``T``/``Tdot`` (erf, gelu, sin, cos, ...).
* ``"numerical"``: Mehler expansion with exact tails (:mod:`ntkexp.kernels.quadrature`)
  for any other activation (tanh, softplus, sigmoid, exp, user's own).

Standard parameterization (``z = a @ W + b``, ``W ~ N(0, W_std^2/n_in)``,
``b ~ N(0, b_std^2)``): the function at initialisation has the same law, so the
NNGP is identical. The NTK is the *expected empirical NTK at the spec's finite
width* ``n = spec.width`` (it grows like ``n``; there is no finite
infinite-width limit). The gradient with respect to the weights of dense layer
``h`` contributes ``<a_h(x), a_h(x')> = <x, x'>`` for the input layer and
``n E[phi phi] = n T_h`` for hidden layers, the bias ``1`` (when ``b_std > 0``),
each times the product of ``W_std^2 Tdot_l`` of the layers above::

    ntk_1 = <x, x'> + 1[b_std > 0],    ntk_{h+1} = n T_h + 1[b_std > 0] + W_std^2 Tdot_h ntk_h.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntkexp.activations import Activation, safe_sqrt
from ntkexp.kernels.base import Kernel
from ntkexp.kernels.quadrature import DEFAULT_DEGREE, DEFAULT_NODES, NumericalDual
from ntkexp.models.mlp import MLPSpec

Array = jax.Array

DEFAULT_BLOCK = 256
# Pairwise-difference angles are used automatically up to this input dimension.
EXACT_ANGLE_MAX_DIM = 64
_HP = lax.Precision.HIGHEST


def dual_method(act: Activation) -> str:
    """``"angular"``, ``"closed_form"`` or ``"numerical"``: how ``T, Tdot`` are computed."""
    if act.angular is not None:
        return "angular"
    if act.has_closed_form:
        return "closed_form"
    return "numerical"


def diag_variances(spec: MLPSpec, x: Array, *, degree: int = DEFAULT_DEGREE,
                   nodes: int = DEFAULT_NODES) -> list[Array]:
    """Pre-activation variances ``nngp_h(x, x)`` for ``h = 1 .. depth + 1``.

    Args:
      spec: the MLP.
      x: inputs ``(n, d)``.

    Returns:
      ``depth + 1`` arrays of shape ``(n,)``.
    """
    act = spec.act
    w2, b2 = spec.W_std**2, spec.b_std**2
    method = dual_method(act)
    q = w2 * jnp.sum(x * x, axis=1) / x.shape[1] + b2
    out = [q]
    nd = NumericalDual(act, degree, nodes)
    for _ in range(spec.depth):
        if method == "angular":
            t = act.angular.j0 * q
        elif method == "closed_form":
            t = act.T(q, q, q)
        else:
            t = nd.diag(q)
        q = w2 * t + b2
        out.append(q)
    return out


def _tile(spec: MLPSpec, x1, x2, q1s, q2s, exact: bool, degree: int, nodes: int):
    """Kernel of one tile: ``x1 (B1, d)``, ``x2 (B2, d)`` -> ``(nngp, ntk)`` each ``(B1, B2)``."""
    act = spec.act
    method = dual_method(act)
    w2, b2 = spec.W_std**2, spec.b_std**2
    d = x1.shape[1]
    std = spec.parameterization == "standard"
    width = float(spec.width)
    bias1 = 1.0 if spec.has_bias else 0.0
    g = jnp.matmul(x1, x2.T, precision=_HP)
    c = w2 * g / d + b2
    ntk = (g + bias1) if std else c
    if spec.depth == 0:
        return c, ntk
    if method == "angular":
        ang = act.angular
        r1 = safe_sqrt(jnp.sum(x1 * x1, axis=1))
        r2 = safe_sqrt(jnp.sum(x2 * x2, axis=1))
        u1 = x1 / jnp.where(r1 > 0, r1, 1.0)[:, None]
        u2 = x2 / jnp.where(r2 > 0, r2, 1.0)[:, None]
        if exact:
            diff = u1[:, None, :] - u2[None, :, :]
            summ = u1[:, None, :] + u2[None, :, :]
            dm = jnp.sum(diff * diff, axis=-1)
            dp = jnp.sum(summ * summ, axis=-1)
        else:
            cos = jnp.matmul(u1, u2.T, precision=_HP)
            dm, dp = jnp.maximum(2 - 2 * cos, 0.0), jnp.maximum(2 + 2 * cos, 0.0)
        a = w2 / d
        rr = r1[:, None] * r2[None, :]
        s = safe_sqrt(q1s[0][:, None] * q2s[0][None, :])
        br = a * b2 * (r1[:, None] - r2[None, :]) ** 2 / (s + a * rr + b2 + (s == 0))
        e = br + a * rr * dm / 2
        f = br + a * rr * dp / 2 + 2 * b2
        A = w2 * ang.j0
        for h in range(spec.depth):
            J, Jdot, jm, jp = ang.from_gaps(e, f)
            sJ = s * J
            c = w2 * sJ + b2
            top = (width * sJ + bias1) if std else c
            ntk = top + w2 * Jdot * ntk
            if h + 1 < spec.depth:
                rq1, rq2 = safe_sqrt(q1s[h]), safe_sqrt(q2s[h])
                s_new = safe_sqrt(q1s[h + 1][:, None] * q2s[h + 1][None, :])
                br = A * b2 * (rq1[:, None] - rq2[None, :]) ** 2 / (s_new + A * s + b2 + (s_new == 0))
                e = br + w2 * s * jm
                f = br + w2 * s * jp + 2 * b2
                s = s_new
        return c, ntk
    nd = NumericalDual(act, degree, nodes)
    for h in range(spec.depth):
        Q1, Q2 = q1s[h], q2s[h]
        if method == "closed_form":
            t = act.T(Q1[:, None], c, Q2[None, :])
            td = act.Tdot(Q1[:, None], c, Q2[None, :])
        else:
            t, td = nd.pair(Q1, c, Q2)
        c = w2 * t + b2
        top = (width * t + bias1) if std else c
        ntk = top + w2 * td * ntk
    return c, ntk


@functools.partial(jax.jit, static_argnames=("spec", "sym", "block", "exact", "degree", "nodes"))
def _kernel(spec, x1, x2, sym, block, exact, degree, nodes):
    q1s = diag_variances(spec, x1, degree=degree, nodes=nodes)
    q2s = q1s if sym else diag_variances(spec, x2, degree=degree, nodes=nodes)
    n1, n2 = x1.shape[0], x2.shape[0]
    if n1 <= block and n2 <= block:
        nngp, ntk = _tile(spec, x1, x2, q1s, q2s, exact, degree, nodes)
        if sym:
            # materialise first: a fused recomputation of (j, i) may round differently
            nngp, ntk = _mirror_upper(nngp), _mirror_upper(ntk)
        return Kernel(nngp, ntk)
    nb1, nb2 = -(-n1 // block), -(-n2 // block)
    p1, p2 = nb1 * block, nb2 * block

    def pad(a, p):
        return jnp.pad(a, [(0, p - a.shape[0])] + [(0, 0)] * (a.ndim - 1))

    x1p, x2p = pad(x1, p1), pad(x2, p2)
    q1p = [pad(q, p1) for q in q1s]
    q2p = [pad(q, p2) for q in q2s]
    if sym:
        pairs = [(i, j) for i in range(nb1) for j in range(i, nb2)]
    else:
        pairs = [(i, j) for i in range(nb1) for j in range(nb2)]
    idx = jnp.asarray(np.array(pairs, dtype=np.int32) * block)
    dt = x1.dtype
    out0 = (jnp.zeros((p1, p2), dt), jnp.zeros((p1, p2), dt))

    def body(carry, ij):
        i, j = ij[0], ij[1]
        xa = lax.dynamic_slice_in_dim(x1p, i, block)
        xb = lax.dynamic_slice_in_dim(x2p, j, block)
        qa = [lax.dynamic_slice_in_dim(q, i, block) for q in q1p]
        qb = [lax.dynamic_slice_in_dim(q, j, block) for q in q2p]
        tiles = lax.optimization_barrier(_tile(spec, xa, xb, qa, qb, exact, degree, nodes))
        new = []
        for buf, t in zip(carry, tiles, strict=True):
            if sym:
                t = jnp.where(i == j, _mirror_upper(t), t)
                buf = lax.dynamic_update_slice(buf, t.T, (j, i))
            buf = lax.dynamic_update_slice(buf, t, (i, j))
            new.append(buf)
        return tuple(new), None

    (nngp, ntk), _ = lax.scan(body, out0, idx)
    return Kernel(nngp[:n1, :n2], ntk[:n1, :n2])


def _mirror_upper(k: Array) -> Array:
    """Exactly symmetric copy of a square ``k``: its upper triangle mirrored.

    (``(k + k.T) / 2`` is not reliably symmetric after XLA fusion, which may
    recompute entries ``(i, j)`` and ``(j, i)`` with different roundings.)
    """
    # the barrier stops XLA from constant-folding an n x n mask (minutes of compile)
    r = lax.optimization_barrier(jnp.arange(k.shape[0]))
    upper = r[:, None] <= r[None, :]
    return jnp.where(upper, k, k.T)


_symmetrize = jax.jit(lambda k: Kernel(_mirror_upper(k.nngp), _mirror_upper(k.ntk)))


def _as_inputs(x, name: str) -> Array:
    if isinstance(x, jax.core.Tracer):
        arr = x
    else:
        try:
            arr = jnp.asarray(x)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be an array of numbers: {e}") from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got {tuple(arr.shape)}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        if jnp.issubdtype(arr.dtype, jnp.complexfloating):
            raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
        arr = arr.astype(jnp.float32)
    if not isinstance(arr, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(arr))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def analytic_kernel(spec: MLPSpec, x1, x2=None, *, block_size: int | None = None,
                    exact_angles: bool | None = None, degree: int = DEFAULT_DEGREE,
                    nodes: int = DEFAULT_NODES) -> Kernel:
    """Infinite-width NNGP and NTK of the MLP ``spec`` (scalar output).

    Args:
      spec: an :class:`~ntkexp.models.mlp.MLPSpec` (NTK or standard
        parameterization; see the module docstring for the conventions).
      x1: inputs ``(n1, d)``.
      x2: inputs ``(n2, d)``, or None for ``x2 = x1`` (the result is then
        exactly symmetric: upper tiles are computed and mirrored).
      block_size: tile size; the pairs are computed in ``block_size^2`` tiles
        inside one ``lax.scan`` so memory is ``O(n1 n2)`` for the result plus
        ``O(block_size^2)`` work space (default 256; n = 20000 in float32 needs
        ~3.2 GB for the two outputs).
      exact_angles: for relu-like activations, compute the first-layer angle
        from pairwise differences of the normalised inputs (full precision for
        (nearly) collinear/antipodal pairs; costs ``O(n1 n2 d)``
        elementwise). Default: on when ``d <= 64``, else the angle comes from
        the Gram matrix (then nearly collinear pairs lose about half the
        digits of ``Tdot``, as ``arccos`` does).
      degree, nodes: Mehler degree and quadrature nodes for activations
        without closed form (:mod:`ntkexp.kernels.quadrature`).

    Returns:
      ``Kernel(nngp=(n1, n2), ntk=(n1, n2))`` in the floating dtype of the inputs.

    Raises:
      TypeError: ``spec`` is not an MLPSpec, or inputs are not real arrays.
      ValueError: inputs of the wrong rank or mismatched dimension, empty, or
        containing NaN/inf; a bad ``block_size``.
    """
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"analytic_kernel needs an MLPSpec, got {type(spec).__name__}")
    sym = x2 is None
    x1 = _as_inputs(x1, "x1")
    if sym:
        x2 = x1
    else:
        x2 = _as_inputs(x2, "x2")
        if x2.shape[1] != x1.shape[1]:
            raise ValueError(
                f"x1 and x2 must have the same input dimension, got {x1.shape[1]} and {x2.shape[1]}"
            )
        dt = jnp.promote_types(x1.dtype, x2.dtype)
        x1, x2 = x1.astype(dt), x2.astype(dt)
    if block_size is None:
        block_size = DEFAULT_BLOCK
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if exact_angles is None:
        exact_angles = x1.shape[1] <= EXACT_ANGLE_MAX_DIM
    if not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be a positive integer, got {degree!r}")
    k = _kernel(spec, x1, x2, sym, int(block_size), bool(exact_angles), degree, int(nodes))
    if sym:
        # A separate executable on materialised buffers: inside one jit, XLA may
        # fuse and recompute entries (i, j) and (j, i) with different roundings.
        k = _symmetrize(k)
    return k


def nngp_diagonal(spec: MLPSpec, x) -> Array:
    """``nngp(x_i, x_i)`` of the output, ``(n,)`` (cheap: no pairs)."""
    x = _as_inputs(x, "x")
    return diag_variances(spec, x)[-1]


__all__ = ["analytic_kernel", "diag_variances", "dual_method", "nngp_diagonal"]

