"""LayerNorm over the channel axis (at every position), and its infinite-width limit.

Finite side (Ba et al. 2016): ``y = (x - mean_c x) / sqrt(var_c x + eps)`` over
the last (channel) axis; no parameters.

Infinite-width map (Novak et al. 2020, ``stax.LayerNorm``): on a Gaussian,
zero-mean state the channel mean vanishes and the channel variance converges to
the per-position variance ``q``, so with ``q1 = cov1[a, i, i]``,
``q2 = cov2[b, j, j]``::

    nngp' = nngp / sqrt((q1 + eps) (q2 + eps)),   ntk' = ntk / sqrt((q1 + eps) (q2 + eps))

and ``cov1``, ``cov2`` likewise (the normalisation's Jacobian is ``1 / sqrt(q + eps)``
times a projection whose rank-one corrections vanish as the width grows).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from ntkexp.layers.base import KernelState, Layer, Shape, check_gaussian
from ntkexp.layers.registry import register_layer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerNorm(Layer):
    """Normalise each position's channels to mean 0 and variance 1 (``eps`` added).

    Attributes:
      eps: added to the variance (finite, >= 0).
    """

    eps: float = 1e-12
    kind: ClassVar[str] = "layer_norm"

    def __post_init__(self):
        e = self.eps
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
            raise ValueError(f"layer_norm.eps must be a finite number >= 0, got {e!r}")
        object.__setattr__(self, "eps", float(e))

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) < 1 or in_shape[-1] < 2:
            raise ValueError(f"layer_norm needs at least 2 channels, got input shape {in_shape}")
        return tuple(in_shape)

    def apply(self, params, x: Array) -> Array:
        mu = jnp.mean(x, axis=-1, keepdims=True)
        v = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(v + self.eps)

    def kernel(self, state: KernelState) -> KernelState:
        check_gaussian("layer_norm", state)
        q1, q2 = state.pair_variances()
        r1, r2 = jax.lax.rsqrt(q1 + self.eps), jax.lax.rsqrt(q2 + self.eps)
        s1a, s1b = state.self_variances(1)
        s2a, s2b = state.self_variances(2)
        cov1 = state.cov1 * jax.lax.rsqrt(s1a + self.eps) * jax.lax.rsqrt(s1b + self.eps)
        cov2 = state.cov2 * jax.lax.rsqrt(s2a + self.eps) * jax.lax.rsqrt(s2b + self.eps)
        return state.replace(nngp=state.nngp * r1 * r2, ntk=state.ntk * r1 * r2,
                             cov1=cov1, cov2=cov2)


@register_layer("layer_norm")
def _layer_norm(eps: float = 1e-12):
    """``layer_norm`` or ``{layer_norm: {eps: 1e-6}}``."""
    return LayerNorm(eps)
