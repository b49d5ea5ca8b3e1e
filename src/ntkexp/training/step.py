"""The training step: loss, gradient and optimizer update of one network on one batch.

The squared loss ``(1/2) c ||f(theta, x) - y||^2`` (``c = 1/n`` for ``"mean"``;
Jacot et al. 2018, Du et al. 2019) or the softmax cross-entropy; the gradient is
one vjp of the residual ``r = dL/du`` (the model's own pullback if it defines
``vjp``), and the optax update receives ``x``, ``residual``, ``apply_fn`` and
``loss`` as extra arguments (``ntkexp.optim.ngd`` uses them). Also the static
description of a run (:class:`_Config`), the trainable / frozen partition of
the parameters, and the set-up and final loss around the steps.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

LOSS_REDUCTIONS = ("mean", "sum")
LOSSES = ("squared", "softmax_cross_entropy")


# Parameter partition (trainable / frozen)
# --------------------------------------------------------------------------


class _Partition(NamedTuple):
    """Static description of which leaves are trained (hashable)."""

    treedef: Any
    mask: tuple | None  # None: every leaf trained; the tree is kept as is

    def split(self, params):
        if self.mask is None:
            return params, []
        leaves = self.treedef.flatten_up_to(params)
        tr = [p for p, m in zip(leaves, self.mask, strict=True) if m]
        fr = [p for p, m in zip(leaves, self.mask, strict=True) if not m]
        return tr, fr

    def combine(self, tr, fr):
        if self.mask is None:
            return tr
        it_tr, it_fr = iter(tr), iter(fr)
        leaves = [next(it_tr) if m else next(it_fr) for m in self.mask]
        return self.treedef.unflatten(leaves)


def _make_partition(apply_fn, params, trainable) -> _Partition:
    treedef = jax.tree_util.tree_structure(params)
    if trainable is None:
        trainable = getattr(apply_fn, "trainable_mask", None)
        if trainable is None:
            return _Partition(treedef, None)
    if callable(trainable):
        trainable = trainable(params)
    try:
        full = jax.tree_util.tree_map(
            lambda m, sub: jax.tree_util.tree_map(lambda _: bool(m), sub), trainable, params
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"trainable mask does not match the parameter tree: {e}") from None
    mask = tuple(bool(m) for m in jax.tree_util.tree_leaves(full))
    if not any(mask):
        raise ValueError("trainable mask freezes every parameter; nothing to train")
    if all(mask):
        return _Partition(treedef, None)
    return _Partition(treedef, mask)


class _Config(NamedTuple):
    apply_fn: Any
    optimizer: Any
    partition: _Partition
    loss_reduction: str
    batch_size: int | None  # None: full batch
    replace: bool
    ensemble: bool
    key_per_member: bool
    unroll_members: str = "vmap"  # ensemble layout: "vmap", "unroll" or "sequential"
    small: bool = False  # <= 1 MiB of parameters per member: no intra-op threading on CPU
    loss: str = "squared"  # or "softmax_cross_entropy"
    y_per_member: bool = False  # ensemble targets carry a leading axis K


def _value_and_residual(cfg: _Config, out, yb):
    """Loss on a batch and its per-sample output gradient ``dL_i/du_i`` (``(n, out_dim)``).

    Squared loss: ``u - y``. Softmax cross-entropy: ``softmax(u) - y``.
    """
    if cfg.loss == "squared":
        r = out - yb
        val = 0.5 * jnp.sum(r * r)
    else:
        logp = jax.nn.log_softmax(out, axis=-1)
        val = -jnp.sum(yb * logp)
        r = jnp.exp(logp) - yb
    if cfg.loss_reduction == "mean":
        val = val / out.shape[0]
    return val, r


def _loss(cfg: _Config, f, p, xb, yb):
    return _value_and_residual(cfg, f(p, xb), yb)


def _loss_and_grad(cfg: _Config, frozen, p, xb, yb):
    """``(loss, residual, grad)`` on a batch, with the model's own pullback if it has one.

    The gradient of ``L = (1/2) c ||f(theta, x) - y||^2`` is ``c J^T r``, one
    vjp of the residual ``r`` (``c = 1/n`` for the mean loss); for the
    cross-entropy ``r = softmax(u) - y``. Apply objects
    may define ``vjp(params, x) -> (out, pullback)`` (``MLPApply`` does: a
    hand-written backward pass, see :meth:`ntkexp.models.mlp.MLPApply.vjp`);
    anything else goes through ``jax.vjp``.
    """
    part = cfg.partition
    own_vjp = getattr(cfg.apply_fn, "vjp", None)
    if callable(own_vjp):
        out, pull_full = own_vjp(part.combine(p, frozen), xb)

        def pull(c):
            return part.split(pull_full(c))[0]
    else:
        out, pull_tr = jax.vjp(lambda q: cfg.apply_fn(part.combine(q, frozen), xb), p)

        def pull(c):
            return pull_tr(c)[0]
    val, r = _value_and_residual(cfg, out, yb)
    # the cotangent in the outputs' dtype, as jax.grad rounds it at the promotion of
    # float32 outputs beside float64 targets
    c = (r / xb.shape[0] if cfg.loss_reduction == "mean" else r).astype(out.dtype)
    return val, r, pull(c)


def _batch_indices(cfg: _Config, key, step, n):
    b = cfg.batch_size
    if cfg.replace:
        return jax.random.randint(jax.random.fold_in(key, step), (b,), 0, n)
    per_epoch = n // b
    epoch, j = step // per_epoch, step % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    return jax.lax.dynamic_slice(perm, (j * b,), (b,))


def model_of_trained(cfg: _Config, frozen):
    """The model as a function of the trained parameters, for the optimizer.

    Every leaf trained: the apply object itself, so that its structure reaches the
    optimizer (``ngd(ntk_method="structured")`` keeps the structured empirical NTK of
    :mod:`ntkexp.empirical`, and ``"auto"`` picks it). With frozen leaves: a closure
    that puts them back (its NTK is over the trained leaves only).
    """
    if cfg.partition.mask is None:
        return cfg.apply_fn
    part = cfg.partition

    def f_tr(p, xx):
        return cfg.apply_fn(part.combine(p, frozen), xx)

    return f_tr


def _make_body(cfg: _Config, frozen, key, x, y):
    """One training step ``((p, s), step) -> ((p, s), loss before the step)`` for one init."""
    opt = cfg.optimizer
    f_tr = model_of_trained(cfg, frozen)

    n = x.shape[0]

    def body(carry, step):
        p, s = carry
        if cfg.batch_size is None:
            xb, yb = x, y
        else:
            idx = _batch_indices(cfg, key, step, n)
            xb, yb = x[idx], y[idx]
        val, r, g = _loss_and_grad(cfg, frozen, p, xb, yb)
        if cfg.batch_size is not None:
            val = _loss(cfg, f_tr, p, x, y)[0]
        upd, s = opt.update(g, s, p, x=xb, residual=r, apply_fn=f_tr, loss=cfg.loss)
        p = optax.apply_updates(p, upd)
        return (p, s), val

    return body


@functools.partial(jax.jit, static_argnames=("cfg",))
def _split_params(cfg: _Config, params):
    return (jax.vmap(cfg.partition.split) if cfg.ensemble else cfg.partition.split)(params)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _init_state(cfg: _Config, p_tr):
    return jax.vmap(cfg.optimizer.init)(p_tr) if cfg.ensemble else cfg.optimizer.init(p_tr)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _combine_params(cfg: _Config, p_tr, frozen):
    return (jax.vmap(cfg.partition.combine) if cfg.ensemble else cfg.partition.combine)(p_tr,
                                                                                         frozen)


def _setup(cfg: _Config, params):
    """``(trainable, frozen, optimizer state)``; no parameter copy when all are trained."""
    p_tr, frozen = (params, []) if cfg.partition.mask is None else _split_params(cfg, params)
    return p_tr, frozen, _init_state(cfg, p_tr)


def _with_hyperparams(state, values: Mapping[str, Any]):
    """``state`` with entries of its ``hyperparams`` dict replaced by ``values`` (traced)."""
    hp = getattr(state, "hyperparams", None)
    if not isinstance(hp, dict) or not hasattr(state, "_replace"):
        raise ValueError("hyperparams= needs an optimizer whose state holds a hyperparams dict "
                         "(optax.inject_hyperparams or "
                         "ntkexp.experiments.common.traced_learning_rate)")
    new = dict(hp)
    for name, v in values.items():
        if name not in hp:
            raise ValueError(f"hyperparams: the optimizer state has no {name!r} "
                             f"(it has {', '.join(sorted(hp))})")
        old = jnp.asarray(hp[name])
        new[name] = jnp.broadcast_to(jnp.asarray(v, old.dtype), old.shape)
    return state._replace(hyperparams=new)


def _combine(cfg: _Config, p_tr, frozen):
    return p_tr if cfg.partition.mask is None else _combine_params(cfg, p_tr, frozen)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _final_loss(cfg: _Config, p_tr, frozen, x, y):
    def one(p, fr, yy):
        return _loss(cfg, lambda q, xx: cfg.apply_fn(cfg.partition.combine(q, fr), xx), p, x,
                     yy)[0]

    if not cfg.ensemble:
        return one(p_tr, frozen, y)
    return jax.vmap(one, in_axes=(0, 0, 0 if cfg.y_per_member else None))(p_tr, frozen, y)
