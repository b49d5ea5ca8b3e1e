"""Analytic NNGP and NTK of a stack of stride-1 'SAME' convolutions: CNTK-V and CNTK-GAP.

The fused, memory-lean kernel map behind ``arch: cnn`` and behind any layer
composition of the form ``[conv, act] * depth + [global_avg_pool | flatten,
dense]`` (the ``conv_stack`` rule of :mod:`ntkexp.layers.fused`). It takes
plain hyperparameters and arrays, so it imports no layer or model.

Recursion (Arora et al. 2019, "On exact computation with an infinitely wide
neural net", section 4 and appendix B, with ``c_sigma = W_std^2`` and biases;
Novak et al. 2019; Garriga-Alonso et al. 2019). For inputs ``x, x'`` and
positions ``i, j``, with ``[.]_D`` the patch mean
``[K]_{ij} = (1/P) sum_delta K_{i+delta, j+delta}`` (zero outside the image;
the padded zeros count in ``1/P``, ``P = q^k``)::

    K^0_{ij}      = <x_i, x'_j> / C_in
    Sigma^h_{ij}  = W_std^2 [K^{h-1}]_{ij} + b_std^2
    Theta^h_{ij}  = Sigma^h_{ij} + W_std^2 [Kdot^{h-1} * Theta^{h-1}]_{ij}   (h > 1)
    K^h_{ij}      = T(Sigma^h_ii(x,x), Sigma^h_ij(x,x'), Sigma^h_jj(x',x'))
    Kdot^h_{ij}   = Tdot(same)

Readout on ``L = depth``: GAP ``nngp = W_std^2 mean_{i,j} K^L_{ij} + b_std^2``,
``ntk = nngp + W_std^2 mean_{i,j} (Kdot^L Theta^L)_{ij}``; vec the same with the
mean over the diagonal ``i = j`` only (the patch mean moves ``i`` and ``j`` by
the same ``delta``, so the diagonal only ever needs the diagonal: ``O(N)`` per
pair instead of ``O(N^2)``).

How it is computed (issue 12: speed and memory):

* **Pairs in cache-sized blocks.** Every input pair ``(a, b)`` is independent
  (the self-variances ``Sigma^h_ii(x, x)`` are a separate ``O(n N)`` recursion
  on the diagonal). Pairs are processed in blocks of ``B`` pairs by
  ``lax.map``; a block runs the whole depth (input covariance, every layer,
  the readout mean) on ``(B, *S, *S)`` arrays that stay in cache, so the
  intermediates of a layer never go to memory. Peak memory is the output
  ``(n1, n2)`` plus ``O(B N^2)`` for the block: linear in the pairs of a tile
  times ``N^2`` at most, and independent of ``n`` per block.
* **Symmetry.** For ``x2 = None`` only the pairs ``a <= b`` are computed
  (``n (n + 1) / 2``) and mirrored, so the result is exactly symmetric.
* **Lean dual maps.** For the relu family (``phi(u) = sigma u + delta |u|``;
  Cho & Saul 2009) with ``s = sqrt(q1 q2)``, gaps ``e = s - c``, ``f = s + c``
  and ``p = sqrt(min(e, f) max(e, f)) = s sin(theta)``, the angle is
  ``u = 2 atan(p / max(e, f)) = min(theta, pi - theta)``
  (:func:`ntkexp.activations.atan_ratio`: a vectorised Cephes kernel, not
  XLA's scalar ``atan2``), exact at both edges, and::

      T    = sigma^2 c + delta^2 (2 p + (pi - 2 theta) c) / pi
      Tdot = sigma^2 + delta^2 (1 - 2 theta / pi)

  one square root and one division per entry (``s`` is an outer product of
  per-position square roots). Other closed forms use the activation's ``T``
  and ``Tdot``; activations without one go through the generic layer
  composition (Mehler fallback, :mod:`ntkexp.layers.activation`).

FLOPs (relu, GAP, ``n`` points, ``N`` positions, filter ``P = q^k``): each
layer costs per entry ``2 P`` adds for the two patch sums plus about 40 for the
dual (square root, the atan kernel's rational function and division, the
selects), so the map is about ``depth * (2 P + 40) * N^2`` flops per pair,
``n (n + 1) / 2`` pairs when symmetric; see ``benchmarks/bench_cnn.py``.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.activations import Activation, atan_ratio, get_activation, safe_sqrt
from ntkexp.kernels.base import Kernel

Array = jax.Array
PIXEL_PAIRS = ("auto", "diagonal", "all")
READOUTS = ("gap", "vec")
#: default block size in kernel entries (pairs x positions^2) per lax.map step
BLOCK_ENTRIES = 1 << 17


def same_pad(q: int) -> tuple[int, int]:
    """``(lo, hi)`` zero padding of lax's ``'SAME'`` for filter ``q`` at stride 1."""
    lo = (q - 1) // 2
    return lo, q - 1 - lo


def patch_mean(a: Array, q: int, k: int, groups: int) -> Array:
    """``(1/P) sum_delta a[..., i + delta, (j + delta)]``, zero outside (``P = q^k``).

    Args:
      a: ``(B, *S)`` (``groups=1``) or ``(B, *S, *S)`` (``groups=2``), ``k``
        spatial axes per group; the same shift ``delta`` moves every group.
    """
    S = a.shape[1:1 + k]
    lo, hi = same_pad(q)
    padded = jnp.pad(a, [(0, 0)] + [(lo, hi)] * (k * groups))
    out = None
    for delta in itertools.product(range(q), repeat=k):
        idx = tuple(slice(d, d + s) for d, s in zip(delta, S, strict=True))
        term = padded[(slice(None),) + idx * groups]
        out = term if out is None else out + term
    return out / (q**k)


def relu_family_duals(sigma: float, delta: float, r1: Array, r2: Array, c: Array):
    """``(T, Tdot)`` of ``phi(u) = sigma u + delta |u|`` from ``r = sqrt(q)`` and ``c``.

    Args:
      r1, r2: square roots of the two variances, broadcastable against ``c``.
      c: the covariance.

    See the module docstring for the formulas (exact at ``theta = 0`` and ``pi``).
    """
    s = r1 * r2
    e = jnp.maximum(s - c, 0.0)
    f = jnp.maximum(s + c, 0.0)
    mn = jnp.minimum(e, f)
    mx = jnp.maximum(e, f)
    p = safe_sqrt(mn * mx)
    u = 2 * atan_ratio(p, mx)  # min(theta, pi - theta)
    lin = jnp.where(e <= f, 1 - u * (2 / math.pi), u * (2 / math.pi) - 1)  # 1 - 2 theta / pi
    s2, d2 = sigma**2, delta**2
    T = s2 * c + d2 * ((2 / math.pi) * p + lin * c)
    Tdot = s2 + d2 * lin
    return T, Tdot


def dual_key(act: Activation) -> tuple:
    """A hashable description of ``act``'s dual maps (a static jit argument).

    ``("angular", sigma, delta)`` for the relu family (so that a fresh
    Activation object does not recompile), ``("closed", act)`` otherwise.
    """
    if act.angular is not None:
        return ("angular", float(act.angular.sigma), float(act.angular.delta))
    if act.has_closed_form:
        return ("closed", act)
    raise NotImplementedError(f"activation {act.name!r} has no closed-form dual maps")


def _duals(key: tuple):
    """``f(r1, r2, q1, q2, c) -> (T, Tdot)`` elementwise for a :func:`dual_key`."""
    if key[0] == "angular":
        _, sig, dl = key

        def f(r1, r2, q1, q2, c):
            return relu_family_duals(sig, dl, r1, r2, c)
        return f
    act = key[1]

    def g(r1, r2, q1, q2, c):
        return act.T(q1, c, q2), act.Tdot(q1, c, q2)
    return g


def _diag_T(key: tuple, q: Array) -> Array:
    """``T(q, q, q) = E[phi(u)^2]`` elementwise."""
    if key[0] == "angular":
        return (key[1] ** 2 + key[2] ** 2) * q
    return key[1].T(q, q, q)


def self_variances(x: Array, depth: int, q: int, W_std: float, b_std: float,
                   act: tuple) -> Array:
    """Per-position pre-activation variances ``Sigma^h_ii(x, x)``: ``(depth, n, *S)``.

    ``act`` is a :func:`dual_key`.
    """
    k = x.ndim - 2
    w2, b2 = W_std**2, b_std**2
    kk = jnp.sum(x * x, axis=-1) / x.shape[-1]
    out = []
    for _ in range(depth):
        s = w2 * patch_mean(kk, q, k, 1) + b2
        out.append(s)
        kk = _diag_T(act, s)
    if not out:  # depth 0: no hidden layer, nothing to stack
        return jnp.zeros((0, *kk.shape), kk.dtype)
    return jnp.stack(out)


def _block(xa, xb, qa, qb, same, *, depth, q, W_std, b_std, act, full, vec):
    """One block of pairs: ``xa, xb (B, *S, C)``, ``qa, qb (depth, B, *S)`` -> ``(B,)`` x 2.

    ``same (B,)`` (or None) marks pairs of a point with itself: there the
    position-diagonal covariance is set to exactly ``sqrt(q) sqrt(q)`` (relu
    family) or ``q`` (closed forms), so the angle is exactly 0 instead of the
    ``sqrt(eps)`` that one rounding step between two summation orders gives.
    """
    k = xa.ndim - 2
    w2, b2 = W_std**2, b_std**2
    duals = _duals(act)
    hp = jax.lax.Precision.HIGHEST
    sp1, sp2 = "abc"[:k], "def"[:k]
    if full:
        K = jnp.einsum(f"n{sp1}z,n{sp2}z->n{sp1}{sp2}", xa, xb, precision=hp) / xa.shape[-1]
        ones = (1,) * k

        def b1(v):
            return v.reshape(v.shape[0], *v.shape[1:], *ones)

        def b2_(v):
            return v.reshape(v.shape[0], *ones, *v.shape[1:])
    else:
        K = jnp.sum(xa * xb, axis=-1) / xa.shape[-1]

        def b1(v):
            return v

        b2_ = b1
    groups = 2 if full else 1
    ra, rb = safe_sqrt(qa), safe_sqrt(qb)
    if same is not None:
        S = xa.shape[1:-1]
        N = math.prod(S)
        if full:
            eye = jnp.eye(N, dtype=bool).reshape(*S, *S)
            mask = same.reshape(-1, *(1,) * (2 * k)) & eye[None]
        else:
            mask = jnp.broadcast_to(same.reshape(-1, *(1,) * k), (same.shape[0], *S))
    KT = None
    for h in range(depth):
        sigma = w2 * patch_mean(K, q, k, groups) + b2
        if same is not None:
            exact = b1(ra[h]) * b2_(ra[h]) if act[0] == "angular" else b1(qa[h])
            sigma = jnp.where(mask, exact, sigma)
        theta = sigma if KT is None else sigma + w2 * patch_mean(KT, q, k, groups)
        T, Td = duals(b1(ra[h]), b2_(rb[h]), b1(qa[h]), b2_(qb[h]), sigma)
        K, KT = T, Td * theta
    if full and vec:  # CNTK-V from the full recursion (a cross-check): the diagonal i = j
        N = math.prod(xa.shape[1:-1])

        def diag(v):
            return jnp.diagonal(v.reshape(v.shape[0], N, N), axis1=1, axis2=2)

        K = diag(K)
        KT = None if KT is None else diag(KT)
    axes = tuple(range(1, K.ndim))
    nngp = w2 * jnp.mean(K, axis=axes) + b2
    if KT is None:  # depth 0: a linear readout of x
        return nngp, nngp
    return nngp, nngp + w2 * jnp.mean(KT, axis=axes)


@functools.partial(jax.jit, static_argnames=("depth", "q", "W_std", "b_std", "act", "full",
                                             "vec", "sym"))
def _kernel(x1, x2, ja, jb, *, depth, q, W_std, b_std, act, full, vec, sym):
    """``ja, jb (nb, B)`` int32: the pair indices, block by block (passed as arrays, not
    baked into the program as constants)."""
    n1, n2 = x1.shape[0], x2.shape[0]
    q1s = self_variances(x1, depth, q, W_std, b_std, act)
    q2s = q1s if sym else self_variances(x2, depth, q, W_std, b_std, act)
    fn = functools.partial(_block, depth=depth, q=q, W_std=W_std, b_std=b_std, act=act,
                           full=full, vec=vec)

    def one(idx):
        a, b = idx
        return fn(x1[a], x2[b], q1s[:, a], q2s[:, b], a == b if sym else None)

    nngp, ntk = jax.lax.map(one, (ja, jb))
    m = n1 * (n1 + 1) // 2 if sym else n1 * n2
    nngp, ntk = nngp.reshape(-1)[:m], ntk.reshape(-1)[:m]
    if not sym:
        return Kernel(nngp.reshape(n1, n2), ntk.reshape(n1, n2))
    ia, ib = ja.reshape(-1)[:m], jb.reshape(-1)[:m]

    def mirror(v):
        out = jnp.zeros((n1, n1), v.dtype).at[ia, ib].set(v)
        return out.at[ib, ia].set(v)

    return Kernel(mirror(nngp), mirror(ntk))


def _pair_blocks(n1: int, n2: int, sym: bool, block: int):
    """Pair indices ``(ja, jb)`` as ``(nb, B)`` int32 arrays (upper triangle when ``sym``)."""
    if sym:
        ia, ib = np.triu_indices(n1)
    else:
        ia = np.repeat(np.arange(n1), n2)
        ib = np.tile(np.arange(n2), n1)
    m = ia.size
    B = max(1, min(block, m))
    nb = -(-m // B)
    pad = nb * B - m
    ja = np.concatenate([ia, np.zeros(pad, ia.dtype)]).astype(np.int32).reshape(nb, B)
    jb = np.concatenate([ib, np.zeros(pad, ib.dtype)]).astype(np.int32).reshape(nb, B)
    return jnp.asarray(ja), jnp.asarray(jb)


def conv_stack_kernel(x1: Array, x2: Array | None = None, *, depth: int, filter_size: int,
                      W_std: float, b_std: float, activation: str | Activation = "relu",
                      readout: str = "gap", pixel_pairs: str = "auto",
                      block_entries: int = BLOCK_ENTRIES) -> Kernel:
    """NNGP and NTK of ``[Conv(q, SAME, stride 1), act] * depth + [GAP | flatten, Dense(1)]``.

    NTK parameterization, every layer with the same ``W_std`` and ``b_std``.

    Args:
      x1: images ``(n1, *S, C)`` (1 or 2 spatial axes, channels last).
      x2: like ``x1``, or None for ``x2 = x1`` (then exactly symmetric).
      depth: convolution layers (>= 0).
      filter_size: ``q`` per spatial axis.
      W_std, b_std: weight and bias multipliers (``b_std = 0``: no bias).
      activation: a registered name or an Activation with a closed form or an
        angular (relu-family) form.
      readout: ``"gap"`` or ``"vec"`` (flatten).
      pixel_pairs: ``"auto"`` (diagonal pairs for vec, all for GAP), ``"all"``
        (the full pixel-pair recursion even for vec; a cross-check) or
        ``"diagonal"`` (vec only).
      block_entries: about how many kernel entries (pairs x positions^2) one
        ``lax.map`` step holds (cache-sized by default).

    Returns:
      ``Kernel(nngp=(n1, n2), ntk=(n1, n2))`` in the inputs' dtype.

    Raises:
      ValueError: bad shapes or options; NotImplementedError: an activation
      with no closed form (use the layer composition, which has the Mehler
      fallback).
    """
    act = get_activation(activation) if isinstance(activation, str) else activation
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; known: {', '.join(READOUTS)}")
    if pixel_pairs not in PIXEL_PAIRS:
        raise ValueError(f"unknown pixel_pairs {pixel_pairs!r}; known: {', '.join(PIXEL_PAIRS)}")
    if pixel_pairs == "diagonal" and readout == "gap":
        raise ValueError("the GAP readout needs all pixel pairs; use pixel_pairs='auto' or 'all'")
    key = dual_key(act)  # raises NotImplementedError early
    sym = x2 is None
    x1 = jnp.asarray(x1)
    x2 = x1 if sym else jnp.asarray(x2)
    if x1.ndim not in (3, 4) or x1.shape[1:] != x2.shape[1:]:
        raise ValueError(f"conv_stack_kernel needs images (n, *S, C) with 1 or 2 spatial axes "
                         f"and equal shapes, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if not jnp.issubdtype(x1.dtype, jnp.floating):
        x1 = x1.astype(jnp.result_type(float))
    dt = jnp.promote_types(x1.dtype, x2.dtype)
    x1, x2 = x1.astype(dt), x2.astype(dt)
    full = readout == "gap" or pixel_pairs == "all"
    N = math.prod(x1.shape[1:-1])
    per_pair = N * N if full else N
    block = max(1, int(block_entries) // per_pair)
    ja, jb = _pair_blocks(x1.shape[0], x2.shape[0], sym, block)
    return _kernel(x1, x2, ja, jb, depth=int(depth), q=int(filter_size), W_std=float(W_std),
                   b_std=float(b_std), act=key, full=full, vec=readout == "vec", sym=sym)


__all__ = ["conv_stack_kernel", "dual_key", "patch_mean", "relu_family_duals",
           "self_variances"]
