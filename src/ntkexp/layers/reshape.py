"""Flatten: ``(n, *S, C) -> (n, prod(S) C)``; the identity on flat inputs.

Kernel map (Novak et al. 2019, "CNN-vec" readout; Arora et al. 2019, CNTK-V):
the per-channel covariance of the flattened vector is the mean over positions
of the same-position covariances, ``nngp' = mean_i nngp[..., i, i]`` (likewise
``ntk``, ``cov1``, ``cov2``), and the channel count becomes ``prod(S) C``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from ntkexp.layers.base import KernelState, Layer, Shape, position_diagonal

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
    """Flatten spatial axes and channels into one feature axis."""

    kind: ClassVar[str] = "flatten"

    def out_shape(self, in_shape: Shape) -> Shape:
        n = 1
        for s in in_shape:
            n *= s
        return (n,)

    def apply(self, params, x: Array) -> Array:
        return x.reshape(x.shape[0], -1)

    def kernel(self, state: KernelState) -> KernelState:
        if not state.is_spatial:
            return state
        k = len(state.spatial)
        axes = tuple(range(-k, 0))

        def mean_diag(a):
            return jnp.mean(position_diagonal(a, k), axis=axes)

        return state.replace(nngp=mean_diag(state.nngp), ntk=mean_diag(state.ntk),
                             cov1=mean_diag(state.cov1), cov2=mean_diag(state.cov2),
                             spatial=(), channels=state.channels * state.n_positions)
