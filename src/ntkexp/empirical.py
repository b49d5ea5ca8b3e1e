"""Empirical NTK and NNGP of finite networks (first version: Jacobian contraction)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def empirical_ntk(apply_fn, params, x1, x2=None, *, method="auto", block_size=None,
                  trace_outputs=True):
    """Empirical NTK ``<df(x1)/dtheta, df(x2)/dtheta>``: ``(n1, n2)`` (traced over outputs)."""
    def jac(x):
        j = jax.jacrev(apply_fn)(params, x)  # leaves (n, out, *pshape)
        return [l.reshape(l.shape[0], l.shape[1], -1) for l in jax.tree_util.tree_leaves(j)]

    j1 = jac(x1)
    j2 = j1 if x2 is None else jac(x2)
    k = sum(jnp.einsum("iap,jbp->ijab", a, b) for a, b in zip(j1, j2, strict=True))
    if trace_outputs:
        return jnp.trace(k, axis1=2, axis2=3)
    return k
