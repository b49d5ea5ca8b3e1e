"""Analytic infinite-width NNGP and NTK of a CNN: CNTK-V and CNTK-GAP.

For the network of :mod:`ntkexp.models.cnn` (NTK parameterization, 'SAME' zero
padding, stride 1, patch size ``P = q^k``) the infinite-channel limit is a
recursion over *pixel pairs* (Arora et al. 2019, "On exact computation with an
infinitely wide neural net", section 4 and appendix B, with ``c_sigma = W_std^2``
and biases added; Novak et al. 2019; Garriga-Alonso et al. 2019). For inputs
``x, x'`` and positions ``i, j``, with ``[.]_D`` the patch mean
``[K]_{ij} = (1/P) sum_delta K_{i+delta, j+delta}`` (zero outside the image;
the padded zeros still count in ``1/P``)::

    K^0_{ij}      = <x_i, x'_j> / C_in                      (input "activation" kernel)
    Sigma^h_{ij}  = W_std^2 [K^{h-1}]_{ij} + b_std^2        (pre-activation NNGP)
    Theta^h_{ij}  = Sigma^h_{ij} + W_std^2 [Kdot^{h-1} * Theta^{h-1}]_{ij}   (term absent for h=1)
    K^h_{ij}      = T(Sigma^h_ii(x,x), Sigma^h_ij(x,x'), Sigma^h_jj(x',x'))
    Kdot^h_{ij}   = Tdot(same)

with ``T, Tdot`` the activation's dual maps (``ntkexp.activations``). This is
the official CNTK code's "Theta <- Theta * Sigmadot + Sigma, then a q x q
conv-sum" per layer. Readout on ``L = depth``:

* GAP (CNTK-GAP):  ``nngp = W_std^2 mean_{i,j} K^L_{ij} + b_std^2``,
  ``ntk = nngp + W_std^2 mean_{i,j} (Kdot^L * Theta^L)_{ij}``;
* vec (CNTK-V):    the same with the mean over the diagonal ``i = j`` only.

Because the patch mean moves ``i`` and ``j`` by the *same* ``delta``, entries
at a given offset ``i - j`` only ever depend on entries at the same offset, and
``T`` needs only the self-kernels on the diagonal. So the vec readout needs
just the diagonal ``i = j`` (arrays ``(n1, n2, *image_shape)``, ``O(N)`` per
input pair), while GAP needs all pairs (``(n1, n2, *image_shape, *image_shape)``,
``O(N^2)`` per pair) -- cheap for small images.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from ntkexp.kernels.base import Kernel
from ntkexp.models.cnn import CNNSpec, as_images

Array = jax.Array
PIXEL_PAIRS = ("auto", "diagonal", "all")


def _patch_mean(spec: CNNSpec, a: Array, groups: int) -> Array:
    """``(1/P) sum_delta a[..., i + delta, (j + delta)]`` with zero padding.

    Args:
      a: ``(n1, n2, *image_shape)`` (``groups=1``) or
        ``(n1, n2, *image_shape, *image_shape)`` (``groups=2``); the same
        shift ``delta`` is applied to every group of spatial axes.
    """
    k = spec.n_spatial
    lo, hi = spec.pad
    padded = jnp.pad(a, [(0, 0), (0, 0)] + [(lo, hi)] * (k * groups))
    out = jnp.zeros_like(a)
    for delta in itertools.product(range(spec.filter_size), repeat=k):
        idx = tuple(slice(d, d + s) for d, s in zip(delta, spec.image_shape, strict=True))
        out = out + padded[(slice(None), slice(None)) + idx * groups]
    return out / spec.patch_size


def _self_variances(spec: CNNSpec, x: Array) -> Array:
    """Per-position pre-activation variances ``Sigma^h_ii(x, x)``: ``(depth, n, *image_shape)``."""
    act = spec.act
    w2, b2 = spec.W_std**2, spec.b_std**2

    def layer(k_prev, _):
        q = w2 * _patch_mean(spec, k_prev[:, None], 1)[:, 0] + b2
        return act.T(q, q, q), q

    k0 = jnp.sum(x * x, axis=-1) / x.shape[-1]  # K^0_ii
    return jax.lax.scan(layer, k0, None, length=spec.depth)[1]


@functools.partial(jax.jit, static_argnames=("spec", "full", "sym"))
def _cnn_kernel(spec: CNNSpec, x1: Array, x2: Array, full: bool, sym: bool) -> Kernel:
    act = spec.act
    w2, b2 = spec.W_std**2, spec.b_std**2
    k = spec.n_spatial
    c = x1.shape[-1]
    q1s = _self_variances(spec, x1)
    q2s = q1s if sym else _self_variances(spec, x2)
    if full:
        sp1 = "ab"[:k]
        sp2 = "cd"[:k]
        K = jnp.einsum(f"n{sp1}z,m{sp2}z->nm{sp1}{sp2}", x1, x2,
                       precision=jax.lax.Precision.HIGHEST) / c
        ones = (1,) * k

        def bq1(q):
            return q.reshape(q.shape[0], 1, *spec.image_shape, *ones)

        def bq2(q):
            return q.reshape(1, q.shape[0], *ones, *spec.image_shape)
    else:
        K = jnp.einsum("n...z,m...z->nm...", x1, x2, precision=jax.lax.Precision.HIGHEST) / c

        def bq1(q):
            return q[:, None]

        def bq2(q):
            return q[None, :]

    groups = 2 if full else 1

    def layer(carry, qs):
        # one conv layer + activation (lax.scan: compiled once for any depth);
        # kd_theta = 0 before the first layer, so theta = sigma there, exactly
        K, kd_theta = carry
        sigma = w2 * _patch_mean(spec, K, groups) + b2
        theta = sigma + w2 * _patch_mean(spec, kd_theta, groups)
        Q1, Q2 = bq1(qs[0]), bq2(qs[1])
        return (act.T(Q1, sigma, Q2), act.Tdot(Q1, sigma, Q2) * theta), None

    (K, kd_theta), _ = jax.lax.scan(layer, (K, jnp.zeros_like(K)), (q1s, q2s))
    if spec.readout == "vec":
        if full:
            n1, n2 = K.shape[:2]
            N = spec.n_positions
            K = jnp.diagonal(K.reshape(n1, n2, N, N), axis1=2, axis2=3)
            kd_theta = jnp.diagonal(kd_theta.reshape(n1, n2, N, N), axis1=2, axis2=3)
    axes = tuple(range(2, K.ndim))
    nngp = w2 * jnp.mean(K, axis=axes) + b2
    ntk = nngp + w2 * jnp.mean(kd_theta, axis=axes)
    if sym:
        nngp = (nngp + nngp.T) / 2
        ntk = (ntk + ntk.T) / 2
    return Kernel(nngp, ntk)


def cnn_kernel(spec: CNNSpec, x1, x2=None, *, pixel_pairs: str = "auto") -> Kernel:
    """Infinite-width NNGP and NTK (CNTK) of the CNN ``spec``, for a scalar output.

    Args:
      spec: a :class:`~ntkexp.models.cnn.CNNSpec` (its ``width`` is ignored;
        ``image_shape=None`` takes the shape from ``x1``).
      x1: inputs ``(n1, *image_shape, C)`` or flat ``(n1, N * C)`` (channels last).
      x2: inputs ``(n2, ...)`` like ``x1``, or None for ``x2 = x1`` (then the
        result is exactly symmetric).
      pixel_pairs: ``"auto"`` (diagonal pairs for ``readout="vec"``, all pairs
        for ``"gap"``), ``"diagonal"`` (vec only), or ``"all"`` (compute the
        full pixel-pair kernel even for vec; slower, used as a cross-check).

    Returns:
      ``Kernel(nngp=(n1, n2), ntk=(n1, n2))`` in the dtype of the inputs.

    Raises:
      ValueError: bad shapes or options; NotImplementedError if the activation
      has no closed-form dual maps.
    """
    if not isinstance(spec, CNNSpec):
        raise TypeError(f"cnn_kernel needs a CNNSpec, got {type(spec).__name__}")
    if pixel_pairs not in PIXEL_PAIRS:
        raise ValueError(f"unknown pixel_pairs {pixel_pairs!r}; known: {', '.join(PIXEL_PAIRS)}")
    if pixel_pairs == "diagonal" and spec.readout == "gap":
        raise ValueError("the GAP readout needs all pixel pairs; use pixel_pairs='auto' or 'all'")
    if not spec.act.has_closed_form:
        raise NotImplementedError(
            f"activation {spec.activation!r} has no closed-form dual maps, so the "
            "analytic CNN kernel is not available for it"
        )
    sym = x2 is None
    x1 = _as_float(as_images(spec, x1))
    spec = spec.resolve(x1.shape[1:])
    x2 = x1 if sym else _as_float(as_images(spec, x2, x1.shape[-1]))
    if x1.dtype != x2.dtype:
        dt = jnp.promote_types(x1.dtype, x2.dtype)
        x1, x2 = x1.astype(dt), x2.astype(dt)
    full = spec.readout == "gap" or pixel_pairs == "all"
    return _cnn_kernel(spec, x1, x2, full, sym)


def _as_float(x: Array) -> Array:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.result_type(float))
    return x
