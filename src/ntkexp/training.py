"""Training loop: jit-compiled, ``lax.scan`` over steps, ``vmap`` over initialisations.

:func:`train` minimises the squared loss

    L(theta) = (1 / 2) sum_i ||f(theta, x_i) - y_i||^2          (loss_reduction="sum";
                                                                  Du et al. 2019, Arora et al. 2019)
    L(theta) = (1 / 2n) sum_i ||f(theta, x_i) - y_i||^2         (loss_reduction="mean";
                                                                  Jacot et al. 2018, C = E_pin)

with any optax transformation (``ntkexp.optim.gd``/``sgd``/``ngd``, or an
``optax.chain``); or, with ``loss="softmax_cross_entropy"``, the cross-entropy
``sum_i -y_i . log softmax(f(theta, x_i))`` (divided by n for "mean") on
integer labels or one-hot / probability targets. Steps run inside
``lax.scan`` in chunks; between chunks the host checks for divergence, calls
the progress callback and, at the requested ``record_steps``, records probe
outputs, the empirical NTK on the probe points, the distance from
initialisation and, for models exposing their pre-activations (layer
compositions, the MLP, the two-layer net), the fraction of flipped
activation patterns (Du et al. 2019, Fig. 1b) and ``max_r ||w_r(t) - w_r(0)||``
(Fig. 1c).

``ensemble=True`` trains K stacked initialisations (every params leaf has a
leading axis K; build them with :func:`init_ensemble`) in one vmapped program,
so K initialisations cost about one K-times-larger batch. On CPU the members
are split into one group per available core, each group a program of its own
run from a host thread (``threads``): XLA:CPU runs one program's small ops on
one core; members over 1 MiB trained on a few rows instead run one after
another, each as the single-network program (``ensemble_mode="loop"``).
Models that define ``vjp(params, x)`` (the MLP's dense-stack fast path) get
their gradients from it rather than from ``jax.vjp``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntkexp.models  # noqa: F401  (registers the built-in architectures)
from ntkexp.empirical import empirical_ntk, require_finite_inputs
from ntkexp.members import member as take_member
from ntkexp.members import stack as stack_members

Array = jax.Array
LOSS_REDUCTIONS = ("mean", "sum")
LOSSES = ("squared", "softmax_cross_entropy")
ENSEMBLE_MODES = ("auto", "vmap", "unroll", "sequential", "loop")
_SEQUENTIAL_BYTES = 1 << 20
_LOOP_MAX_ROWS = 16


class DivergenceError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step and value."""


class TrainResult(NamedTuple):
    """What :func:`train` returns (a pytree). ``K`` = ensemble size, ``R`` = len(record_steps).

    Attributes:
      params: final parameters (the full tree, frozen leaves included).
      losses: ``(steps + 1,)`` or ``(K, steps + 1)``: entry k is the full
        training loss before update k; the last entry is after the final step.
      record_steps: the recorded steps, sorted, as a tuple of ints.
      probe_outputs: ``([K,] R, n_probe, out_dim)`` f(probe_x), or None.
      probe_ntk: ``([K,] R, n_probe, n_probe)`` empirical NTK on probe_x with
        respect to the trainable parameters, or None.
      distance: ``([K,] R)`` ``||theta_t - theta_0||_2`` over all parameters.
      flip_fraction: ``([K,] R)`` fraction of (training point, hidden unit)
        pairs whose pre-activation sign differs from initialisation (all hidden
        layers), or None for models without known pre-activations.
      max_weight_distance: ``([K,] R)`` ``max_r ||w_r(t) - w_r(0)||`` over the
        first hidden layer's units, or None.
      opt_state: final optimizer state.
    """

    params: Any
    losses: Array
    record_steps: tuple
    probe_outputs: Array | None = None
    probe_ntk: Array | None = None
    distance: Array | None = None
    flip_fraction: Array | None = None
    max_weight_distance: Array | None = None
    opt_state: Any = None


# --------------------------------------------------------------------------
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


# --------------------------------------------------------------------------
# The scanned training chunk
# --------------------------------------------------------------------------


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


def _make_body(cfg: _Config, frozen, key, x, y):
    """One training step ``((p, s), step) -> ((p, s), loss before the step)`` for one init."""
    part, opt = cfg.partition, cfg.optimizer

    def f_tr(p, xx):
        return cfg.apply_fn(part.combine(p, frozen), xx)

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


def _single_chunk(cfg: _Config, length: int, p_tr, opt_state, frozen, key, x, y, start):
    body = _make_body(cfg, frozen, key, x, y)
    steps = start + jnp.arange(length)
    (p_tr, opt_state), losses = jax.lax.scan(body, (p_tr, opt_state), steps)
    return p_tr, opt_state, losses


def _unrolled_chunk(cfg: _Config, length: int, p_tr, opt_state, frozen, key, x, y, start):
    """Ensemble members as separate carries of one scan (no batched matmuls).

    On XLA:CPU a vmapped dot of many small matrices can be slower than the
    same dots issued one by one (measured up to 1.8x at width 50, noisy).
    """
    K = jax.tree_util.tree_leaves(p_tr)[0].shape[0]

    def member(t, k):
        return jax.tree_util.tree_map(lambda a: a[k], t)

    bodies = [_make_body(cfg, member(frozen, k), key[k] if cfg.key_per_member else key, x,
                         y[k] if cfg.y_per_member else y)
              for k in range(K)]

    def body(carry, step):
        outs = [b(c, step) for b, c in zip(bodies, carry, strict=True)]
        return [o[0] for o in outs], jnp.stack([o[1] for o in outs])

    carry0 = [(member(p_tr, k), member(opt_state, k)) for k in range(K)]
    carry, losses = jax.lax.scan(body, carry0, start + jnp.arange(length))

    def stack(*a):
        return jnp.stack(a)

    p_tr = jax.tree_util.tree_map(stack, *[c[0] for c in carry])
    opt_state = jax.tree_util.tree_map(stack, *[c[1] for c in carry])
    return p_tr, opt_state, losses.T


def _sequential_chunk(cfg: _Config, length: int, p_tr, opt_state, frozen, key, x, y, start):
    """Members one after another (``lax.map``): one member's working set stays in cache."""

    def one(args):
        p, s, fr, k, yk = args
        return _single_chunk(cfg, length, p, s, fr, k if cfg.key_per_member else key, x,
                             yk if cfg.y_per_member else y, start)

    keys = key if cfg.key_per_member else jnp.zeros(jax.tree_util.tree_leaves(p_tr)[0].shape[:1])
    ys = y if cfg.y_per_member else keys
    return jax.lax.map(one, (p_tr, opt_state, frozen, keys, ys))


def _chunk(cfg: _Config, length: int, p_tr, opt_state, frozen, key, x, y, start):
    if cfg.ensemble and cfg.unroll_members == "unroll":
        return _unrolled_chunk(cfg, length, p_tr, opt_state, frozen, key, x, y, start)
    if cfg.ensemble and cfg.unroll_members == "sequential":
        return _sequential_chunk(cfg, length, p_tr, opt_state, frozen, key, x, y, start)
    fn = functools.partial(_single_chunk, cfg, length)
    if cfg.ensemble:
        fn = jax.vmap(fn, in_axes=(0, 0, 0, 0 if cfg.key_per_member else None, None,
                                   0 if cfg.y_per_member else None, None))
    return fn(p_tr, opt_state, frozen, key, x, y, start)


# XLA:CPU otherwise copies every parameter buffer at the top of each scan step
# (copy insertion cannot prove the in-place update safe); measured 8% of a
# width-50 step. Only passed where the compiler knows the option.
_CPU_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
# Small models: no loop split across the intra-op thread pool. Waking the pool
# costs more than these ops (a 10 x 2 x 50 gradient fusion took 16 us split,
# under 1 us not), and ``train`` runs ensemble groups on their own threads.
_CPU_SMALL_OPTIONS = {**_CPU_OPTIONS, "xla_disable_hlo_passes": "cpu-parallel-task-assigner"}
_run_chunk_plain = jax.jit(_chunk, static_argnames=("cfg", "length"))
_run_chunk_cpu = jax.jit(_chunk, static_argnames=("cfg", "length"), compiler_options=_CPU_OPTIONS)
_run_chunk_cpu_small = jax.jit(_chunk, static_argnames=("cfg", "length"),
                               compiler_options=_CPU_SMALL_OPTIONS)


@functools.cache
def _cpu_options_supported() -> bool:
    try:
        jax.jit(lambda a: a + 1, compiler_options=_CPU_SMALL_OPTIONS).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - an unknown option: compile without it
        return False
    return True


def _run_chunk(cfg: _Config, length: int, *args):
    if jax.default_backend() == "cpu" and _cpu_options_supported():
        return (_run_chunk_cpu_small if cfg.small else _run_chunk_cpu)(cfg, length, *args)
    return _run_chunk_plain(cfg, length, *args)


def _host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A persistent pool of ``workers`` threads (starting threads on every call costs ~1 ms)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="ntkexp-train")
    return _POOLS[workers]


_THREAD_MIN_STEPS = 200


_THREAD_MAX_MEMBER_BYTES = 64 << 20


def _auto_threads(K: int | None, steps: int, member_bytes: int = 0) -> int:
    """Default host threads: the most groups (<= cores) of equal size >= 2 that divide K.

    Equal groups share one compiled program; short runs (< 200 steps) are not
    split, since there compiling dominates and splitting cannot pay; nor are
    members over 64 MiB, whose matmuls already use every core (and splitting
    copies the parameters once more).
    """
    if K is None or steps < _THREAD_MIN_STEPS or member_bytes > _THREAD_MAX_MEMBER_BYTES:
        return 1
    for g in range(min(_host_cores(), K // 2), 1, -1):
        if K % g == 0:
            return g
    return 1


def _member_groups(K: int, threads: int) -> list[tuple[int, int]]:
    """Split ``range(K)`` into ``threads`` contiguous near-equal groups ``(start, stop)``."""
    threads = max(1, min(threads, K))
    size = -(-K // threads)
    return [(a, min(a + size, K)) for a in range(0, K, size)]


@functools.partial(jax.jit, static_argnames=("groups",))
def _split_groups(tree, groups):
    return [jax.tree_util.tree_map(lambda l, g=g: l[g[0]:g[1]], tree) for g in groups]


@jax.jit
def _concat_groups(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0), *trees)


def _concat(trees):
    return trees[0] if len(trees) == 1 else _concat_groups(trees)


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


@functools.partial(jax.jit, static_argnames=("cfg", "with_probe"))
def _record(cfg: _Config, with_probe: bool, p_tr, frozen, params0, x, probe_x):
    from ntkexp.theory import max_weight_distance, pattern_flip_fraction, supports_patterns

    part = cfg.partition

    def one(p, fr, p0):
        full = part.combine(p, fr)
        out = {}
        if with_probe:
            out["probe_outputs"] = cfg.apply_fn(full, probe_x)
            if part.mask is None:
                out["probe_ntk"] = empirical_ntk(cfg.apply_fn, full, probe_x)
            else:
                f_tr = lambda q, xx: cfg.apply_fn(part.combine(q, fr), xx)  # noqa: E731
                out["probe_ntk"] = empirical_ntk(f_tr, p, probe_x)
        sq = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(full),
                                                      jax.tree_util.tree_leaves(p0), strict=True))
        out["distance"] = jnp.sqrt(sq)
        if supports_patterns(cfg.apply_fn):
            out["flip_fraction"] = pattern_flip_fraction(cfg.apply_fn, full, p0, x)
            out["max_weight_distance"] = max_weight_distance(cfg.apply_fn, full, p0)
        return out

    if cfg.ensemble:
        return jax.vmap(one)(p_tr, frozen, params0)
    return one(p_tr, frozen, params0)


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


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


def train(
    apply_fn: Callable,
    params,
    x,
    y,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    loss_reduction: str = "mean",
    loss: str = "squared",
    batch_size: int | None = None,
    key: Array | None = None,
    ensemble: bool = False,
    trainable=None,
    record_steps: Sequence[int] = (),
    probe_x=None,
    callback: Callable[[int, np.ndarray], Any] | None = None,
    chunk_size: int | None = None,
    replace: bool = False,
    ensemble_mode: str = "auto",
    threads: int | None = None,
    targets_per_member: bool = False,
    hyperparams: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``apply_fn`` on the squared loss; jit + ``lax.scan`` (+ ``vmap`` for ensembles).

    Args:
      apply_fn: ``apply_fn(params, x) -> (n, out_dim)``; hashable (e.g. an
        ``MLPApply``) so that compiled steps are reused across calls.
      params: parameter pytree; with ``ensemble=True`` every leaf has a leading
        axis K.
      x: training inputs ``(n, d)``.
      y: targets ``(n,)`` or ``(n, out_dim)``.
      optimizer: an optax transformation; it is called with the extra
        arguments ``x`` (the batch), ``residual`` (``f(x) - y`` on the batch,
        or ``softmax(f(x)) - y``), ``apply_fn`` (the model as a function of
        the trainable params) and ``loss``.
      steps: number of updates (>= 0).
      loss_reduction: ``"mean"`` (1/(2n) sum) or ``"sum"`` (1/2 sum).
      loss: ``"squared"`` or ``"softmax_cross_entropy"`` (``y``: integer
        labels ``(n,)`` in ``0..out_dim-1`` or targets ``(n, out_dim)`` whose
        rows sum to 1; the model's outputs are logits). Optimizers receive
        ``residual = dL_i/du_i`` (``u - y`` or ``softmax(u) - y``) and
        ``loss``; ``ngd`` then takes the generalized Gauss-Newton step.
      batch_size: mini-batch size (<= n); None or n means full batch.
      key: PRNG key for mini-batches (one key, or K keys with ``ensemble``);
        default ``jax.random.key(0)``.
      ensemble: params carry a leading axis K of stacked initialisations.
      trainable: mask of trained leaves: a pytree of bools that is a prefix of
        params, a callable ``params -> mask`` (given one member's parameters, as
        ``jax.ShapeDtypeStruct`` leaves with ``ensemble``), or None (the apply object's
        ``trainable_mask`` if it has one, else everything).
      record_steps: steps (0..steps) at which to record diagnostics.
      probe_x: ``(n_probe, d)`` points for the recorded outputs and NTK.
      callback: ``callback(step, losses)`` called from the host after each
        chunk with the losses so far (numpy, ``(step,)`` or ``(K, step)``).
      chunk_size: steps per compiled chunk (default: all steps, or about a
        twentieth of them when a callback is given).
      replace: mini-batches with replacement (default: without, epoch-wise
        permutations, a remainder smaller than ``batch_size`` is dropped).
      ensemble_mode: how an ensemble is laid out in the compiled program:
        ``"vmap"`` (batched matmuls; best on accelerators), ``"unroll"``
        (members as separate carries of one scan: on CPU batched small
        matmuls are slow), ``"sequential"`` (``lax.map`` over members, each
        runs all its steps: one member's weights stay in cache), ``"loop"``
        (each member its own single-network program, run one after another
        from the host: the program of ``ensemble=False``, so its matmuls use
        the intra-op thread pool) or ``"auto"`` (vmap, except on CPU when a
        member has over 1 MiB of parameters: for batches under 16 rows, loop,
        whose steps are memory-bound matrix-vector products (Jacot Fig. 2, 4
        points, width 1000: loop 10 s, sequential 11 s, sequential on 2 threads
        14 s, vmap 28 s); else sequential, on host threads as ``threads`` says
        (100 points, width 1500: 37 s on 2 threads, 39 s on 1).
        All give the same numbers to rounding.
      threads: host threads an ensemble is split over, each running its
        share of the members as its own compiled program (CPU only: XLA:CPU
        runs one program's small ops on one core). Default on CPU: the largest
        number of equal groups of at least 2 members, at most the number of
        cores available to the process, for runs of 200 steps or more (shorter
        runs are dominated by compiling) and members of at most 64 MiB (larger
        ones already use every core); 1 elsewhere. Same numbers to
        rounding for any value.
      targets_per_member: with ``ensemble=True`` and the squared loss, ``y``
        has a leading axis K, ``(K, n)`` or ``(K, n, out_dim)``: member k
        fits ``y[k]`` (e.g. centred targets ``y + f(theta_0^k, X)``).
      hyperparams: values written into the optimizer state's ``hyperparams``
        dict after ``optimizer.init`` (a state with a ``hyperparams`` field,
        as ``optax.inject_hyperparams`` or
        ``ntkexp.experiments.common.traced_learning_rate`` make): scalars, or
        ``(K,)`` arrays, one value per member. They are traced, so one
        compiled program serves every value (a learning-rate sweep compiles
        once per shape).

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError / TypeError: bad arguments (one readable sentence).
      DivergenceError: the loss became NaN or infinite (names step and value).
    """
    require_finite_inputs(x, y, probe_x)  # NaN inputs: said so, not a "divergence"
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "optimizer must be an optax GradientTransformation, "
            f"got {type(optimizer).__name__}"
        )
    steps = _check_int("steps", steps, 0)
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
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the {n} training points")
        if batch_size == n and not replace:
            batch_size = None
    rec = sorted({_check_int("record step", s, 0) for s in record_steps})
    if rec and rec[-1] > steps:
        raise ValueError(f"record step {rec[-1]} is beyond the last step {steps}")
    with_probe = probe_x is not None
    if with_probe:
        probe_x = jnp.asarray(probe_x)
        if probe_x.ndim != 2 or probe_x.shape[1] != x.shape[1]:
            raise ValueError(
                f"probe_x must have shape (m, {x.shape[1]}), got {tuple(probe_x.shape)}"
            )
    if key is None:
        key = jax.random.key(0)
    key_per_member = bool(ensemble and jnp.ndim(key) == 1 and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)))
    if ensemble and not key_per_member and jnp.ndim(key) == 2:  # raw uint32 keys (K, 2)
        key_per_member = True

    if ensemble_mode not in ENSEMBLE_MODES:
        raise ValueError(
            f"ensemble_mode must be one of {', '.join(ENSEMBLE_MODES)}, got {ensemble_mode!r}"
        )
    member_bytes = sum(l.size * l.dtype.itemsize for l in leaves) // (K or 1)
    cpu_ensemble = ensemble and jax.default_backend() == "cpu"
    unroll = ensemble_mode
    if ensemble_mode == "auto":
        # interleaving members streams K working sets through the cache every step;
        # beyond a few MB per member, finishing one member at a time is faster (CPU)
        unroll = "vmap"
        if cpu_ensemble and member_bytes > _SEQUENTIAL_BYTES:
            # a few rows per step are matrix-vector products, bound by memory traffic:
            # members one at a time, each over every core; more rows: lax.map + threads
            rows = n if batch_size is None else batch_size
            unroll = "loop" if rows < _LOOP_MAX_ROWS else "sequential"
    loop = bool(ensemble) and unroll == "loop"
    if threads is None:
        # a looped member's matmuls already use every core (intra-op threads)
        threads = _auto_threads(K, steps, member_bytes) if cpu_ensemble and not loop else 1
    threads = _check_int("threads", threads, 1)
    part = _make_partition(apply_fn, one_params, trainable)
    opt = optax.with_extra_args_support(optimizer)
    cfg = _Config(apply_fn, opt, part, loss_reduction, batch_size, bool(replace), bool(ensemble),
                  key_per_member, unroll, member_bytes <= _SEQUENTIAL_BYTES, loss,
                  y_members is not None)

    p_tr, frozen, opt_state = _setup(cfg, params)
    if hyperparams:
        opt_state = _with_hyperparams(opt_state, hyperparams)
    params0 = params

    if chunk_size is None:
        chunk_size = max(1, steps) if callback is None else max(1, math.ceil(steps / 20))
    chunk_size = max(1, _check_int("chunk_size", chunk_size, 1))
    bounds = sorted(set(range(0, steps, chunk_size)) | set(rec) | {steps})

    records: dict[str, list] = {}

    def do_record(p_tr, frozen):
        r = _record(cfg, with_probe, p_tr, frozen, params0, x, probe_x if with_probe else x[:1])
        for k, v in r.items():
            records.setdefault(k, []).append(v)

    loss_chunks: list[np.ndarray] = []

    def check(chunk: np.ndarray, first_step: int):
        if np.all(np.isfinite(chunk)):
            return
        bad = ~np.isfinite(chunk)
        if ensemble:
            steps_bad = np.nonzero(bad.any(axis=0))[0]
            s = int(steps_bad[0])
            member = int(np.nonzero(bad[:, s])[0][0])
            v = chunk[member, s]
            where = f" (ensemble member {member})"
        else:
            s = int(np.nonzero(bad)[0][0])
            v, where = chunk[s], ""
        raise DivergenceError(
            f"training diverged at step {first_step + s}: loss = {v}{where}; "
            "lower the learning rate (for ngd, or add damping)"
        )

    # ensemble members split into groups, one host thread each (one group: no threads);
    # a looped ensemble is one state per member instead
    groups = _member_groups(K, threads) if ensemble and not loop else [(0, 1)]
    per_y = cfg.y_per_member
    run_cfg = cfg
    if loop:
        # one single-network program per member, run in turn (or on `threads` host threads)
        run_cfg = cfg._replace(ensemble=False, key_per_member=False, y_per_member=False,
                               unroll_members="vmap")
        whole = (p_tr, opt_state, frozen, key if key_per_member else None, y if per_y else None)
        parts = [take_member(whole, k) for k in range(K)]
        states = [(p, s, fr, k if key_per_member else key, yy if per_y else y)
                  for p, s, fr, k, yy in parts]
        p_tr = opt_state = parts = whole = None
    elif len(groups) == 1:
        states = [(p_tr, opt_state, frozen, key, y)]
    else:
        # one dispatch: (params, state, frozen, per-member keys and targets) sliced per group
        parts = _split_groups((p_tr, opt_state, frozen, key if key_per_member else None,
                               y if per_y else None), tuple(groups))
        states = [(p, s, fr, k if key_per_member else key, yy if per_y else y)
                  for p, s, fr, k, yy in parts]
        p_tr = opt_state = parts = None  # the groups hold the only copy from here on

    def run_group(st, a, b):
        p, s, fr, k, yy = st
        out = _run_chunk(run_cfg, b - a, p, s, fr, k, x, yy, jnp.asarray(a, jnp.int32))
        return jax.block_until_ready(out)

    gather = stack_members if loop else _concat
    workers = min(threads, len(states))

    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if a in rec:
            do_record(gather([st[0] for st in states]), gather([st[2] for st in states]))
        if workers == 1:
            outs = [run_group(st, a, b) for st in states]
        else:
            outs = list(_pool(workers).map(lambda st, a=a, b=b: run_group(st, a, b), states))
        states = [(o[0], o[1], *st[2:]) for o, st in zip(outs, states, strict=True)]
        if loop:
            ls = np.stack([np.asarray(o[2]) for o in outs], axis=0)
        elif ensemble:
            ls = np.concatenate([np.asarray(o[2]) for o in outs], axis=0)
        else:
            ls = np.asarray(outs[0][2])
        check(ls, a)
        loss_chunks.append(ls)
        if callback is not None:
            callback(b, np.concatenate(loss_chunks, axis=-1))
    p_tr, opt_state = gather([st[:2] for st in states])
    last = np.asarray(_final_loss(cfg, p_tr, frozen, x, y))
    check(last[..., None], steps)
    loss_chunks.append(last[..., None])
    if steps in rec:
        do_record(p_tr, frozen)

    losses = jnp.asarray(np.concatenate(loss_chunks, axis=-1))
    final = _combine(cfg, p_tr, frozen)

    def stack(name):
        if name not in records:
            return None
        return jnp.stack(records[name], axis=1 if ensemble else 0)

    return TrainResult(
        params=final,
        losses=losses,
        record_steps=tuple(rec),
        probe_outputs=stack("probe_outputs"),
        probe_ntk=stack("probe_ntk"),
        distance=stack("distance"),
        flip_fraction=stack("flip_fraction"),
        max_weight_distance=stack("max_weight_distance"),
        opt_state=opt_state,
    )


def init_ensemble(build_or_spec, in_dim: int, keys: Array, dtype=None):
    """Stacked initialisations: ``(apply_fn, params)`` with a leading axis ``K = len(keys)``.

    Args:
      build_or_spec: a registered architecture spec (``MLPSpec``,
        ``TwoLayerSpec``, ...: the builder registered with that spec type is
        used), a layer composition (:mod:`ntkexp.layers`), or a builder
        ``(key) -> (apply_fn, params)``.
      in_dim: input dimension d.
      keys: ``(K,)`` PRNG keys (e.g. ``jax.random.split(jax.random.key(0), K)``).
      dtype: parameter dtype (default float32).

    Returns:
      ``(apply_fn, params)``; member k equals the single build from ``keys[k]``.
    """
    from ntkexp.layers.base import Layer
    from ntkexp.models.registry import architecture_of

    if isinstance(build_or_spec, Layer):
        from ntkexp.layers.network import Network

        net = Network(build_or_spec, (in_dim,) if isinstance(in_dim, int) else tuple(in_dim))

        def build(k):
            return net, net.init(k, dtype)
    elif callable(build_or_spec) and not hasattr(build_or_spec, "__dataclass_fields__"):
        build = build_or_spec
    else:
        arch = architecture_of(build_or_spec)
        if arch is None:
            raise TypeError(
                f"no registered architecture builds specs of type {type(build_or_spec).__name__}"
            )

        def build(k):
            return arch.build(build_or_spec, in_dim, k, dtype)

    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    k0 = keys[0]
    apply_fn, _ = build(k0)
    try:
        params = jax.vmap(lambda k: build(k)[1])(keys)
    except Exception:  # noqa: BLE001 - a builder that cannot be vmapped: build one by one
        ps = [build(keys[i])[1] for i in range(keys.shape[0])]
        params = stack_members(ps)
    return apply_fn, params
