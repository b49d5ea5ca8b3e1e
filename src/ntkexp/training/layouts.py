"""Ensemble layouts: how K stacked initialisations run the scanned steps.

One chunk of ``length`` steps is a ``lax.scan`` of :func:`~ntkexp.training.step._make_body`;
an ensemble runs it as ``"vmap"`` (batched matmuls), ``"unroll"`` (members as
separate carries of one scan), ``"sequential"`` (``lax.map`` over members) or
``"loop"`` (each member the single-network program, from the host), and on CPU
split into groups of members, each its own program on a host thread. All give
the same numbers to rounding. :func:`choose_layout` picks the layout and the
thread count, :func:`member_states` splits the state into the groups.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.members import member as take_member
from ntkexp.members import stack as stack_members
from ntkexp.training.step import _Config, _make_body

ENSEMBLE_MODES = ("auto", "vmap", "unroll", "sequential", "loop")
_SEQUENTIAL_BYTES = 1 << 20
_LOOP_MAX_ROWS = 16


# --------------------------------------------------------------------------
# The scanned training chunk, per layout
# --------------------------------------------------------------------------


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


def _auto_threads(K: int | None, steps: int, member_bytes: int = 0,
                  cores: int | None = None) -> int:
    """Default host threads: the most groups (<= cores) of equal size >= 2 that divide K.

    Equal groups share one compiled program; short runs (< 200 steps) are not
    split, since there compiling dominates and splitting cannot pay; nor are
    members over 64 MiB, whose matmuls already use every core (and splitting
    copies the parameters once more).
    """
    if K is None or steps < _THREAD_MIN_STEPS or member_bytes > _THREAD_MAX_MEMBER_BYTES:
        return 1
    cores = _host_cores() if cores is None else cores
    for g in range(min(cores, K // 2), 1, -1):
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


# --------------------------------------------------------------------------
# Choosing a layout and splitting the state into groups
# --------------------------------------------------------------------------


def choose_layout(mode: str, *, ensemble: bool, member_bytes: int, rows: int) -> str:
    """The layout ``"vmap"``, ``"unroll"``, ``"sequential"`` or ``"loop"`` for ``mode``.

    ``"auto"``: vmap, except on CPU for members over 1 MiB: ``"loop"`` under 16 rows
    a step (matrix-vector products, bound by memory traffic: one member at a time,
    each over every core), else ``"sequential"``.
    """
    if mode != "auto":
        return mode
    if ensemble and jax.default_backend() == "cpu" and member_bytes > _SEQUENTIAL_BYTES:
        return "loop" if rows < _LOOP_MAX_ROWS else "sequential"
    return "vmap"


class States(NamedTuple):
    """The per-group states ``[(p_tr, opt_state, frozen, key, y)]`` and how to run them.

    ``cfg``: the config each group runs (a looped ensemble: the single-network one);
    ``loop``: one state per member (else one per group of members).
    """

    states: list
    cfg: Any
    loop: bool

    def gather(self, trees):
        return stack_members(trees) if self.loop else _concat(trees)


def member_states(cfg: _Config, layout: str, groups, p_tr, opt_state, frozen, key, y,
                  K: int | None) -> States:
    """Split the (stacked) state into the states the host runs: one per member for
    ``"loop"``, one per group of members otherwise (one group: the state as is)."""
    per_key, per_y = cfg.key_per_member, cfg.y_per_member
    if cfg.ensemble and layout == "loop":
        run_cfg = cfg._replace(ensemble=False, key_per_member=False, y_per_member=False,
                               unroll_members="vmap")
        whole = (p_tr, opt_state, frozen, key if per_key else None, y if per_y else None)
        parts = [take_member(whole, k) for k in range(K)]
        return States([(p, s, fr, k if per_key else key, yy if per_y else y)
                       for p, s, fr, k, yy in parts], run_cfg, True)
    if len(groups) == 1:
        return States([(p_tr, opt_state, frozen, key, y)], cfg, False)
    # one dispatch: (params, state, frozen, per-member keys and targets) sliced per group
    parts = _split_groups((p_tr, opt_state, frozen, key if per_key else None,
                           y if per_y else None), tuple(groups))
    return States([(p, s, fr, k if per_key else key, yy if per_y else y)
                   for p, s, fr, k, yy in parts], cfg, False)


def run_states(st: States, run_chunk, threads: int, a: int, b: int, x) -> tuple[States, list]:
    """Steps ``a..b`` of every state (on ``threads`` host threads); the new states and
    each state's losses ``(b - a,)`` or ``(members, b - a)``."""

    def one(s):
        p, o, fr, k, yy = s
        out = run_chunk(st.cfg, b - a, p, o, fr, k, x, yy, jnp.asarray(a, jnp.int32))
        return jax.block_until_ready(out)

    workers = min(threads, len(st.states))
    outs = [one(s) for s in st.states] if workers == 1 else list(_pool(workers).map(one,
                                                                                    st.states))
    new = [(o[0], o[1], *s[2:]) for o, s in zip(outs, st.states, strict=True)]
    return st._replace(states=new), [np.asarray(o[2]) for o in outs]

