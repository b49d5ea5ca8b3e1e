"""The fused MLP recursion: infinite-width NNGP and NTK of a dense stack (any activation).

Pure maths over arrays and plain hyperparameters (:class:`MLPKernelSpec`; any
object with the same attributes, such as :class:`ntkexp.models.mlp.MLPSpec`,
works too): this module imports no layer or model. It is the optimisation the
layer-by-layer map (:func:`ntkexp.layers.composition_kernel`) picks for a plain
``[dense, act] * depth + [dense]`` stack (the rule table in
:mod:`ntkexp.layers.fused`); the public entry point for a spec or a layer
composition is :func:`ntkexp.analytic_kernel`.

Convention (``docs/conventions.md``; Jacot et al. 2018, Theorem 1 and
Proposition 1; Lee et al. 2019, eqs. 4-7), NTK parameterization::

    nngp_1 = W_std^2 <x, x'> / d + b_std^2,          ntk_1 = nngp_1,
    nngp_{h+1} = W_std^2 T_h + b_std^2,              ntk_{h+1} = nngp_{h+1} + W_std^2 Tdot_h ntk_h,

with ``T_h = E[phi(u) phi(v)]``, ``Tdot_h = E[phi'(u) phi'(v)]`` under
``(u, v) ~ N(0, [[nngp_h(x,x), nngp_h(x,x')], [., nngp_h(x',x')]])``.

Three ways to get ``T, Tdot`` (chosen from the activation, see :func:`dual_method`):

* ``"angular"``: ``phi(u) = sigma u + delta |u|`` (relu, leaky_relu, abs,
  identity; :class:`ntkexp.activations.AngularDual`). The recursion carries the
  smaller of the *gaps* ``e = s - c`` and ``f = s + c`` (``s = sqrt(q1 q2)``;
  the larger is ``2 s - min``) instead of the cosine, updated as a sum of
  non-negative terms, and the angle is ``2 atan(sqrt(min / max))`` (a fused,
  vectorized Cephes ``atan``, :func:`ntkexp.activations.atan_ratio`). At the
  first layer the gaps come from ``||x/|x| -+ x'/|x'| ||^2`` (coordinate
  differences, when ``exact_angles``), so collinear and antipodal inputs keep
  full precision in every layer (a plain ``arccos(c/s)`` loses half the digits
  there). See :func:`_angular_layers`.
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

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntkexp.activations import Activation, SpecActivationMixin, safe_sqrt
from ntkexp.kernels.base import Kernel
from ntkexp.kernels.quadrature import DEFAULT_DEGREE, DEFAULT_NODES, NumericalDual

Array = jax.Array

DEFAULT_BLOCK = 256
# Pairwise-difference angles are used automatically up to this input dimension.
EXACT_ANGLE_MAX_DIM = 64
_HP = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class MLPKernelSpec(SpecActivationMixin):
    """Hyperparameters of the MLP recursion (hashable: a static jit argument).

    Attributes:
      depth: hidden layers (>= 0); width: the hidden width (used by the standard
        parameterization's NTK only); W_std, b_std: weight and bias multipliers;
      parameterization: ``"ntk"`` or ``"standard"``; activation, activation_params:
        a registered activation name and its parameters (a tuple of pairs), so
        that equal hyperparameters hash equal and reuse one compiled program.
    """

    depth: int
    W_std: float
    b_std: float
    activation: str = "relu"
    activation_params: tuple = ()
    parameterization: str = "ntk"
    width: int = 1


def dual_method(act: Activation) -> str:
    """``"angular"``, ``"closed_form"`` or ``"numerical"``: how ``T, Tdot`` are computed."""
    if act.angular is not None:
        return "angular"
    if act.has_closed_form:
        return "closed_form"
    return "numerical"


def diag_variances(spec: MLPKernelSpec, x: Array, *, degree: int = DEFAULT_DEGREE,
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


def _features(spec: MLPKernelSpec, x: Array, qs: list[Array]) -> tuple[Array, ...]:
    """Per-point quantities a tile needs (all with leading axis ``n``), computed once.

    Angular activations: ``(x, u, r, rq, irq)`` with ``u = x / |x|`` (0 for
    zero rows), ``r = |x|``, ``rq[:, h] = sqrt(q_h)`` (``(n, depth + 1)``) and
    ``irq = 1 / rq`` (0 where ``rq = 0``). Otherwise
    ``(x, q_0, ..., q_{depth-1})``.
    """
    if spec.depth > 0 and dual_method(spec.act) == "angular":
        r = safe_sqrt(jnp.sum(x * x, axis=1))
        u = x / jnp.where(r > 0, r, 1.0)[:, None]
        rq = jnp.stack([safe_sqrt(q) for q in qs[:spec.depth + 1]], axis=1)
        irq = jnp.where(rq > 0, 1.0 / jnp.where(rq > 0, rq, 1.0), 0.0)
        return (x, u, r, rq, irq)
    return (x, *qs[:spec.depth])


def _outer(a: Array, b: Array) -> Array:
    return a[:, None] * b[None, :]


def _first_gaps(u1, u2, g, exact: bool):
    """``(|u1 - u2|^2, |u1 + u2|^2)`` for unit rows ``u1 (B1, d)``, ``u2 (B2, d)``.

    With ``exact``, the smaller of the two (the side picked by the sign of
    ``g = x1 . x2``) is summed from coordinate differences, so (nearly) collinear
    and antipodal pairs keep full precision; the other is ``4 - small`` (>= 2, so
    its relative error is one rounding). Otherwise both come from the Gram matrix.
    """
    if exact:
        pos = g >= 0
        u1t, u2t = u1.T, u2.T
        small = jnp.zeros(g.shape, g.dtype)
        sgn = jnp.where(pos, 1.0, -1.0).astype(g.dtype)
        for k in range(u1.shape[1]):  # unrolled: one fused, vectorized loop
            a = u1t[k][:, None]
            small = small + (a - sgn * u2t[k][None, :]) ** 2
        big = jnp.maximum(4.0 - small, 0.0)
        return jnp.where(pos, small, big), jnp.where(pos, big, small)
    cos = jnp.matmul(u1, u2.T, precision=_HP)
    return jnp.maximum(2 - 2 * cos, 0.0), jnp.maximum(2 + 2 * cos, 0.0)


def _angular_layers(spec: MLPKernelSpec, f1, f2, g: Array, ntk: Array, exact: bool):
    """Relu-family recursion on one tile (``phi = sigma u + delta |u|``), exact at the edges.

    State per pair: ``ntk`` and the *signed smaller gap* ``sig``: with
    ``e = s - c``, ``f = s + c`` (``s = sqrt(q1 q2)``, so ``e + f = 2 s``),
    ``sig = e`` if ``e <= f`` (``theta <= pi/2``) else ``-f`` (the sign bit
    tells which; ``-0.0`` is antipodal). The larger gap is ``2 s - |sig| >= s``
    (no cancellation), ``1 / (e + f) = 1 / (2 s)`` is an outer product of
    per-point vectors, so a layer costs one square root and two divisions per
    pair (:meth:`~ntkexp.activations.AngularDual.from_sorted_gaps` and the
    bias term below). Layers run in a ``fori_loop`` so that XLA materialises
    ``(sig, ntk)`` once per layer instead of re-fusing all previous layers.
    """
    ang = spec.act.angular
    w2, b2 = spec.W_std**2, spec.b_std**2
    std = spec.parameterization == "standard"
    width = float(spec.width)
    bias1 = 1.0 if spec.has_bias else 0.0
    (x1, u1, r1, R1, I1), (_, u2, r2, R2, I2) = f1, f2
    d = x1.shape[1]
    A = w2 * ang.j0
    dm, dp = _first_gaps(u1, u2, g, exact)
    a = w2 / d
    rr = _outer(r1, r2)
    s = _outer(R1[:, 0], R2[:, 0])
    if b2 > 0:
        # s - a r1 r2 - b2 >= 0 without cancellation: s^2 - (a r1 r2 + b2)^2 = a b2 (r1 - r2)^2
        br = (a * b2) * (r1[:, None] - r2[None, :]) ** 2 / (s + a * rr + b2)
    else:
        br = 0.0
    e = br + (a / 2) * rr * dm
    f = br + (a / 2) * rr * dp + 2 * b2
    sig = jnp.where(e <= f, e, -f)

    def duals(h, sig):
        s = _outer(R1[:, h], R2[:, h])
        inv = _outer(0.5 * I1[:, h], I2[:, h])
        mn = jnp.abs(sig)
        mx = jnp.maximum(2 * s - mn, mn)
        return s, ang.from_sorted_gaps(mn, mx, ~jnp.signbit(sig), inv)

    def step(h, carry):
        sig, ntk = carry
        s, (J, Jdot, jm, jp) = duals(h, sig)
        sJ = s * J
        top = (width * sJ + bias1) if std else (w2 * sJ + b2)
        ntk = top + w2 * Jdot * ntk
        # next gaps: e' = s' - c' = br + w2 s jm, f' = br + w2 s jp + 2 b2, where
        # br = s' - A s - b2 >= 0: s'^2 - (A s + b2)^2 = A b2 (sqrt q1 - sqrt q2)^2.
        e = w2 * s * jm
        f = w2 * s * jp + 2 * b2
        sig = jnp.where(e <= f, e, -f)
        if b2 > 0:
            ra, rb = R1[:, h], R2[:, h]
            s_new = _outer(R1[:, h + 1], R2[:, h + 1])
            br = (A * b2) * (ra[:, None] - rb[None, :]) ** 2 / (s_new + A * s + b2)
            sig = sig + jnp.copysign(br, sig)
        return sig, ntk

    sig, ntk = lax.fori_loop(0, spec.depth - 1, step, (sig, ntk))
    s, (J, Jdot, _, _) = duals(spec.depth - 1, sig)
    sJ = s * J
    c = w2 * sJ + b2
    top = (width * sJ + bias1) if std else c
    return c, w2 * Jdot * ntk + top


def _tile(spec: MLPKernelSpec, f1, f2, exact: bool, degree: int, nodes: int):
    """:func:`_features` of ``B1``, ``B2`` points -> ``(nngp, ntk)``, each ``(B1, B2)``."""
    act = spec.act
    method = dual_method(act)
    w2, b2 = spec.W_std**2, spec.b_std**2
    x1, x2 = f1[0], f2[0]
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
        return _angular_layers(spec, f1, f2, g, ntk, exact)
    nd = NumericalDual(act, degree, nodes)
    for h in range(spec.depth):
        Q1, Q2 = f1[1 + h], f2[1 + h]
        if method == "closed_form":
            t = act.T(Q1[:, None], c, Q2[None, :])
            td = act.Tdot(Q1[:, None], c, Q2[None, :])
        else:
            t, td = nd.pair(Q1, c, Q2)
        c = w2 * t + b2
        top = (width * t + bias1) if std else c
        ntk = top + w2 * td * ntk
    return c, ntk


def _starts(n: int, b: int) -> list[int]:
    """Tile starts ``0, b, 2b, ...`` with the last one clamped to ``n - b`` (no padding)."""
    return [min(i * b, n - b) for i in range(-(-n // b))]


@functools.partial(jax.jit, static_argnames=("spec", "sym", "block", "exact", "degree", "nodes"))
def _kernel(spec, x1, x2, sym, block, exact, degree, nodes):
    q1s = diag_variances(spec, x1, degree=degree, nodes=nodes)
    f1 = _features(spec, x1, q1s)
    if sym:
        f2 = f1
    else:
        f2 = _features(spec, x2, diag_variances(spec, x2, degree=degree, nodes=nodes))
    n1, n2 = x1.shape[0], x2.shape[0]
    b1, b2 = min(block, n1), min(block, n2)
    if n1 == b1 and n2 == b2:
        tiles = _tile(spec, f1, f2, exact, degree, nodes)
        if sym:
            # x1 is finite (checked), so this is always true, but XLA cannot know
            tiles = _mirror_if(x1[0, 0] == x1[0, 0], tiles)
        return Kernel(*tiles)
    s1, s2 = _starts(n1, b1), _starts(n2, b2)
    # Tiles are written in place into the (n1, n2) outputs; the last row/column
    # of tiles is shifted back to end at n (overlapping its neighbour) instead
    # of padding, which would cost a copy of the outputs.
    if sym:
        # Upper tiles (I <= J), each also written transposed at (J, I), so every
        # write of (a, b) comes with the same value at (b, a). Diagonal tiles
        # are mirrored. The only tile whose rows and columns overlap off the
        # diagonal is (nb-2, nb-1) (shifted last column); its overlap lies in
        # the last diagonal tile, written after it.
        pairs = [(s1[i], s2[j]) for i in range(len(s1)) for j in range(i, len(s2))]
    else:
        pairs = [(a, b) for a in s1 for b in s2]
    idx = jnp.asarray(np.array(pairs, dtype=np.int32))
    dt = x1.dtype
    out0 = (jnp.zeros((n1, n2), dt), jnp.zeros((n1, n2), dt))

    def body(carry, ij):
        i, j = ij[0], ij[1]
        fa = tuple(lax.dynamic_slice_in_dim(v, i, b1) for v in f1)
        fb = tuple(lax.dynamic_slice_in_dim(v, j, b2) for v in f2)
        tiles = _tile(spec, fa, fb, exact, degree, nodes)
        if sym:
            tiles = _mirror_if(i == j, tiles)
        new = []
        for buf, t in zip(carry, tiles, strict=True):
            if sym:
                buf = lax.dynamic_update_slice(buf, t.T, (j, i))
            buf = lax.dynamic_update_slice(buf, t, (i, j))
            new.append(buf)
        return tuple(new), None

    (nngp, ntk), _ = lax.scan(body, out0, idx)
    return Kernel(nngp, ntk)


def _mirror_if(pred: Array, tiles: tuple[Array, ...]) -> tuple[Array, ...]:
    """``tiles`` with each (square) tile replaced by its mirrored upper triangle if ``pred``.

    A real ``lax.cond`` (``pred`` is traced): its operands and results are
    materialised buffers, so the mirror and the later ``t``/``t.T`` writes only
    move stored values. (An ``optimization_barrier`` is not enough: XLA:CPU
    removes it before fusion and may then recompute entries ``(i, j)`` and
    ``(j, i)`` in differently vectorized loops, with different roundings.)
    """
    return lax.cond(pred, lambda ts: tuple(_mirror_upper(t) for t in ts), lambda ts: ts, tiles)


def _mirror_upper(k: Array) -> Array:
    """Exactly symmetric copy of a square ``k``: its upper triangle mirrored.

    (``(k + k.T) / 2`` is not reliably symmetric after XLA fusion, which may
    recompute entries ``(i, j)`` and ``(j, i)`` with different roundings.)
    """
    # the barrier stops XLA from constant-folding an n x n mask (minutes of compile)
    r = lax.optimization_barrier(jnp.arange(k.shape[0]))
    upper = r[:, None] <= r[None, :]
    return jnp.where(upper, k, k.T)


def check_inputs(x, name: str) -> Array:
    """``x`` as a finite real ``(n, d)`` array (clear TypeError / ValueError otherwise)."""
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
        raise ValueError(
            f"{name} must have at least one row and one column, got {tuple(arr.shape)}"
        )
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        if jnp.issubdtype(arr.dtype, jnp.complexfloating):
            raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
        arr = arr.astype(jnp.float32)
    if not isinstance(arr, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(arr))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def mlp_kernel(spec: MLPKernelSpec, x1, x2=None, *, block_size: int | None = None,
                    exact_angles: bool | None = None, degree: int = DEFAULT_DEGREE,
                    nodes: int = DEFAULT_NODES) -> Kernel:
    """Infinite-width NNGP and NTK of the MLP ``spec`` (scalar output): the fused recursion.

    Args:
      spec: an :class:`MLPKernelSpec` or any object with its attributes (an
        :class:`~ntkexp.models.mlp.MLPSpec`); NTK or standard parameterization
        (see the module docstring for the conventions).
      x1: inputs ``(n1, d)``.
      x2: inputs ``(n2, d)``, or None for ``x2 = x1`` (the result is then
        exactly symmetric: upper tiles are computed and written mirrored).
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
      TypeError: inputs are not real arrays.
      ValueError: inputs of the wrong rank or mismatched dimension, empty, or
        containing NaN/inf; a bad ``block_size``.
    """
    sym = x2 is None
    x1 = check_inputs(x1, "x1")
    if sym:
        x2 = x1
    else:
        x2 = check_inputs(x2, "x2")
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
    return _kernel(spec, x1, x2, sym, int(block_size), bool(exact_angles), degree, int(nodes))


def nngp_diagonal(spec: MLPKernelSpec, x) -> Array:
    """``nngp(x_i, x_i)`` of the output, ``(n,)`` (cheap: no pairs)."""
    x = check_inputs(x, "x")
    return diag_variances(spec, x)[-1]


__all__ = ["MLPKernelSpec", "check_inputs", "diag_variances", "dual_method", "mlp_kernel",
           "nngp_diagonal"]

