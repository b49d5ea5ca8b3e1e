"""Pooling layers: average pooling and global average pooling (1-D and 2-D).

Finite side, channels last, inputs ``a (n, *S, C)``:

* :class:`AvgPool`: ``y_i = (1/P) sum_{delta in window} a_{s i + delta}`` with
  padding ``"VALID"``, ``"SAME"`` (lax's rule, zeros that count in ``1/P``) or
  ``"CIRCULAR"`` (the same amounts wrapped); neural-tangents'
  ``AvgPool(normalize_edges=False)``.
* :class:`GlobalAvgPool`: ``y = mean_i a_i`` over all positions (flat output).

Infinite-width map (Novak et al. 2019, section 3.1 and appendix; both are
linear maps without parameters, so NNGP and NTK transform alike). Unlike a
convolution, the same weights ``1/P`` act at every tap, so the two positions
of a covariance entry are averaged *independently*::

    AvgPool:        K'_{ij} = (1/P^2) sum_{delta, delta'} K_{s i + delta, s j + delta'}
    GlobalAvgPool:  K'      = mean_{i, j} K_{ij}

computed as a window sum (shifted strided slices) over each copy of the spatial
axes in turn. Pooling keeps the state Gaussian iff it was.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from ntkexp.layers.base import KernelState, Layer, Shape
from ntkexp.layers.conv import (
    PADDINGS,
    _check_shape_arg,
    _tuple,
    out_spatial,
    pad_spatial,
    window_pads,
)
from ntkexp.layers.registry import register_layer

Array = jax.Array


def window_mean(a: Array, first_axis: int, window: tuple, strides: tuple, padding: str) -> Array:
    """Average pooling of ``a`` over the ``k = len(window)`` axes starting at ``first_axis``."""
    k = len(window)
    S = a.shape[first_axis:first_axis + k]
    pads = window_pads(S, window, strides, padding)
    ap = pad_spatial(a, pads, padding, first_axis)
    out_s = out_spatial(S, window, strides, padding)
    lead = (slice(None),) * first_axis
    out = None
    for delta in itertools.product(*[range(q) for q in window]):
        idx = tuple(slice(d, d + st * (o - 1) + 1, st)
                    for d, st, o in zip(delta, strides, out_s, strict=True))
        term = ap[lead + idx]
        out = term if out is None else out + term
    return out / math.prod(window)


@dataclasses.dataclass(frozen=True)
class AvgPool(Layer):
    """Average pooling over a window.

    Attributes:
      window: window size per spatial axis (int for every axis, or a tuple).
      strides: stride per axis (int or tuple; default 1, as in neural-tangents).
      padding: ``"VALID"`` (default), ``"SAME"`` or ``"CIRCULAR"``.
    """

    window: int | tuple = 2
    strides: int | tuple = 1
    padding: str = "VALID"

    kind: ClassVar[str] = "avg_pool"

    def __post_init__(self):
        object.__setattr__(self, "window", _check_shape_arg(self.window, "avg_pool.window"))
        object.__setattr__(self, "strides", _check_shape_arg(self.strides, "avg_pool.strides"))
        if not isinstance(self.padding, str) or self.padding.upper() not in PADDINGS:
            raise ValueError(f"avg_pool.padding must be one of {', '.join(PADDINGS)}, "
                             f"got {self.padding!r}")
        object.__setattr__(self, "padding", self.padding.upper())

    def _geometry(self, k: int):
        return _tuple(self.window, k, "window"), _tuple(self.strides, k, "strides")

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) not in (2, 3):
            raise ValueError(f"avg_pool needs inputs (L, C) or (H, W, C), got shape "
                             f"{tuple(in_shape)}")
        w, st = self._geometry(len(in_shape) - 1)
        return (*out_spatial(tuple(in_shape[:-1]), w, st, self.padding), in_shape[-1])

    def apply(self, params, x: Array) -> Array:
        w, st = self._geometry(x.ndim - 2)
        return window_mean(x, 1, w, st, self.padding)

    def kernel(self, state: KernelState) -> KernelState:
        k = len(state.spatial)
        if k not in (1, 2):
            raise ValueError("avg_pool needs a spatial state (1 or 2 spatial axes)")
        w, st = self._geometry(k)

        def pool2(a):
            lead = a.ndim - 2 * k
            return window_mean(window_mean(a, lead, w, st, self.padding), lead + k, w, st,
                               self.padding)

        cov1 = pool2(state.cov1)
        cov2 = cov1 if state.cov2 is state.cov1 else pool2(state.cov2)
        return state.replace(nngp=pool2(state.nngp), ntk=pool2(state.ntk), cov1=cov1, cov2=cov2,
                             spatial=out_spatial(state.spatial, w, st, self.padding))


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool(Layer):
    """Mean over all spatial positions: ``(n, *S, C) -> (n, C)``."""

    kind: ClassVar[str] = "global_avg_pool"

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) < 2:
            raise ValueError(f"global_avg_pool needs spatial inputs (L, C) or (H, W, C), got "
                             f"shape {tuple(in_shape)}")
        return (in_shape[-1],)

    def apply(self, params, x: Array) -> Array:
        return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))

    def kernel(self, state: KernelState) -> KernelState:
        k = len(state.spatial)
        if k == 0:
            raise ValueError("global_avg_pool needs a spatial state")
        axes = tuple(range(-2 * k, 0))

        def m(a):
            return jnp.mean(a, axis=axes)

        cov1 = m(state.cov1)
        cov2 = cov1 if state.cov2 is state.cov1 else m(state.cov2)
        return state.replace(nngp=m(state.nngp), ntk=m(state.ntk), cov1=cov1, cov2=cov2,
                             spatial=())


@register_layer("avg_pool")
def avg_pool_layer(window=2, strides=1, padding: str = "VALID") -> AvgPool:
    """YAML factory: ``{avg_pool: {window: 2, strides: 2, padding: VALID}}``."""
    return AvgPool(window, strides, padding)


@register_layer("global_avg_pool")
def global_avg_pool_layer() -> GlobalAvgPool:
    """YAML factory: ``global_avg_pool``."""
    return GlobalAvgPool()


__all__ = ["AvgPool", "GlobalAvgPool", "avg_pool_layer", "global_avg_pool_layer", "window_mean"]
