"""Convolution layer (1-D and 2-D): finite Flax NNX layer, kernel map and structured NTK.

Finite side, channels last, inputs ``a (n, *S, C)`` (``S = (L,)`` or ``(H, W)``),
filters ``W (*q, C, width)`` (``q`` the filter shape, ``P = prod(q)`` its size):

* ``"ntk"``:      ``y = W_std / sqrt(P C) * conv(a, W) + b_std * b``, ``W, b ~ N(0, 1)``
* ``"standard"``: ``y = conv(a, W) + b``, ``W ~ N(0, W_std^2 / (P C))``, ``b ~ N(0, b_std^2)``

(Novak et al. 2019, "Bayesian deep CNNs with many channels are GPs", eq. 2;
Arora et al. 2019, eq. 7). Padding ``"SAME"`` and ``"VALID"`` as in lax (for
``SAME``, ``lax.padtype_to_pads``: ``(q - 1) // 2`` zeros before at stride 1),
``"CIRCULAR"`` the same amounts wrapped periodically. The padded zeros count in
the fan-in ``P C``.

Infinite-width map (Novak et al. 2019, section 2.2 and eq. 7; Arora et al.
2019, appendix B), on the per-position covariances ``K (.., *S, *S)`` of the
state (:mod:`ntkexp.layers.base`), with ``s`` the stride and ``K`` padded
like the input on both copies of the spatial axes::

    A(K)_{ij} = (1/P) sum_delta K_{s i + delta, s j + delta}
    nngp' = W_std^2 A(nngp) + b_std^2
    ntk'  = W_std^2 A(ntk) + own,   own = nngp'                    (ntk)
                                    own = P C A(nngp) + [bias]     (standard)

(the same shift ``delta`` on both positions: different filter taps are
independent). ``own`` is left out inside ``frozen``. ``cov1``/``cov2`` map like
``nngp``.

Structured NTK: ``df/dW_{delta, c, o} = w_mult sum_i b_{i, o} a_{s i + delta, c}``
with ``b = df/dy`` (a per-example weight gradient built from the input's
patches, :func:`extract_patches`), and ``df/db_o = b_mult sum_i
b_{i, o}``; the contribution is the inner product of those over examples.

A whole stack ``[conv, act] * depth + [global_avg_pool | flatten, dense]`` of
stride-1 ``SAME`` convolutions with shared ``W_std``/``b_std`` is recognised
by :func:`conv_stack_of` (``depth >= 0``) and computed by the fused, blocked map of
:mod:`ntkexp.kernels.cnn`: the ``conv_stack`` rule of :mod:`ntkexp.layers.fused`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ntkexp.kernels.cnn import dual_key
from ntkexp.layers.base import KernelState, Layer, Shape
from ntkexp.layers.registry import register_layer

Array = jax.Array
PADDINGS = ("SAME", "VALID", "CIRCULAR")
PARAMETERIZATIONS = ("ntk", "standard")
_HP = jax.lax.Precision.HIGHEST


def _tuple(v, k: int, name: str) -> tuple[int, ...]:
    t = (v,) * k if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != k or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in t):
        raise ValueError(f"conv.{name} must be a positive integer or {k} of them, got {v!r}")
    return t


def _check_shape_arg(v, name: str):
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v!r}")
        return v
    if not isinstance(v, (tuple, list)) or len(v) not in (1, 2) or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
        raise ValueError(f"{name} must be a positive integer or a list of 1 or 2, got {v!r}")
    return tuple(int(x) for x in v)


def window_pads(spatial: Shape, window: tuple, strides: tuple, padding: str):
    """Per-axis ``(lo, hi)`` padding of ``padding`` (lax's rule; CIRCULAR pads like SAME)."""
    if padding == "VALID":
        return [(0, 0)] * len(spatial)
    return [tuple(p) for p in jax.lax.padtype_to_pads(spatial, window, strides, "SAME")]


def pad_spatial(a: Array, pads, padding: str, first_axis: int, groups: int = 1) -> Array:
    """Pad ``groups`` copies of the spatial axes starting at ``first_axis`` (zeros or wrap)."""
    widths = [(0, 0)] * a.ndim
    k = len(pads)
    for g in range(groups):
        for ax, p in enumerate(pads):
            widths[first_axis + g * k + ax] = p
    if all(w == (0, 0) for w in widths):
        return a
    return jnp.pad(a, widths, mode="wrap" if padding == "CIRCULAR" else "constant")


def out_spatial(spatial: Shape, window: tuple, strides: tuple, padding: str) -> Shape:
    """Spatial output shape of a window op (conv or pooling)."""
    pads = window_pads(spatial, window, strides, padding)
    out = tuple((s + lo + hi - q) // st + 1
                for s, (lo, hi), q, st in zip(spatial, pads, window, strides, strict=True))
    if any(o < 1 for o in out):
        raise ValueError(f"window {window} does not fit the spatial shape {spatial} "
                         f"with {padding} padding")
    return out


def diagonal_window_mean(a: Array, k: int, window: tuple, strides: tuple, padding: str) -> Array:
    """``A(K)_{ij} = (1/P) sum_delta K_{s i + delta, s j + delta}`` on ``(lead.., *S, *S)``."""
    lead = a.ndim - 2 * k
    S = a.shape[lead:lead + k]
    pads = window_pads(S, window, strides, padding)
    out_s = out_spatial(S, window, strides, padding)
    ap = pad_spatial(a, pads, padding, lead, groups=2)
    acc = None
    for delta in itertools.product(*[range(q) for q in window]):
        idx = tuple(slice(d, d + st * (o - 1) + 1, st)
                    for d, st, o in zip(delta, strides, out_s, strict=True))
        term = ap[(slice(None),) * lead + idx * 2]
        acc = term if acc is None else acc + term
    return acc / math.prod(window)


def extract_patches(a: Array, window: tuple, strides: tuple, padding: str) -> Array:
    """Windows of ``a (n, *S, C)`` as ``(n, *S_out, P, C)`` (taps in row-major order).

    Shifted strided slices of the padded input (pure data movement;
    ``lax.conv_general_dilated_patches`` runs an identity convolution instead,
    ``P C`` times the work of the layer).
    """
    k = len(window)
    S = a.shape[1:1 + k]
    pads = window_pads(S, window, strides, padding)
    out_s = out_spatial(S, window, strides, padding)
    ap = pad_spatial(a, pads, padding, 1)
    taps = []
    for delta in itertools.product(*[range(q) for q in window]):
        idx = tuple(slice(d, d + st * (o - 1) + 1, st)
                    for d, st, o in zip(delta, strides, out_s, strict=True))
        taps.append(ap[(slice(None),) + idx])
    return jnp.stack(taps, axis=-2)


@dataclasses.dataclass(frozen=True)
class Conv(Layer):
    """A convolution of ``width`` output channels over 1 or 2 spatial axes.

    Attributes:
      width: output channels (>= 1).
      filter: filter size per spatial axis (an int for every axis, or a tuple).
      strides: stride per spatial axis (int or tuple; default 1).
      padding: ``"SAME"``, ``"VALID"`` or ``"CIRCULAR"``.
      W_std: weight multiplier sigma_w (>= 0).
      b_std: bias multiplier sigma_b (>= 0; 0 means no bias).
      parameterization: ``"ntk"`` or ``"standard"``.
    """

    width: int
    filter: int | tuple = 3
    strides: int | tuple = 1
    padding: str = "SAME"
    W_std: float = 1.0
    b_std: float = 0.0
    parameterization: str = "ntk"

    kind: ClassVar[str] = "conv"
    has_params: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"conv.width must be an integer >= 1, got {self.width!r}")
        object.__setattr__(self, "filter", _check_shape_arg(self.filter, "conv.filter"))
        object.__setattr__(self, "strides", _check_shape_arg(self.strides, "conv.strides"))
        if not isinstance(self.padding, str) or self.padding.upper() not in PADDINGS:
            raise ValueError(f"conv.padding must be one of {', '.join(PADDINGS)}, "
                             f"got {self.padding!r}")
        object.__setattr__(self, "padding", self.padding.upper())
        for name in ("W_std", "b_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"conv.{name} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"conv.parameterization must be one of "
                             f"{', '.join(PARAMETERIZATIONS)}, got {self.parameterization!r}")

    # ---- shapes -------------------------------------------------------------
    @property
    def has_bias(self) -> bool:
        return self.b_std > 0

    def _geometry(self, in_shape: Shape):
        if len(in_shape) not in (2, 3):
            raise ValueError(f"conv needs inputs (L, C) or (H, W, C), got shape {tuple(in_shape)}")
        k = len(in_shape) - 1
        return k, _tuple(self.filter, k, "filter"), _tuple(self.strides, k, "strides")

    def out_shape(self, in_shape: Shape) -> Shape:
        k, q, st = self._geometry(in_shape)
        return (*out_spatial(tuple(in_shape[:-1]), q, st, self.padding), self.width)

    def fan_in(self, in_shape: Shape) -> int:
        _, q, _ = self._geometry(in_shape)
        return math.prod(q) * in_shape[-1]

    def scales(self, fan_in: int) -> tuple[float, float]:
        """Forward multipliers ``(w_mult, b_mult)``."""
        if self.parameterization == "ntk":
            return self.W_std / math.sqrt(fan_in), self.b_std
        return 1.0, 1.0

    def init_scales(self, fan_in: int) -> tuple[float, float]:
        """Standard deviations ``(w_init, b_init)`` of the stored parameters."""
        if self.parameterization == "ntk":
            return 1.0, 1.0
        return self.W_std / math.sqrt(fan_in), self.b_std

    # ---- finite side --------------------------------------------------------
    def module(self, in_shape: Shape, *, rngs: nnx.Rngs, dtype=None) -> nnx.Module:
        self.out_shape(in_shape)
        return ConvModule(self, tuple(in_shape), rngs=rngs, dtype=dtype)

    def _padded(self, x: Array, q, st):
        pads = window_pads(x.shape[1:-1], q, st, self.padding)
        if self.padding == "CIRCULAR":
            return pad_spatial(x, pads, "CIRCULAR", 1), [(0, 0)] * len(q)
        return x, pads

    def apply(self, params, x: Array) -> Array:
        W = params["W"]
        k = x.ndim - 2
        q, st = tuple(W.shape[:k]), _tuple(self.strides, k, "strides")
        w_mult, b_mult = self.scales(math.prod(q) * W.shape[-2])
        dt = jnp.promote_types(x.dtype, W.dtype)  # like Dense's matmul
        x, W = x.astype(dt), W.astype(dt)
        xp, pads = self._padded(x, q, st)
        sp = "HW"[:k]
        y = jax.lax.conv_general_dilated(
            xp, W, window_strides=st, padding=pads,
            dimension_numbers=(f"N{sp}C", f"{sp}IO", f"N{sp}C"), precision=_HP)
        y = w_mult * y
        if "b" in params:
            y = y + b_mult * params["b"].reshape((1,) * (y.ndim - 1) + (-1,))
        return y

    # ---- infinite width -----------------------------------------------------
    def kernel(self, state: KernelState) -> KernelState:
        k = len(state.spatial)
        if k not in (1, 2):
            raise ValueError("conv needs a spatial state (1 or 2 spatial axes); put it before "
                             "flatten / global_avg_pool")
        q, st = _tuple(self.filter, k, "filter"), _tuple(self.strides, k, "strides")
        w2, b2 = self.W_std**2, self.b_std**2

        def A(a):
            return diagonal_window_mean(a, k, q, st, self.padding)

        a_nngp = A(state.nngp)
        nngp = w2 * a_nngp + b2
        ntk = w2 * A(state.ntk)
        if state.trainable:
            if self.parameterization == "ntk":
                ntk = ntk + nngp
            else:
                ntk = ntk + (math.prod(q) * state.channels) * a_nngp + (
                    1.0 if self.has_bias else 0.0)
        cov1 = w2 * A(state.cov1) + b2
        cov2 = cov1 if state.cov2 is state.cov1 else w2 * A(state.cov2) + b2
        spatial = out_spatial(state.spatial, q, st, self.padding)
        return state.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, spatial=spatial,
                             channels=self.width, is_gaussian=True)

    # ---- structured empirical NTK ---------------------------------------
    def weight_gradients(self, a: Array, b: Array) -> tuple[Array, Array]:
        """Per-example gradients ``(dW (n, o, F, width), db (n, o, width))``.

        Args:
          a: layer inputs ``(n, *S, C)``; b: backward vectors ``(n, o, *S_out, width)``.
        """
        k = a.ndim - 2
        q, st = _tuple(self.filter, k, "filter"), _tuple(self.strides, k, "strides")
        w_mult, b_mult = self.scales(math.prod(q) * a.shape[-1])
        patches = extract_patches(a, q, st, self.padding)  # (n, *S_out, P, C)
        n = a.shape[0]
        pt = patches.reshape(n, -1, patches.shape[-2] * patches.shape[-1])  # (n, N_out, F)
        bt = b.reshape(n, b.shape[1], -1, b.shape[-1])  # (n, o, N_out, width)
        dW = w_mult * jnp.einsum("xif,xoiw->xofw", pt, bt, precision=_HP)
        db = (b_mult if self.has_bias else 0.0) * jnp.sum(bt, axis=2)
        return dW, db

    def structured_ntk(self, a1, a2, b1, b2, *, full: bool):
        g1, c1 = self.weight_gradients(a1, b1)
        g2, c2 = self.weight_gradients(a2, b2)
        if full:
            out = jnp.einsum("xafw,ybfw->xyab", g1, g2, precision=_HP)
            if self.has_bias:
                out = out + jnp.einsum("xaw,ybw->xyab", c1, c2, precision=_HP)
            return out
        # trace over outputs: one matmul of the flattened (o, F, width) gradients
        out = jnp.matmul(g1.reshape(g1.shape[0], -1), g2.reshape(g2.shape[0], -1).T,
                         precision=_HP)
        if self.has_bias:
            out = out + jnp.einsum("xaw,yaw->xy", c1, c2, precision=_HP)
        return out


class ConvModule(nnx.Module):
    """Parameters of one :class:`Conv` layer: ``W (*q, C, width)``, ``b (width,)``."""

    def __init__(self, layer: Conv, in_shape: Shape, *, rngs: nnx.Rngs, dtype=None):
        dtype = dtype or jnp.float32
        k, q, _ = layer._geometry(in_shape)
        c = in_shape[-1]
        w_init, b_init = layer.init_scales(math.prod(q) * c)
        self.W = nnx.Param(w_init * jax.random.normal(rngs.params(), (*q, c, layer.width), dtype))
        if layer.has_bias:
            self.b = nnx.Param(b_init * jax.random.normal(rngs.params(), (layer.width,), dtype))
        self.layer = layer

    def __call__(self, x: Array) -> Array:
        return self.layer.apply(nnx.to_pure_dict(nnx.state(self, nnx.Param)), x)


@register_layer("conv")
def conv_layer(width: int | None = None, filter=3, strides=1, padding: str = "SAME",
               W_std: float = 1.0, b_std: float = 0.0, parameterization: str = "ntk",
               out: int | None = None) -> Conv:
    """YAML factory: ``{conv: {width: 64, filter: 3, strides: 1, padding: SAME, W_std, b_std}}``.

    ``out`` is a synonym of ``width`` (a convolution is never the readout).
    """
    width = out if out is not None else width
    if width is None:
        raise ValueError("conv needs a 'width' (or a model width)")
    return Conv(width, filter, strides, padding, W_std, b_std, parameterization)


# --------------------------------------------------------------------------
# The fused conv-stack kernel (kernels/cnn.py) for compositions that are one
# --------------------------------------------------------------------------


def _flat_leaves(layer: Layer):
    kids = layer.children()
    if type(layer).__name__ == "Serial":
        out = []
        for c in kids:
            sub = _flat_leaves(c)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if kids:
        return None  # parallel / residual / frozen: not a plain stack
    return [layer]


def conv_stack_of(layer: Layer, in_shape: Shape):
    """The hyperparameters of ``layer`` if it is a plain stride-1 SAME conv stack, else None.

    A plain stack is ``[Conv(q, SAME, stride 1, ntk), Activation] * depth``
    (``depth >= 0``, every conv with the same ``filter``, ``W_std``, ``b_std``),
    then ``global_avg_pool`` (readout ``gap``) or ``flatten`` (``vec``), then
    one NTK-parameterised ``Dense`` with the same ``W_std`` and ``b_std``, with
    an activation that has a closed form or a relu-family form, on 1-D or 2-D
    inputs. Returns a dict of :func:`ntkexp.kernels.cnn.conv_stack_kernel`
    keywords.
    """
    leaves = _flat_leaves(layer)
    if not leaves or len(in_shape) not in (2, 3) or len(leaves) < 2:
        return None
    *body, pool, dense = leaves
    if len(body) % 2 or type(dense).__name__ != "Dense" or getattr(pool, "kind", "") not in (
            "global_avg_pool", "flatten") or dense.parameterization != "ntk":
        return None
    convs, acts = body[0::2], body[1::2]
    k = len(in_shape) - 1
    c0 = convs[0] if convs else None
    for c in convs:
        if not isinstance(c, Conv) or c.padding != "SAME" or c.parameterization != "ntk" \
                or set(_tuple(c.strides, k, "strides")) != {1} \
                or len(set(_tuple(c.filter, k, "filter"))) != 1 \
                or (c.filter, c.W_std, c.b_std) != (c0.filter, c0.W_std, c0.b_std):
            return None
    if convs:
        names = {getattr(a, "kind", "") for a in acts}
        if names != {"activation"} or len({(a.name, a.params) for a in acts}) != 1:
            return None
        act = acts[0].act
        try:
            dual_key(act)
        except NotImplementedError:
            return None
        if (dense.W_std, dense.b_std) != (c0.W_std, c0.b_std):
            return None
        q = _tuple(c0.filter, k, "filter")[0]
    else:  # depth 0: a linear readout of the pooled / flattened input
        act, q = "relu", 1
    return dict(depth=len(convs), filter_size=q, W_std=dense.W_std, b_std=dense.b_std,
                activation=act, readout="gap" if pool.kind == "global_avg_pool" else "vec")

__all__ = ["Conv", "ConvModule", "conv_layer", "conv_stack_of", "diagonal_window_mean",
           "out_spatial", "pad_spatial", "window_pads"]
