"""Analytic infinite-width NNGP and NTK of an MLP (first version: closed-form duals).

Convention (``shared/reference/README.md``; Jacot et al. 2018, Theorem 1;
Lee et al. 2019): ``nngp_1 = W_std^2 <x, x'> / d + b_std^2``, ``ntk_1 = nngp_1``,
then per hidden layer ``nngp' = W_std^2 T(nngp) + b_std^2`` and
``ntk' = nngp' + W_std^2 Tdot(nngp) ntk``.
"""

from __future__ import annotations

import jax.numpy as jnp

from ntkexp.kernels.base import Kernel
from ntkexp.models.mlp import MLPSpec


def analytic_kernel(spec: MLPSpec, x1, x2=None, *, block_size=None) -> Kernel:
    """Infinite-width ``Kernel(nngp, ntk)`` of ``spec`` on ``x1 (n1, d)``, ``x2 (n2, d)``."""
    sym = x2 is None
    x1 = jnp.asarray(x1)
    x2 = x1 if sym else jnp.asarray(x2)
    act = spec.act
    if not act.has_closed_form:
        raise NotImplementedError(f"no closed-form dual for {spec.activation!r} yet")
    w2, b2 = spec.W_std**2, spec.b_std**2
    d = x1.shape[1]
    q1 = w2 * jnp.sum(x1 * x1, axis=1) / d + b2
    q2 = w2 * jnp.sum(x2 * x2, axis=1) / d + b2
    nngp = w2 * (x1 @ x2.T) / d + b2
    ntk = nngp
    for _ in range(spec.depth):
        Q1, Q2 = q1[:, None], q2[None, :]
        T, Td = act.T(Q1, nngp, Q2), act.Tdot(Q1, nngp, Q2)
        nngp = w2 * T + b2
        ntk = nngp + w2 * Td * ntk
        q1 = w2 * act.T(q1, q1, q1) + b2
        q2 = w2 * act.T(q2, q2, q2) + b2
    return Kernel(nngp, ntk)
