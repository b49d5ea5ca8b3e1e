"""Stacked ensembles: members stacked on a leading axis K, and one member taken out.

An ensemble's parameters (and optimizer states, keys, ...) are one pytree whose
leaves carry a leading axis ``K`` (:func:`ntkexp.training.init_ensemble`,
:func:`ntkexp.experiments.common.build_ensemble`). Both functions here are
whole-tree jitted programs, compiled once per tree structure and leaf shapes: the
eager alternatives (``jnp.stack`` per leaf, ``a[i]`` per leaf) compile one small
program per distinct leaf shape, which profiling showed costs more than the work
(18 ``stack`` and 21 ``dynamic_slice`` compiles, 2.3 s, in a kernel-convergence run).
They copy values and change none (bit for bit the per-leaf operations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["member", "stack"]


@jax.jit
def _stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a, axis=0), *trees)


def stack(trees):
    """Stack pytrees of equal structure and leaf shapes on a new leading axis.

    Args:
      trees: a sequence of K >= 1 pytrees (members), leaves ``(...)``.

    Returns:
      One pytree, leaves ``(K, ...)``; ``member(stack(trees), k)`` equals ``trees[k]``.

    Raises:
      ValueError: an empty sequence, or members of different structure or shapes.
    """
    trees = list(trees)
    if not trees:
        raise ValueError("stack needs at least one member")
    return _stack(trees)


@jax.jit
def _member(tree, k):
    return jax.tree_util.tree_map(lambda a: lax.dynamic_index_in_dim(a, k, keepdims=False),
                                  tree)


def member(tree, k: int):
    """Member ``k`` of a stacked pytree (leaves ``(K, ...)`` -> ``(...)``).

    ``k`` is traced, so one compiled program serves every member.

    Raises:
      IndexError: ``k`` outside ``0..K-1`` (never silently clamped).
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return tree
    K = jnp.shape(leaves[0])[0]
    k = int(k)
    if not 0 <= k < K:
        raise IndexError(f"member {k} of an ensemble of {K}")
    return _member(tree, jnp.asarray(k, jnp.int32))
