"""Argument checks of :func:`ntkexp.training.train`: one readable sentence per bad input."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkexp.empirical import require_finite_inputs
from ntkexp.training.layouts import ENSEMBLE_MODES
from ntkexp.training.step import LOSS_REDUCTIONS, LOSSES

_SHAPE_CACHE: dict = {}


def _output_shape(apply_fn, params, x):
    """``jax.eval_shape(apply_fn, params, x)``, cached per model and shapes; clear error."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    key = (apply_fn, treedef, tuple((jnp.shape(l), jnp.result_type(l)) for l in leaves),
           x.shape, x.dtype)
    try:
        hit = _SHAPE_CACHE.get(key)
    except TypeError:  # an unhashable apply_fn: no cache
        return _eval_output_shape(apply_fn, params, x)
    if hit is None:
        if len(_SHAPE_CACHE) > 256:
            _SHAPE_CACHE.clear()
        hit = _SHAPE_CACHE[key] = _eval_output_shape(apply_fn, params, x)
    return hit


def _eval_output_shape(apply_fn, params, x):
    try:
        return jax.eval_shape(apply_fn, params, x)
    except Exception as e:  # noqa: BLE001 - any failure here is a shape/type mismatch
        raise ValueError(f"apply_fn(params, x) fails on x of shape {tuple(x.shape)}: {e}") from None


def _class_targets(y, labels: bool, out_shape, dtype):
    """Cross-entropy targets ``(n, C)`` from integer labels or rows summing to 1; clear errors."""
    if len(out_shape) != 2 or out_shape[1] < 2:
        raise ValueError("softmax_cross_entropy needs logits of shape (n, classes >= 2), "
                         f"the model outputs {tuple(out_shape)}")
    C = out_shape[1]
    if labels:
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"class labels must be integers, got dtype {y.dtype}")
        lab = np.asarray(y)
        if lab.size and (lab.min() < 0 or lab.max() >= C):
            raise ValueError(f"class labels must lie in 0..{C - 1}, got {lab.min()}..{lab.max()}")
        return jax.nn.one_hot(y, C, dtype=dtype)
    rows = np.asarray(y, np.float64)
    if rows.shape[1:] == (C,) and (np.any(rows < 0) or not np.allclose(rows.sum(axis=1), 1.0,
                                                                        atol=1e-5)):
        raise ValueError("cross-entropy targets must be non-negative rows that sum to 1")
    return y


def _check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


class Inputs(NamedTuple):
    """The checked arguments of one :func:`~ntkexp.training.train` call."""

    x: Any
    y: Any  # (n, out) in the outputs' dtype, or (K, n, out) per member
    n: int
    K: int | None
    one_params: Any  # one member's parameters (ShapeDtypeStruct leaves with an ensemble)
    member_bytes: int
    steps: int
    batch_size: int | None
    rec: list
    probe_x: Any
    key: Any
    key_per_member: bool
    y_per_member: bool


def _check_options(optimizer, loss_reduction: str, loss: str, ensemble_mode: str) -> None:
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "optimizer must be an optax GradientTransformation, "
            f"got {type(optimizer).__name__}"
        )
    if ensemble_mode not in ENSEMBLE_MODES:
        raise ValueError(
            f"ensemble_mode must be one of {', '.join(ENSEMBLE_MODES)}, got {ensemble_mode!r}"
        )


def _check_data(x, y, loss: str, ensemble: bool, targets_per_member: bool):
    """``(x, y, y_members, labels)`` with shapes checked (targets not yet cast)."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    y_members = None
    if targets_per_member:
        if not ensemble or loss != "squared":
            raise ValueError("targets_per_member needs ensemble=True and the squared loss")
        if y.ndim not in (2, 3):
            raise ValueError(f"per-member targets must have shape (K, n) or (K, n, out_dim), "
                             f"got {tuple(y.shape)}")
        y_members, y = y, y[0]
    if x.ndim != 2:
        raise ValueError(f"x must have shape (n, d), got {tuple(x.shape)}")
    n = x.shape[0]
    labels = loss == "softmax_cross_entropy" and y.ndim == 1
    if y.ndim == 1 and not labels:
        y = y[:, None]
    if (y.ndim != 2 and not labels) or y.shape[0] != n:
        raise ValueError(f"x and y disagree: x has {n} points but y has shape {tuple(y.shape)}")
    return x, y, y_members, labels


def _members(params, ensemble: bool):
    """``(K, one member's params, bytes per member)``."""
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params is empty")
    K = None
    if ensemble:
        shapes = {jnp.shape(l)[:1] for l in leaves}
        if len(shapes) != 1 or () in shapes:
            raise ValueError("with ensemble=True every params leaf needs the same leading axis K")
        (K,) = shapes.pop()
    # one member's shapes (no arrays sliced: this runs on every call)
    one_params = jax.tree_util.tree_map(
        lambda l: jax.ShapeDtypeStruct(jnp.shape(l)[1:], jnp.result_type(l)), params
    ) if ensemble else params
    member_bytes = sum(l.size * l.dtype.itemsize for l in leaves) // (K or 1)
    return K, one_params, member_bytes


def _targets(apply_fn, one_params, x, y, y_members, labels: bool, loss: str, K):
    """Targets checked against the model's output shape, promoted with its dtype."""
    out = _output_shape(apply_fn, one_params, x)
    if loss == "softmax_cross_entropy":
        y = _class_targets(y, labels, out.shape, out.dtype)
    if tuple(out.shape) != tuple(y.shape):
        raise ValueError(
            f"model output has shape {tuple(out.shape)} but y has shape {tuple(y.shape)}"
        )
    # targets promote with the outputs (JAX's rules): float64 targets beside a
    # float32 network give a float64 loss; nothing is silently cast down
    y = y.astype(jnp.result_type(out.dtype, y.dtype))
    if y_members is not None:
        if y_members.ndim == 2:
            y_members = y_members[..., None]
        if tuple(y_members.shape) != (K, *y.shape):
            raise ValueError(f"per-member targets must have shape {(K, *y.shape)}, got "
                             f"{tuple(y_members.shape)}")
        y = y_members.astype(jnp.result_type(out.dtype, y_members.dtype))
    return y


def _schedule(steps, batch_size, replace: bool, record_steps, n: int):
    """``(steps, batch_size or None for full batch, sorted record steps)``."""
    steps = _check_int("steps", steps, 0)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the {n} training points")
        if batch_size == n and not replace:
            batch_size = None
    rec = sorted({_check_int("record step", s, 0) for s in record_steps})
    if rec and rec[-1] > steps:
        raise ValueError(f"record step {rec[-1]} is beyond the last step {steps}")
    return steps, batch_size, rec


def _keys(key, ensemble: bool):
    """``(key, one key per member?)``; default ``jax.random.key(0)``."""
    if key is None:
        key = jax.random.key(0)
    per_member = bool(ensemble and jnp.ndim(key) == 1 and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)))
    if ensemble and not per_member and jnp.ndim(key) == 2:  # raw uint32 keys (K, 2)
        per_member = True
    return key, per_member


def prepare(apply_fn, params, x, y, *, optimizer, steps, loss_reduction, loss, batch_size,
            key, ensemble, record_steps, probe_x, replace, ensemble_mode,
            targets_per_member) -> Inputs:
    """Check every argument of ``train`` (ValueError / TypeError, one sentence each)."""
    _check_options(optimizer, loss_reduction, loss, ensemble_mode)
    require_finite_inputs(x, y, probe_x)  # NaN inputs: said so, not a "divergence"
    x, y, y_members, labels = _check_data(x, y, loss, ensemble, targets_per_member)
    n = x.shape[0]
    K, one_params, member_bytes = _members(params, ensemble)
    y = _targets(apply_fn, one_params, x, y, y_members, labels, loss, K)
    steps, batch_size, rec = _schedule(steps, batch_size, replace, record_steps, n)
    if probe_x is not None:
        probe_x = jnp.asarray(probe_x)
        if probe_x.ndim != 2 or probe_x.shape[1] != x.shape[1]:
            raise ValueError(
                f"probe_x must have shape (m, {x.shape[1]}), got {tuple(probe_x.shape)}"
            )
    key, key_per_member = _keys(key, ensemble)
    return Inputs(x, y, n, K, one_params, member_bytes, steps, batch_size, rec, probe_x, key,
                  key_per_member, y_members is not None)

