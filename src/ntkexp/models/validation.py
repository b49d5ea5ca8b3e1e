"""Field checks shared by the frozen architecture specs (one readable error each)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp


def promote(x, params):
    """``(x, params)`` cast to the promoted dtype of ``x`` and the floating ``params``.

    The models follow JAX's type promotion (``jnp.result_type``), as Flax's
    layers do with ``dtype=None`` (``flax.nnx.Linear`` promotes its inputs,
    kernel and bias together, ``flax.nnx.nn.dtypes.promote_dtype``) and as
    neural-tangents does: float32 parameters applied to float64
    inputs compute in float64, float64 parameters upcast float32 inputs, and
    integer inputs take the parameters' float dtype. No cast loses precision,
    so nothing is silently downcast; a caller wanting float32 throughout casts
    its inputs itself. (Without ``jax_enable_x64`` no float64 array exists, so
    everything is float32.) The parameters are upcast too, so that every
    product (a bias times its multiplier as well) is formed in the wide dtype;
    under autodiff the gradients still come back in the parameters' own dtype.
    """
    x = jnp.asarray(x)
    leaves = [l for l in jax.tree_util.tree_leaves(params)
              if jnp.issubdtype(jnp.result_type(l), jnp.inexact)]
    dt = jnp.result_type(x, *leaves)
    if not jnp.issubdtype(dt, jnp.inexact):
        dt = jnp.result_type(dt, jnp.float32)

    def up(l):
        ldt = jnp.result_type(l)
        return l.astype(dt) if jnp.issubdtype(ldt, jnp.inexact) and ldt != dt else l

    return x.astype(dt), jax.tree_util.tree_map(up, params)


def check_int(cls: str, name: str, v, *, minimum: int) -> None:
    """Raise ``ValueError`` unless ``v`` is an int (not bool) ``>= minimum``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{cls}.{name} must be an integer >= {minimum}, got {v!r}")


def check_std(cls: str, name: str, v) -> float:
    """Return ``float(v)``; raise ``ValueError`` unless it is finite and ``>= 0``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{cls}.{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def norm_activation_params(params) -> tuple:
    """Activation keyword parameters as a sorted tuple of pairs (hashable)."""
    if isinstance(params, Mapping):
        params = tuple(sorted(params.items()))
    return tuple(tuple(p) for p in params)


