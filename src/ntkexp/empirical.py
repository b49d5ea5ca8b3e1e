"""Empirical NTK and NNGP of finite networks, and Monte Carlo limit estimates.

The empirical neural tangent kernel of a network ``f(theta, x) in R^out`` is
(Jacot et al. 2018, section 4)::

    Theta_ab(x, x') = < df_a(x)/dtheta, df_b(x')/dtheta >.

Four ways to compute it (``method=``):

* ``"jacobian"``: per-example Jacobians ``J(x) = df(x)/dtheta`` (one vjp per
  example and output, ``jax.jacrev`` vmapped over examples), contracted over
  the parameters. FLOPs ``~ 3 F out (n1 + n2) + 2 n1 n2 out^t P`` with ``P``
  the parameter count, ``F`` the forward FLOPs of one example and ``t = 1``
  (traced) or ``2`` (full); memory one block of Jacobian rows.
* ``"jvp"``: NTK-vector products ``Theta(X1, x'_j) e_b = J(X1) (J(x'_j)^T e_b)``:
  the vjp of example ``j`` gives a parameter-space tangent, a jvp of the
  linearised network on ``X1`` gives the column. Never holds more than a chunk
  of tangents. FLOPs ``~ 3 F out n2 + 2 F out n1 n2``.
* ``"structured"``: for models implementing the structured protocol
  (:func:`has_structure`: layer compositions of :mod:`ntkexp.layers` whose
  parameterised layers are Dense/Conv, and the MLP's fast path).
  A dense layer ``z = w a W + beta b`` has ``df/dW = w a b^T`` and
  ``df/db = beta b`` with ``a`` the layer input and ``b = df/dz`` the backward
  vector, so (the seed's factorisation; Jacot et al. 2018, eq. 1)::

      Theta_ab(x, x') = sum_h (w_h^2 <a_h(x), a_h(x')> + beta_h^2)
                              * <b_h,a(x), b_h,b(x')>.

  The output layer has ``b_a = e_a``. FLOPs ``~ 4 n P' out`` (one forward,
  one backward through the activations per output) plus
  ``2 n1 n2 sum_h (n_in_h + out^t width_h)`` for the per-layer Grams, halved
  when ``x2 is None`` (only the upper triangle of blocks is computed).
* ``"auto"``: ``"structured"`` where it applies; otherwise the cheaper of
  ``"jacobian"`` and ``"jvp"`` by the FLOP estimates above, with ``F`` taken
  from XLA's cost analysis of ``apply_fn`` on one example (``2 P`` if XLA gives
  none). For MLP-like models (``F ~ 2 P``) this picks ``"jacobian"`` for
  traced kernels and ``"jvp"`` for full kernels with more than two outputs.

All methods tile the input pairs into blocks (``block_size``) to bound memory,
are jit-compiled, and work under ``jax.vmap`` over a stack of parameter sets.
They follow JAX's type promotion: the kernel is computed in the promoted
dtype of the parameters and the inputs (float32 parameters with float64
inputs give a float64 kernel, the Jacobians taken in float64 too), never
silently cast down to the parameters' dtype. ``apply_fn(params, x)`` must treat examples
independently (as every model with frozen state does).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntkexp.kernels.base import Kernel
from ntkexp.models.registry import builder_for

Array = jax.Array

METHODS = ("auto", "structured", "jvp", "jacobian")
GENERIC_METHODS = ("jvp", "jacobian")

# Memory budget (bytes) for one block of Jacobian rows / jvp tangents when
# ``block_size`` is None.
_JAC_BUDGET = 512 * 2**20
# Default tile for the symmetric structured path (upper-triangle tiling halves
# the Gram FLOPs once there are several tiles).
_STRUCT_TILE = 1024
# Tilings with at most this many tile pairs are unrolled (see _tiled_unrolled).
_UNROLL_PAIRS = 16


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _spec_of(tree):
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


_FIT_CACHE: dict = {}


def _check_fit(apply_fn, params, x) -> jax.ShapeDtypeStruct:
    """Shape of ``apply_fn(params, x[:1])`` or one clear ValueError."""
    pspec = _spec_of(params)
    leaves, treedef = jax.tree_util.tree_flatten(pspec)
    key = (apply_fn, treedef, tuple((l.shape, str(l.dtype)) for l in leaves),
           tuple(x.shape[1:]), str(x.dtype))
    try:
        hit = _FIT_CACHE.get(key)
    except TypeError:  # unhashable apply_fn
        hit, key = None, None
    if hit is not None:
        return hit
    if not leaves:
        raise ValueError("params has no array leaves; there is nothing to differentiate")
    for l in leaves:
        if not jnp.issubdtype(l.dtype, jnp.inexact):
            raise TypeError(f"params leaves must be floating point, got a leaf of dtype {l.dtype}")
    xs = jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype)
    try:
        out = jax.eval_shape(apply_fn, pspec, xs)
    except Exception as e:  # noqa: BLE001 - re-raised as one readable line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"apply_fn cannot be applied to these params and inputs of shape "
            f"(n, {', '.join(map(str, x.shape[1:]))}): {first}"
        ) from None
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2 or out.shape[0] != 1:
        raise ValueError(
            f"apply_fn(params, x) must return one array of shape (n, out), got {out!r}"
        )
    if key is not None:
        _FIT_CACHE[key] = out
    return out


def _promote_params(params, x1, x2):
    """Floating ``params`` leaves upcast to their promoted dtype with the inputs.

    Differentiating with respect to upcast parameters gives the same kernel
    (the function is the same) with every product in the wider dtype; float64
    parameters and float32 inputs are left alone (the models promote the
    inputs). Integer inputs do not promote anything.
    """
    xs = [x for x in (x1, x2) if x is not None and jnp.issubdtype(x.dtype, jnp.inexact)]
    leaves = [l for l in jax.tree_util.tree_leaves(params)
              if jnp.issubdtype(jnp.result_type(l), jnp.inexact)]
    if not xs or not leaves:
        return params
    dt = jnp.result_type(*leaves, *xs)

    def up(l):
        ldt = jnp.result_type(l)
        return l.astype(dt) if jnp.issubdtype(ldt, jnp.inexact) and ldt != dt else l

    return jax.tree_util.tree_map(up, params)


def _check_inputs(x1, x2):
    x1 = jnp.asarray(x1)
    if x1.ndim < 1 or x1.shape[0] < 1:
        raise ValueError(f"x1 must be a non-empty batch of inputs (n1, ...), got shape {x1.shape}")
    if x2 is not None:
        x2 = jnp.asarray(x2)
        if x2.ndim != x1.ndim or x2.shape[1:] != x1.shape[1:] or x2.shape[0] < 1:
            raise ValueError(
                f"x1 and x2 must have the same input shape, got {tuple(x1.shape)} "
                f"and {tuple(x2.shape)}"
            )
    return x1, x2


def _check_block(block_size):
    if block_size is None:
        return None
    if (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
            or block_size < 1):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    return int(block_size)


def has_structure(apply_fn) -> bool:
    """Whether ``apply_fn`` implements the structured-NTK protocol.

    That is ``structure_features(params, x) -> features`` (a pytree with
    leading axis ``n``) and ``structure_pair(f1, f2, full=) -> (n1, n2)`` or
    ``(n1, n2, out, out)``, and (if present) ``structured_available`` is true.
    :class:`ntkexp.models.mlp.MLPApply` and :class:`ntkexp.layers.Network`
    implement it.
    """
    return (callable(getattr(apply_fn, "structure_features", None))
            and callable(getattr(apply_fn, "structure_pair", None))
            and bool(getattr(apply_fn, "structured_available", True)))


# --------------------------------------------------------------------------
# Tiling over input pairs
# --------------------------------------------------------------------------


def _to_blocks(tree, m: int):
    """Pad the leading axis ``n`` of every leaf to ``k*m`` and reshape to ``(k, m, ...)``."""

    def f(a):
        n = a.shape[0]
        k = -(-n // m)
        if k * m != n:
            a = jnp.concatenate([a, jnp.zeros((k * m - n,) + a.shape[1:], a.dtype)])
        return a.reshape((k, m) + a.shape[1:])

    return jax.tree_util.tree_map(f, tree)


def _swap(K, full: bool):
    """Transpose a kernel block: ``K[i, j] -> K[j, i]`` (and outputs ``a, b -> b, a``)."""
    return K.transpose(1, 0, 3, 2) if full else K.T


def _tiled(pair_fn, b1, b2, n1: int, n2: int, *, sym: bool, full: bool):
    """Assemble ``(n1, n2[, out, out])`` from ``pair_fn(block1, block2, same)``.

    ``b1``/``b2`` are pytrees of ``(k, m, ...)`` blocks. When ``sym`` only the
    upper triangle of block pairs is computed, diagonal blocks are symmetrised
    (``(K + K^T) / 2``, exact elsewhere), and the lower triangle is filled by
    transposition, so the result is exactly symmetric.
    """
    k1 = jax.tree_util.tree_leaves(b1)[0].shape[0]
    k2 = jax.tree_util.tree_leaves(b2)[0].shape[0]
    take = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)  # noqa: E731
    if k1 == 1 and k2 == 1:
        K = pair_fn(take(b1, 0), take(b2, 0), sym)
        if sym:
            K = (K + _swap(K, full)) / 2
        return K[:n1, :n2]
    if sym:
        pairs = [(i, j) for i in range(k1) for j in range(i, k1)]
    else:
        pairs = [(i, j) for i in range(k1) for j in range(k2)]
    if len(pairs) <= _UNROLL_PAIRS:
        return _tiled_unrolled(pair_fn, b1, b2, k1, k2, n1, n2, sym=sym, full=full)
    I = jnp.asarray([p[0] for p in pairs], jnp.int32)
    J = jnp.asarray([p[1] for p in pairs], jnp.int32)

    def body(ij):
        i, j = ij
        blk1 = jax.tree_util.tree_map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), b1)
        blk2 = jax.tree_util.tree_map(lambda a: lax.dynamic_index_in_dim(a, j, keepdims=False), b2)
        K = pair_fn(blk1, blk2, False)
        if sym:
            K = jnp.where(i == j, (K + _swap(K, full)) / 2, K)
        return K

    blocks = lax.map(body, (I, J))  # (pairs, m1, m2[, o, o])
    m1, m2 = blocks.shape[1], blocks.shape[2]
    tail = blocks.shape[3:]
    out = jnp.zeros((k1, k2, m1, m2) + tail, blocks.dtype).at[I, J].set(blocks)
    if sym:
        swapped = blocks.transpose((0, 2, 1) + ((4, 3) if full else ()))
        out = out.at[J, I].set(swapped)
    out = jnp.moveaxis(out, 2, 1).reshape((k1 * m1, k2 * m2) + tail)
    return out[:n1, :n2]


def _tiled_unrolled(pair_fn, b1, b2, k1: int, k2: int, n1: int, n2: int, *, sym: bool,
                    full: bool):
    """:func:`_tiled` for a few tiles: one traced block per pair, assembled by
    concatenation. XLA:CPU runs the matmuls of a ``lax.map`` body at about half
    the rate it reaches outside a loop (profiled: 25.8 vs 11.5 matmul units for the
    10 structured tiles at n = 4096), so small tilings are unrolled."""
    take = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)  # noqa: E731
    blocks = {}
    for i in range(k1):
        for j in range(i if sym else 0, k2):
            K = pair_fn(take(b1, i), take(b2, j), False)
            if sym and i == j:
                K = (K + _swap(K, full)) / 2
            blocks[i, j] = K
    rows = [jnp.concatenate([blocks[i, j] if (i, j) in blocks else _swap(blocks[j, i], full)
                             for j in range(k2)], axis=1) for i in range(k1)]
    return jnp.concatenate(rows, axis=0)[:n1, :n2]


# --------------------------------------------------------------------------
# Structured (dense-layer factorisation)
# --------------------------------------------------------------------------


def _structure_features(apply_fn, params, x, m):
    """The model's structured-NTK features, blocked ``(k, m, ...)``."""

    def feats(xb):
        return apply_fn.structure_features(params, xb)

    xb = _to_blocks(x, m)
    if xb.shape[0] == 1:
        return jax.tree_util.tree_map(lambda a: a[None], feats(xb[0]))
    return lax.map(feats, xb)


def _ntk_structured(apply_fn, params, x1, x2, *, m1, m2, full):
    sym = x2 is None
    f1 = _structure_features(apply_fn, params, x1, m1)
    f2 = f1 if sym else _structure_features(apply_fn, params, x2, m2)
    n2 = x1.shape[0] if sym else x2.shape[0]

    def pair(a, b, same):
        return apply_fn.structure_pair(a, b, full=full)

    return _tiled(pair, f1, f2, x1.shape[0], n2, sym=sym, full=full)


# --------------------------------------------------------------------------
# Generic: Jacobian contraction and NTK-vector products
# --------------------------------------------------------------------------


def _per_example(apply_fn):
    return lambda p, xi: apply_fn(p, xi[None])[0]  # (out,)


def _jacobian_rows(apply_fn, params, xb):
    """Leaves ``(m, out, *pshape)``: per-example Jacobians ``df(x_i)/dtheta``."""
    return jax.vmap(jax.jacrev(_per_example(apply_fn)), in_axes=(None, 0))(params, xb)


def _contract(J1, J2, *, full: bool):
    K = None
    for a, b in zip(jax.tree_util.tree_leaves(J1), jax.tree_util.tree_leaves(J2), strict=True):
        m1, o = a.shape[:2]
        m2 = b.shape[0]
        if full:
            t = (a.reshape(m1 * o, -1) @ b.reshape(m2 * o, -1).T).reshape(m1, o, m2, o)
            t = t.transpose(0, 2, 1, 3)
        else:
            t = a.reshape(m1, -1) @ b.reshape(m2, -1).T
        K = t if K is None else K + t
    return K


def _ntk_jacobian(apply_fn, params, x1, x2, *, m1, m2, full):
    sym = x2 is None

    def pair(xa, xb, same):
        Ja = _jacobian_rows(apply_fn, params, xa)
        Jb = Ja if same else _jacobian_rows(apply_fn, params, xb)
        return _contract(Ja, Jb, full=full)

    b1 = _to_blocks(x1, m1)
    b2 = b1 if sym else _to_blocks(x2, m2)
    n2 = x1.shape[0] if sym else x2.shape[0]
    return _tiled(pair, b1, b2, x1.shape[0], n2, sym=sym, full=full)


def _ntk_jvp(apply_fn, params, x1, x2, *, m1, m2, chunk, full):
    sym = x2 is None
    f1 = _per_example(apply_fn)

    def pair(xa, xb, same):
        _, lin = jax.linearize(lambda p: apply_fn(p, xa), params)  # primal once per block

        def column(xj):
            out, vjp_fn = jax.vjp(lambda p: f1(p, xj), params)
            eye = jnp.eye(out.shape[0], dtype=out.dtype)
            tangents = jax.vmap(lambda e: vjp_fn(e)[0])(eye)  # (out, *pshape): J(x_j)^T e_b
            return jax.vmap(lin)(tangents)  # (out_b, m1, out_a)

        cols = lax.map(column, xb, batch_size=min(chunk, xb.shape[0]))  # (m2, out_b, m1, out_a)
        if full:
            return cols.transpose(2, 0, 3, 1)
        return jnp.trace(cols, axis1=1, axis2=3).T

    b1 = _to_blocks(x1, m1)
    b2 = b1 if sym else _to_blocks(x2, m2)
    n2 = x1.shape[0] if sym else x2.shape[0]
    return _tiled(pair, b1, b2, x1.shape[0], n2, sym=sym, full=full)


_STATIC = ("apply_fn", "method", "m1", "m2", "chunk", "full")


def _ntk_core_impl(params, x1, x2, *, apply_fn, method, m1, m2, chunk, full):
    if method == "structured":
        return _ntk_structured(apply_fn, params, x1, x2, m1=m1, m2=m2, full=full)
    if method == "jacobian":
        return _ntk_jacobian(apply_fn, params, x1, x2, m1=m1, m2=m2, full=full)
    return _ntk_jvp(apply_fn, params, x1, x2, m1=m1, m2=m2, chunk=chunk, full=full)


_ntk_core = jax.jit(_ntk_core_impl, static_argnames=_STATIC)


# --------------------------------------------------------------------------
# Cost model (for "auto" and the benchmark)
# --------------------------------------------------------------------------

_FLOP_CACHE: dict = {}


def forward_flops(apply_fn, params, x_example_shape, dtype) -> float:
    """FLOPs of ``apply_fn`` on one example, from XLA's cost analysis (``2 P`` if none)."""
    pspec = _spec_of(params)
    leaves, treedef = jax.tree_util.tree_flatten(pspec)
    P = float(sum(math.prod(l.shape) for l in leaves))
    key = (apply_fn, treedef, tuple(l.shape for l in leaves), tuple(x_example_shape), str(dtype))
    try:
        if key in _FLOP_CACHE:
            return _FLOP_CACHE[key]
    except TypeError:
        key = None
    flops = 2.0 * P
    try:
        xs = jax.ShapeDtypeStruct((1,) + tuple(x_example_shape), dtype)
        ca = jax.jit(apply_fn).lower(pspec, xs).cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0] if ca else None
        if ca and ca.get("flops", 0) > 0:
            flops = float(ca["flops"])
    except Exception:  # noqa: BLE001 - cost analysis is best effort
        pass
    if key is not None:
        _FLOP_CACHE[key] = flops
    return flops


def generic_costs(F: float, P: float, n1: int, n2: int, out: int, *, full: bool, sym: bool) -> dict:
    """FLOP estimates of the generic methods (module docstring); used by ``"auto"``."""
    half = 0.5 if sym else 1.0
    jac = (3 * F * out * (n1 + (0 if sym else n2))
           + 2 * n1 * n2 * P * out ** (2 if full else 1) * half)
    jvp = 3 * F * out * n2 + 2 * F * out * n1 * n2 * half
    return {"jacobian": jac, "jvp": jvp}


def structured_flops(spec, in_dim: int, n1: int, n2: int | None = None, *, full: bool = False,
                     tile: int | None = None) -> float:
    """FLOPs of the structured method on an MLP (what ``"auto"`` runs for one).

    Forward ``2 n P_W``, backward through the activations ``2 n (P_W - in*width
    - width*out)`` per output (the first layer's and the output layer's weights
    need no backward matmul beyond ``b^(depth-1)``), and per layer the Grams:
    ``2 n1 n2 (n_in + out^t width)`` (``t = 1`` traced, ``2`` full). When
    ``n2`` is None only the ``k (k + 1) / 2`` upper-triangle tiles of size
    ``m`` are computed (``tile``: as ``empirical_ntk`` chooses it by default).
    """
    sym = n2 is None
    n2_ = n1 if sym else n2
    dims = spec.layer_dims(in_dim)
    out = spec.out_dim
    n_tot = n1 if sym else n1 + n2_
    pw = sum(i * o for i, o in dims)
    fwd = 2 * n_tot * pw
    bwd = (2 * n_tot * out * sum(i * o for i, o in dims[1:-1])
           + 2 * n_tot * out * spec.width * (spec.depth > 0))
    t = 2 if full else 1
    gram = 0.0
    for h, (i, o) in enumerate(dims):
        gram += 2 * n1 * n2_ * i
        if h < len(dims) - 1:
            gram += 2 * n1 * n2_ * o * out**t
    if sym:
        m = tile or (n1 if n1 <= _STRUCT_TILE else -(-n1 // -(-n1 // _STRUCT_TILE)))
        k = -(-n1 // m)
        if k > 1:
            gram *= (k * (k + 1) / 2) * m * m / (n1 * n1)
    return float(fwd + bwd + gram)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def _itemsize(params) -> int:
    return max(jnp.dtype(l.dtype).itemsize for l in jax.tree_util.tree_leaves(_spec_of(params)))


def _nparams(params) -> int:
    return int(sum(math.prod(jnp.shape(l)) for l in jax.tree_util.tree_leaves(params)))


OUTPUTS = ("mean", "trace", "full")


def require_finite(x, name: str = "x", *, who: str = "empirical_ntk") -> None:
    """Raise ``ValueError`` (one line) if the concrete array ``x`` holds NaN or inf.

    Traced arrays (inside ``jit``/``vmap``) are not checked: their values are not
    known. ``ntkexp.training.train`` and :func:`empirical_ntk` call it on their
    inputs, so NaN inputs are named as such instead of surfacing as a NaN kernel
    or a "diverged: lower the learning rate" loss.
    """
    if isinstance(x, jax.core.Tracer):
        return
    a = np.asarray(x) if not isinstance(x, jax.Array) else x
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        return
    finite = np.isfinite(np.asarray(a))
    if not finite.all():
        bad = int(finite.size - finite.sum())
        raise ValueError(f"{who}: {name} holds {bad} NaN or inf value(s) (of {finite.size}); "
                         "clean the inputs first")


def require_finite_inputs(x, y, probe_x=None) -> None:
    """:func:`require_finite` on the inputs ``x``, targets ``y`` and ``probe_x`` of
    ``ntkexp.training.train`` (its first line)."""
    for name, a in (("x", x), ("y", y), ("probe_x", probe_x)):
        if a is not None:
            require_finite(a, name, who="train")


def _auto_method(apply_fn, params, x1, n1: int, n2: int, o: int, *, full: bool,
                 sym: bool) -> str:
    """``method="auto"``: the structured map where the model has one, else the
    cheaper of jvp / jacobian by :func:`generic_costs`."""
    if has_structure(apply_fn):
        return "structured"
    F = forward_flops(apply_fn, params, x1.shape[1:], x1.dtype)
    costs = generic_costs(F, _nparams(params), n1, n2, o, full=full, sym=sym)
    return min(costs, key=costs.get)


def _tiles(method: str, params, n1: int, n2: int, o: int, *, block_size: int | None,
           sym: bool) -> tuple[int, int, int]:
    """Tile sizes ``(m1, m2, chunk)`` of :func:`empirical_ntk` for ``method``."""
    if method == "structured":
        if block_size is not None:
            return min(block_size, n1), min(block_size, n2), 1
        if sym and n1 > _STRUCT_TILE:
            k = -(-n1 // _STRUCT_TILE)
            return -(-n1 // k), -(-n1 // k), 1
        return n1, n2, 1
    row_bytes = max(1, o * _nparams(params) * _itemsize(params))
    default = max(1, _JAC_BUDGET // row_bytes)
    if method == "jacobian":
        m = block_size or default
        return min(m, n1), min(m, n2), 1
    # symmetric: 4 x 4 tiles, only the 10 upper ones computed (-37.5% work)
    auto_m = -(-n1 // 4) if (sym and n1 >= 64) else n1
    m1 = min(block_size or auto_m, n1)
    m2 = min(block_size or n2, n2)
    return m1, m2, max(1, min(default, m1 if sym else m2))


def empirical_ntk(apply_fn, params, x1, x2=None, *, method: str = "auto",
                  block_size: int | None = None, outputs: str | None = None,
                  trace_outputs: bool | None = None) -> Array:
    """Empirical NTK ``<df(x1)/dtheta, df(x2)/dtheta>`` of a finite network.

    Output reduction (``outputs``), for a network with ``out`` outputs:

    * ``"mean"`` (default): the per-output NTK ``(1/out) sum_a Theta_aa``,
      ``(n1, n2)``: the convention of :func:`ntkexp.analytic_kernel`, whose NTK
      is that of one output (at infinite width every output has the same
      kernel and different outputs are uncorrelated), so the two compare
      directly at any ``out``;
    * ``"trace"``: ``sum_a Theta_aa``, ``(n1, n2)`` (``out`` times the mean);
    * ``"full"``: the whole block ``Theta_ab(x1_i, x2_j)``, ``(n1, n2, out, out)``
      (what natural-gradient descent needs).

    For one output the three agree (up to the trailing ``(1, 1)`` of ``full``).

    Args:
      apply_fn: pure ``apply_fn(params, x) -> (n, out)`` (``ntkexp.functional``
        of a Flax NNX module, a linen ``module.apply``, or an
        :class:`~ntkexp.models.mlp.MLPApply`).
      params: the parameter pytree (floating point leaves).
      x1: inputs ``(n1, ...)``.
      x2: inputs ``(n2, ...)`` or None for ``x2 = x1`` (then the result is
        exactly symmetric and only half the work is done).
      method: ``"auto"``, ``"structured"``, ``"jvp"`` or ``"jacobian"``
        (see the module docstring for what each does and costs).
      block_size: tile size over inputs bounding peak memory (the kernel is
        assembled from ``block_size x block_size`` tiles); None chooses one
        (whole inputs for the structured method up to 1024 inputs, else
        about equal tiles of at most 1024, which measured fastest on CPU;
        Jacobian/tangent blocks of at most 512 MiB).
      outputs: ``"mean"`` (None: the default), ``"trace"`` or ``"full"`` (above).
      trace_outputs: the older switch: True is ``outputs="trace"``, False
        ``outputs="full"`` (only when ``outputs`` is None).

    Returns:
      ``(n1, n2)`` or (``"full"``) ``(n1, n2, out, out)`` in the dtype of the outputs.

    Raises:
      ValueError: unknown method or reduction, bad ``block_size``, params that do
        not fit ``apply_fn``, mismatched input shapes, NaN/inf inputs, or
        ``"structured"`` for a model without dense-layer structure.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if outputs is None:
        outputs = "mean" if trace_outputs is None else ("trace" if trace_outputs else "full")
    if outputs not in OUTPUTS:
        raise ValueError(f"unknown outputs reduction {outputs!r}; known: {', '.join(OUTPUTS)}")
    block_size = _check_block(block_size)
    x1, x2 = _check_inputs(x1, x2)
    require_finite(x1, "x1")
    if x2 is not None:
        require_finite(x2, "x2")
    params = _promote_params(params, x1, x2)
    out = _check_fit(apply_fn, params, x1)
    sym = x2 is None
    n1 = x1.shape[0]
    n2 = n1 if sym else x2.shape[0]
    full = outputs == "full"
    if method == "structured" and not has_structure(apply_fn):
        raise ValueError(
            f"method 'structured' needs a model that exposes its layer structure "
            f"(structure_features/structure_pair, e.g. a dense or conv layer composition), got "
            f"{type(apply_fn).__name__}; use method 'jvp', 'jacobian' or 'auto'"
        )
    o = out.shape[1]
    if method == "auto":
        method = _auto_method(apply_fn, params, x1, n1, n2, o, full=full, sym=sym)
    m1, m2, chunk = _tiles(method, params, n1, n2, o, block_size=block_size, sym=sym)
    if sym:
        m2 = m1
    K = _ntk_core(params, x1, x2, apply_fn=apply_fn, method=method,
                  m1=int(m1), m2=int(m2), chunk=int(chunk), full=full)
    return K / o if outputs == "mean" and o != 1 else K


def _nngp_pair(a, b, same, *, w2, b2):
    K = w2 * (a @ b.T)
    return K + b2 if b2 != 0.0 else K


def _nngp_core_impl(params, x1, x2, *, apply_fn, m):
    sym = x2 is None
    scales = {}

    def feats(xb):
        a, w2, b2 = apply_fn.readout_features(params, xb)
        scales.update(w2=float(w2), b2=float(b2))
        return a

    def blocked(x):
        xb = _to_blocks(x, m)
        if xb.shape[0] == 1:
            return feats(xb[0])[None]
        return lax.map(feats, xb)

    f1 = blocked(x1)
    f2 = f1 if sym else blocked(x2)

    def pair(a, b, same):
        return _nngp_pair(a, b, same, w2=scales["w2"], b2=scales["b2"])

    n2 = x1.shape[0] if sym else x2.shape[0]
    return _tiled(pair, f1, f2, x1.shape[0], n2, sym=sym, full=False)


_nngp_core = jax.jit(_nngp_core_impl, static_argnames=("apply_fn", "m"))


def empirical_nngp(apply_fn, params, x1, x2=None, *, block_size: int | None = None) -> Array:
    """Empirical NNGP from the last hidden layer's features.

    For an MLP with last-hidden-layer features ``a(x)`` of width ``n``, this is
    the covariance of the output over the readout layer's prior given the
    features (Lee et al. 2018; Jacot et al. 2018, Prop. 1)::

        K(x, x') = W_std^2 / n <a(x), a(x')> + b_std^2.

    In NTK parameterization this is ``w_mult^2 <a, a'> + b_mult^2``; in standard
    parameterization the same formula (with the spec's ``W_std``, ``b_std``)
    is used, since both parameterizations draw the same function distribution.
    Its mean over initialisations is the analytic NNGP (per output).

    Args:
      apply_fn: a model with ``readout_features(params, x) -> (a, w2, b2)``
        (an MLP, a layer composition ending in a dense readout).
      params: its parameter pytree.
      x1: ``(n1, d)``; x2: ``(n2, d)`` or None (exactly symmetric result).
      block_size: tile size over inputs (None: whole inputs).

    Returns:
      ``(n1, n2)`` array.
    """
    block_size = _check_block(block_size)
    x1, x2 = _check_inputs(x1, x2)
    params = _promote_params(params, x1, x2)
    _check_fit(apply_fn, params, x1)
    if not _has_readout(apply_fn, params, x1):
        raise ValueError(
            "empirical_nngp needs a model that exposes its last hidden layer "
            "(readout_features: a dense readout on flat features); "
            f"got {type(apply_fn).__name__}. For other models estimate the NNGP as the "
            "output covariance over initialisations (monte_carlo_kernel)")
    m = block_size or max(x1.shape[0], 1 if x2 is None else x2.shape[0])
    return _nngp_core(params, x1, x2, apply_fn=apply_fn, m=int(m))


def _has_readout(apply_fn, params, x) -> bool:
    """Whether the model exposes readout features for these params and inputs."""
    fn = getattr(apply_fn, "readout_features", None)
    return callable(fn) and _readout_probe(fn, params, x)


def _readout_probe(fn, params, x) -> bool:
    found = []

    def f(p, xx):
        r = fn(p, xx)
        found.append(r is not None)
        return jnp.zeros(())

    jax.eval_shape(f, params, x[:1])
    return bool(found and found[0])


def monte_carlo_kernel(spec_or_builder, x1, x2=None, *, key, n_samples: int, width: int,
                       method: str = "auto", batch_size: int | None = None,
                       dtype=None) -> Kernel:
    """Monte Carlo estimate of the infinite-width NNGP and NTK.

    Averages the empirical kernels of ``n_samples`` independent initialisations
    (vmapped over keys) of width ``width``; the mean converges to the analytic
    ``Kernel`` as ``width -> inf`` (Jacot et al. 2018, Thm. 1 and 2) and the
    sampling error falls like ``1/sqrt(n_samples * width)``.

    Args:
      spec_or_builder: a registered architecture's spec (e.g.
        :class:`~ntkexp.models.mlp.MLPSpec`; its width is replaced by ``width``),
        a layer composition (:mod:`ntkexp.layers`; its hidden widths are
        replaced) or a builder ``(key, width) -> (apply_fn,
        params)`` returning the same ``apply_fn`` for every key.
      x1: ``(n1, ...)``; x2: ``(n2, ...)`` or None.
      key: PRNG key.
      n_samples: number of initialisations K >= 1.
      width: hidden width.
      method: empirical NTK method.
      batch_size: initialisations per vmapped batch (None: all at once).
      dtype: parameter dtype for a spec or composition (default: the dtype of ``x1``).

    Returns:
      ``Kernel(nngp, ntk)``, each ``(n1, n2)``, per output: the NTK is the
      output-traced NTK divided by ``out``; the NNGP is the empirical NNGP
      (last hidden layer) for MLPs, else the output covariance
      ``mean_a f_a(x) f_a(x')``.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    x1, x2 = _check_inputs(x1, x2)
    if callable(spec_or_builder) and not hasattr(spec_or_builder, "kernel") \
            and not dataclasses.is_dataclass(spec_or_builder):
        builder = spec_or_builder
    else:
        builder = builder_for(spec_or_builder, tuple(x1.shape[1:]), dtype or x1.dtype)
    keys = jax.random.split(key, n_samples)
    apply_fn, p0 = builder(keys[0], width)
    out_dim = _check_fit(apply_fn, p0, x1).shape[1]
    mlp_like = _has_readout(apply_fn, p0, x1)

    def one(k):
        params = builder(k, width)[1]
        ntk = empirical_ntk(apply_fn, params, x1, x2, method=method, outputs="mean")
        if mlp_like:
            nngp = empirical_nngp(apply_fn, params, x1, x2)
        else:
            f1 = apply_fn(params, x1)
            f2 = f1 if x2 is None else apply_fn(params, x2)
            nngp = (f1 @ f2.T) / out_dim
        return Kernel(nngp, ntk)

    del p0
    ks = lax.map(one, keys, batch_size=batch_size or n_samples)
    return Kernel(jnp.mean(ks.nngp, axis=0), jnp.mean(ks.ntk, axis=0))
