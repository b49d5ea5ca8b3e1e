"""Training: jit-compiled, ``lax.scan`` over steps, ``vmap`` over initialisations.

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

In parts, each with one job: :mod:`~ntkexp.training.step` (loss, gradient,
optimizer update), :mod:`~ntkexp.training.layouts` (the ensemble layouts and
host threads), :mod:`~ntkexp.training.loop` (chunks, divergence checks,
callbacks, recording), :mod:`~ntkexp.training.inputs` (argument checks);
:func:`train` assembles them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntkexp.models  # noqa: F401  (registers the built-in architectures)
from ntkexp import lazy as lazy_scale
from ntkexp.layers.base import Layer
from ntkexp.layers.network import Network
from ntkexp.members import stack as stack_members
from ntkexp.models.registry import architecture_of
from ntkexp.training.inputs import _check_int, prepare
from ntkexp.training.layouts import (
    _SEQUENTIAL_BYTES,
    ENSEMBLE_MODES,
    _host_cores,
    _member_groups,
    _run_chunk,
    _run_chunk_cpu_small,  # noqa: F401  (tests read its compile cache)
    choose_layout,
    member_states,
)
from ntkexp.training.layouts import _auto_threads as _layout_threads
from ntkexp.training.loop import Recorder, finish, run_loop
from ntkexp.training.result import DivergenceError, TrainResult
from ntkexp.training.step import (
    LOSS_REDUCTIONS,
    LOSSES,
    _Config,
    _make_partition,
    _setup,
    _with_hyperparams,
)

Array = jax.Array


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
    lazy_alpha: float | None = None,
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
      lazy_alpha: train the lazy-scaled model ``alpha (f(w) - f(w0))`` on the loss
        divided by ``alpha^2`` (Chizat, Oyallon & Bach 2019; :mod:`ntkexp.lazy`);
        the losses, records and optimizer then see that model, and
        ``TrainResult.params`` are the trained ``w``. None: the plain model.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError / TypeError: bad arguments (one readable sentence).
      DivergenceError: the loss became NaN or infinite (names step and value).
    """
    if lazy_alpha is not None:  # h = alpha (f(w) - f(w0)) on L / alpha^2: ntkexp.lazy
        apply_fn, params, trainable, optimizer = lazy_scale.wrap(
            apply_fn, params, lazy_alpha, optimizer=optimizer, trainable=trainable)
    d = prepare(apply_fn, params, x, y, optimizer=optimizer, steps=steps,
                loss_reduction=loss_reduction, loss=loss, batch_size=batch_size, key=key,
                ensemble=ensemble, record_steps=record_steps, probe_x=probe_x,
                replace=replace, ensemble_mode=ensemble_mode,
                targets_per_member=targets_per_member)
    layout = choose_layout(ensemble_mode, ensemble=ensemble, member_bytes=d.member_bytes,
                           rows=d.n if d.batch_size is None else d.batch_size)
    loop = bool(ensemble) and layout == "loop"
    if threads is None:
        # a looped member's matmuls already use every core (intra-op threads)
        cpu_ensemble = ensemble and jax.default_backend() == "cpu"
        threads = _auto_threads(d.K, d.steps, d.member_bytes) if cpu_ensemble and not loop else 1
    threads = _check_int("threads", threads, 1)
    cfg = _Config(apply_fn, optax.with_extra_args_support(optimizer),
                  _make_partition(apply_fn, d.one_params, trainable), loss_reduction,
                  d.batch_size, bool(replace), bool(ensemble), d.key_per_member, layout,
                  d.member_bytes <= _SEQUENTIAL_BYTES, loss, d.y_per_member)
    p_tr, frozen, opt_state = _setup(cfg, params)
    if hyperparams:
        opt_state = _with_hyperparams(opt_state, hyperparams)
    if chunk_size is None:
        chunk_size = max(1, d.steps) if callback is None else max(1, math.ceil(d.steps / 20))
    chunk_size = max(1, _check_int("chunk_size", chunk_size, 1))
    bounds = sorted(set(range(0, d.steps, chunk_size)) | set(d.rec) | {d.steps})
    recorder = Recorder(cfg, params, d.x, d.probe_x)
    # ensemble members split into groups, one host thread each (one group: no threads)
    groups = _member_groups(d.K, threads) if ensemble and not loop else [(0, 1)]
    states = member_states(cfg, layout, groups, p_tr, opt_state, frozen, d.key, d.y, d.K)
    del p_tr, opt_state  # the states hold the only copy from here on
    p_tr, opt_state, losses = run_loop(cfg, states, run_chunk=_run_chunk, threads=threads,
                                       bounds=bounds, rec=d.rec, x=d.x, recorder=recorder,
                                       callback=callback)
    res = finish(cfg, p_tr, opt_state, frozen, losses, steps=d.steps, rec=d.rec, x=d.x, y=d.y,
                 recorder=recorder)
    return res if lazy_alpha is None else res._replace(params=lazy_scale.unwrap(res.params))


def _auto_threads(K: int | None, steps: int, member_bytes: int = 0) -> int:
    """:func:`ntkexp.training.layouts._auto_threads` on this process's cores."""
    return _layout_threads(K, steps, member_bytes, cores=_host_cores())


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
    if isinstance(build_or_spec, Layer):
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


__all__ = ["ENSEMBLE_MODES", "LOSSES", "LOSS_REDUCTIONS", "DivergenceError", "TrainResult",
           "init_ensemble", "train"]
