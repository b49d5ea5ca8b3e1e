"""Pieces shared by the experiment kinds (the one shared module: no experiment
imports another).

* Networks: :func:`build_ensemble` (the stacked initialisations of a unit,
  each drawn from its ``init`` stream key), :func:`build_network` (one).
* Training: :func:`train_ensemble` trains a unit's members as one ensemble
  through ``ntkexp.training.train(ensemble=True)`` with the learning rate
  traced (:func:`traced_learning_rate`: a learning-rate sweep, or one step
  size per member, compiles once per shape) and reports progress
  (:func:`progress_callback`, the one copy of that loop).
* Kernels: :func:`ntk_row` / :func:`ntk_rows` (one row of the empirical NTK,
  per member), the infinite-width limit :func:`limit_kernel` (analytic or
  Monte Carlo) and its summary record.
* The two-layer ReLU net of Du et al. / Arora et al.: :func:`gram_two_layer`,
  :func:`h_infinity`, :func:`check_two_layer`.
* Small helpers: :func:`circle_grid`, :func:`check_common`, :func:`rms`,
  :func:`make_optimizer`, :func:`fit_exponent`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkexp.config import ConfigError
from ntkexp.data import DataError
from ntkexp.empirical import monte_carlo_kernel
from ntkexp.experiments import streams
from ntkexp.experiments.base import Member, Unit
from ntkexp.kernels.special import du_gram
from ntkexp.members import stack as stack_members
from ntkexp.models import ARCHITECTURES
from ntkexp.models.two_layer import empirical_gram
from ntkexp.optim import OPTIMIZERS
from ntkexp.training import train


def _arch(cfg):
    return ARCHITECTURES.get(cfg.model.arch)


def build_network(cfg, member: Member | int, in_dim: int, dtype, spec=None):
    """``(apply_fn, params)`` of one initialisation (a :class:`Member` or its number)."""
    init = member if isinstance(member, int) else member.init
    if spec is None:
        if isinstance(member, int):
            raise TypeError("build_network(cfg, init_number, ...) needs spec=")
        spec = cfg.model.spec(member.width)
    return _arch(cfg).build(spec, in_dim, streams.init_key(cfg, init), dtype)


def build_ensemble(cfg, unit: Unit, in_dim: int, dtype, spec=None, builder=None):
    """``(apply_fn, params)`` of ``unit.inits`` stacked on a leading axis K.

    Member k is the network built from ``streams.init_key(cfg, unit.inits[k])``:
    the same parameters as a single build from that key.

    Args:
      spec: the architecture spec (default ``cfg.model.spec(unit.width)``).
      builder: ``(key) -> (apply_fn, params)`` instead of the architecture's.
    """
    if builder is None:
        arch = _arch(cfg)
        spec = cfg.model.spec(unit.width) if spec is None else spec

        def builder(k):
            return arch.build(spec, in_dim, k, dtype)

    # one build per key, stacked: exactly the single builds, and fast (a vmapped
    # build of a Flax module traces op by op: 12 s for ten width-50 MLPs)
    built = [builder(k) for k in streams.keys(cfg.seed, "init", unit.inits)]
    params = stack_members([b[1] for b in built])
    return built[0][0], params


def per_member(fn, params, *args):
    """``fn(params_k, *args)`` for every member k (vmapped over the leading axis).

    One jitted program per ``fn`` and shapes (``fn`` must be hashable, as every
    ``apply_fn`` is): an eager ``vmap`` would compile each of its ops on its own.
    """
    return _per_member(fn, params, *args)


@functools.partial(jax.jit, static_argnums=0)
def _per_member(fn, params, *args):
    return jax.vmap(fn, in_axes=(0,) + (None,) * len(args))(params, *args)


@functools.partial(jax.jit, static_argnums=0)
def ntk_row(apply_fn, params, x0, xs):
    """Empirical NTK ``Theta(x0, x) = <df(x0)/dtheta, df(x)/dtheta>`` for one ``x0``.

    One reverse pass (the gradient at ``x0``) and one forward-mode pass (its
    directional derivative at every ``x``), so the cost is a few forward passes
    even at width 10^4, where a full Jacobian would not fit in memory
    (Jacot et al. 2018, eq. 2, scalar output).

    Args:
      apply_fn: ``(params, x (n, d)) -> (n, 1)``.
      params: parameter pytree.
      x0: ``(d,)``.
      xs: ``(n, d)``.

    Returns:
      ``(n,)`` kernel values.
    """
    g = jax.grad(lambda p: apply_fn(p, x0[None, :])[0, 0])(params)
    _, t = jax.jvp(lambda p: apply_fn(p, xs)[:, 0], (params,), (g,))
    return t


@functools.partial(jax.jit, static_argnums=0)
def ntk_rows(apply_fn, params, x0, xs):
    """:func:`ntk_row` of every member of stacked ``params``: ``(K, n)``."""
    return jax.vmap(ntk_row.__wrapped__, in_axes=(None, 0, None, None))(apply_fn, params, x0, xs)


# --------------------------------------------------------------------------
# Training an ensemble with a traced learning rate
# --------------------------------------------------------------------------

#: Registered optimizers whose update is ``learning_rate * (update at rate 1)``:
#: their rate can be traced (one compiled program per shape, per-member rates).
LINEAR_IN_LEARNING_RATE = ("gd", "sgd", "ngd")


class TracedLRState(NamedTuple):
    """State of :func:`traced_learning_rate`: the inner state and ``{"learning_rate": a}``."""

    inner: Any
    hyperparams: dict


def traced_learning_rate(inner: optax.GradientTransformation
                         ) -> optax.GradientTransformationExtraArgs:
    """``inner`` (built at learning rate 1) scaled by a learning rate held in its state.

    The rate is an array in ``state.hyperparams["learning_rate"]`` (set by
    ``train(..., hyperparams={"learning_rate": eta})``, a scalar or one per
    member), so it is traced, not baked into the compiled program. For an
    optimizer linear in its rate (``gd``, ``sgd``, ``ngd``: update
    ``-eta d``) the updates equal ``inner`` built at ``eta`` bit for bit:
    ``eta * (-d) == (-eta) * d`` in floating point.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        leaves = jax.tree_util.tree_leaves(params)
        dt = leaves[0].dtype if leaves else jnp.float32
        return TracedLRState(inner.init(params), {"learning_rate": jnp.ones((), dt)})

    def update(updates, state, params=None, **extra):
        upd, s = inner.update(updates, state.inner, params, **extra)
        lr = state.hyperparams["learning_rate"]
        upd = jax.tree_util.tree_map(lambda u: lr.astype(u.dtype) * u, upd)
        return upd, TracedLRState(s, state.hyperparams)

    return optax.GradientTransformationExtraArgs(init, update)


@functools.lru_cache(maxsize=64)
def _optimizer(name: str, learning_rate: float | None, options: tuple):
    """One optimizer object per setting (``learning_rate=None``: traced), so that the
    training loop's jit cache (keyed on the optimizer) is reused across units."""
    build = OPTIMIZERS.get(name)
    if learning_rate is None:
        return traced_learning_rate(build(learning_rate=1.0, **dict(options)))
    return build(learning_rate=learning_rate, **dict(options))


def make_optimizer(cfg, learning_rate: float | None = None, name: str | None = None,
                   options: dict | None = None):
    """The configured optimizer (``cfg.train.optimizer`` and its options unless
    ``name`` is given); ``learning_rate=None``: its rate traced (for the optimizers in
    :data:`LINEAR_IN_LEARNING_RATE`).

    Raises:
      ConfigError: bad ``train.optimizer_options``.
    """
    if options is None:
        options = cfg.train.optimizer_options if name is None else {}
    try:
        return _optimizer(name or cfg.train.optimizer, learning_rate,
                          tuple(sorted(options.items())))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.optimizer_options: {e}") from None


def progress_callback(progress, members: int = 1):
    """``(callback(step, losses), finish())`` for ``train``: advances ``progress`` by
    ``members`` per step (all of an ensemble's members take each step)."""
    done = [0]

    def callback(step, losses):
        progress(members * (int(step) - done[0]))
        done[0] = int(step)

    def finish(steps: int):
        progress(members * (steps - done[0]))
        done[0] = steps

    return callback, finish


_FROM_CONFIG = object()


def train_ensemble(cfg, apply_fn, params, x, y, unit: Unit, progress, *, optimizer=None,
                   learning_rate=None, batch_size=_FROM_CONFIG, record_steps=(), run: int = 0,
                   targets_per_member: bool = False, probe_x=None, options=None):
    """Train the members of ``unit`` (stacked ``params``) as ``cfg.train`` says.

    Args:
      cfg, apply_fn, params, x, y, unit, progress: the unit being computed;
        ``params`` has a leading axis ``len(unit.inits)``.
      optimizer: registered optimizer name overriding ``cfg.train.optimizer``
        (its ``optimizer_options`` are then not applied unless ``options``).
      learning_rate: overrides ``unit.learning_rate``: a number, or ``(K,)``
        values, one per member.
      batch_size: overrides ``cfg.train.batch_size`` (None: full batch).
      record_steps: steps at which ``train`` records its diagnostics.
      run: index of this training run within the unit (its mini-batch stream).
      targets_per_member: ``y`` is ``(K, n[, out])``, one target set per member.
      probe_x: passed to ``train``.

    Returns:
      ``ntkexp.training.TrainResult`` with a leading member axis.
    """
    name = optimizer or cfg.train.optimizer
    K = len(unit.inits)
    lr = unit.learning_rate if learning_rate is None else learning_rate
    lr = np.broadcast_to(np.asarray(lr, np.float64), (K,))
    if options is None:
        options = cfg.train.optimizer_options if optimizer is None else {}
    bs = cfg.train.batch_size if batch_size is _FROM_CONFIG else batch_size
    keys = streams.keys(cfg.seed, "minibatch", unit.inits, run)
    callback, finish = progress_callback(progress, K)
    common = dict(steps=cfg.train.steps, loss_reduction=cfg.train.loss_reduction,
                  batch_size=bs, record_steps=record_steps, probe_x=probe_x,
                  lazy_alpha=cfg.train.lazy_alpha)
    if name in LINEAR_IN_LEARNING_RATE:
        opt = make_optimizer(cfg, None, name, options)
        res = train(apply_fn, params, x, y, optimizer=opt, key=keys, ensemble=True,
                    targets_per_member=targets_per_member, callback=callback,
                    hyperparams={"learning_rate": jnp.asarray(lr)}, **common)
    elif np.all(lr == lr[0]):  # a rate baked into an optimizer we cannot trace
        opt = make_optimizer(cfg, float(lr[0]), name, options)
        res = train(apply_fn, params, x, y, optimizer=opt, key=keys, ensemble=True,
                    targets_per_member=targets_per_member, callback=callback, **common)
    else:  # one rate per member, baked: member by member
        parts = []
        for i in range(K):
            one = jax.tree_util.tree_map(lambda a, i=i: a[i:i + 1], params)
            yi = y[i:i + 1] if targets_per_member else y
            opt = make_optimizer(cfg, float(lr[i]), name, options)
            parts.append(train(apply_fn, one, x, yi, optimizer=opt, key=keys[i:i + 1],
                               ensemble=True, targets_per_member=targets_per_member,
                               **common))

        def cat(*a):
            return None if a[0] is None else jax.tree_util.tree_map(
                lambda *b: jnp.concatenate(b), *a)

        res = parts[0]._replace(**{
            f: cat(*[getattr(r, f) for r in parts])
            for f in ("params", "losses", "probe_outputs", "probe_ntk", "distance",
                      "flip_fraction", "max_weight_distance", "opt_state")})
    finish(cfg.train.steps)
    return res


def circle_grid(n: int, dtype):
    """``gammas (n,)`` evenly spaced on ``[-pi, pi]`` and ``x = (cos g, sin g)``: ``(n, 2)``."""
    g = jnp.linspace(-jnp.pi, jnp.pi, n, dtype=dtype)
    return g, jnp.stack([jnp.cos(g), jnp.sin(g)], axis=1)


def check_common(cfg, name: str) -> None:
    """Settings every Jacot experiment needs: one learning rate, scalar output, 2-d inputs."""
    if len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"train.learning_rate: {name} sweeps widths and inits only; give "
                          "one learning rate")
    if cfg.model.out_dim != 1:
        raise ConfigError(f"model.out_dim: {name} needs a scalar output (1), got "
                          f"{cfg.model.out_dim}")
    if cfg.data.dim != 2:
        raise ConfigError(f"data.dim: {name} evaluates on the unit circle, so inputs must be "
                          f"2-d, got {cfg.data.dim}")


def rms(a, axis=None) -> float | np.ndarray:
    return np.sqrt(np.mean(np.square(np.asarray(a, np.float64)), axis=axis))


# --------------------------------------------------------------------------
# The infinite-width limit: analytic where registered, else Monte Carlo
# --------------------------------------------------------------------------

def limit_method(cfg, requested: str = "auto") -> str:
    """``"analytic"`` if the architecture registers an analytic kernel (and
    ``requested`` is not ``"monte_carlo"``), else ``"monte_carlo"``.

    Raises:
      ConfigError: ``requested == "analytic"`` but the architecture has none.
    """
    arch = ARCHITECTURES.get(cfg.model.arch)
    if requested == "monte_carlo":
        return "monte_carlo"
    if arch.analytic is None:
        if requested == "analytic":
            raise ConfigError(f"params.limit: architecture {arch.name!r} registers no "
                              "analytic kernel; use limit: auto or monte_carlo")
        return "monte_carlo"
    return "analytic"


def limit_kernel(cfg, x1, x2=None, *, method: str, mc_width: int, mc_samples: int,
                 mc_batch: int | None = None):
    """The infinite-width ``Kernel(nngp, ntk)`` of ``cfg.model``, per output.

    ``method="analytic"``: the architecture's registered closed form (e.g. the
    NTK recursion of Jacot et al. 2018, Thm. 1 for ``mlp``). ``"monte_carlo"``:
    ``ntkexp.empirical.monte_carlo_kernel``, the mean empirical kernel of
    ``mc_samples`` initialisations at width ``mc_width`` (its error falls like
    ``1/sqrt(mc_samples * mc_width)`` plus an ``O(1/mc_width)`` bias), drawn from
    the ``monte_carlo`` stream, independent of the units' ``init`` stream.

    Args:
      cfg: the resolved run config.
      x1: ``(n1, d)``; x2: ``(n2, d)`` or None.

    Returns:
      ``Kernel`` with ``(n1, n2)`` arrays.
    """

    arch = ARCHITECTURES.get(cfg.model.arch)
    if method == "analytic":
        return arch.analytic(cfg.model.spec(cfg.model.widths[0]), x1, x2)
    in_dim, dtype = x1.shape[1], x1.dtype

    def builder(key, width):
        return arch.build(cfg.model.spec(width), in_dim, key, dtype)

    key = streams.monte_carlo_key(cfg)
    return monte_carlo_kernel(builder, x1, x2, key=key, n_samples=int(mc_samples),
                              width=int(mc_width), batch_size=mc_batch)


def limit_summary(cfg, method: str, mc_width: int, mc_samples: int) -> dict:
    """The ``limit`` record of a summary: how the infinite-width side was obtained."""
    if method == "analytic":
        return {"method": "analytic", "architecture": cfg.model.arch,
                "note": f"analytic infinite-width kernel of architecture {cfg.model.arch!r}"}

    why = (f"architecture {cfg.model.arch!r} registers no analytic kernel"
           if ARCHITECTURES.get(cfg.model.arch).analytic is None
           else "params.limit asks for it")
    return {"method": "monte_carlo", "architecture": cfg.model.arch,
            "width": int(mc_width), "samples": int(mc_samples),
            "note": (f"Monte Carlo estimate of the limit ({why}): the mean empirical "
                     f"kernel of {int(mc_samples)} initialisations at width "
                     f"{int(mc_width)}")}


# --------------------------------------------------------------------------
# Du et al. (2019) / Arora et al. (2019): the two-layer ReLU net
# --------------------------------------------------------------------------


@jax.jit
def gram_two_layer(W, x):
    """Finite-width Gram matrix ``H(W) (n, n)`` of the two-layer net: the one copy in
    :func:`ntkexp.models.two_layer.empirical_gram` (Du et al. 2019, eq. 3.2)."""
    return empirical_gram(W, x)


def h_infinity(x):
    """``H^inf (n, n)`` of Du et al. (2019, eq. 3.1) / Arora et al. (2019, eq. 4): the
    one copy in :func:`ntkexp.kernels.special.du_gram`."""
    return du_gram(x)


def check_two_layer(cfg, name: str) -> None:
    """Settings the two-layer experiments need (Du et al. 2019's model and data)."""
    if cfg.model.arch != "two_layer_relu":
        raise ConfigError(f"model.arch: {name} trains Du et al.'s two-layer net; set "
                          f"two_layer_relu, got {cfg.model.arch!r}")
    if cfg.model.out_dim != 1:
        raise ConfigError(f"model.out_dim: {name} needs a scalar output (1), got "
                          f"{cfg.model.out_dim}")


def fit_exponent(widths, values) -> float:
    """Least-squares slope of ``log(values)`` against ``log(widths)`` (a power law's exponent)."""
    w = np.asarray(widths, np.float64)
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v) & (v > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(w[ok]), np.log(v[ok]), 1)[0])


# --------------------------------------------------------------------------
# Classification tasks (Lee et al. 2020; MNIST-1D)
# --------------------------------------------------------------------------


def class_targets(y_train, y_test, name: str = "this experiment"):
    """``(targets_train (n, k), targets_test (m, k), labels_train (n,), labels_test (m,))``.

    Several columns: used as given, labels by argmax. One column of integers:
    class ids ``0..k-1`` encoded as ``e_c - 1/k``.

    Raises:
      DataError: one column of non-integer values, or a single class.
    """
    ytr, yte = np.asarray(y_train, np.float64), np.asarray(y_test, np.float64)
    if ytr.shape[1] >= 2:
        return ytr, yte, np.argmax(ytr, 1), np.argmax(yte, 1) if len(yte) else np.zeros(0, int)
    both = np.concatenate([ytr[:, 0], yte[:, 0]])
    if not np.all(both == np.round(both)) or both.min() < 0:
        raise DataError(f"{name} classifies: a single target column must hold class ids "
                        "0, 1, 2, ... (integers)")
    k = int(both.max()) + 1
    if k < 2:
        raise DataError(f"{name} needs at least two classes in the targets")

    def enc(v):
        ids = v[:, 0].astype(np.int64)
        t = np.full((len(ids), k), -1.0 / k)
        t[np.arange(len(ids)), ids] += 1.0
        return t, ids

    (ttr, ltr), (tte, lte) = enc(ytr), enc(yte)
    return ttr, tte, ltr, lte


def preprocess(x_train, x_test, mode: str):
    """Apply ``params.preprocess`` (statistics from the training inputs only)."""
    xtr, xte = jnp.asarray(x_train), jnp.asarray(x_test)
    if mode == "none":
        return xtr, xte
    mu = jnp.mean(xtr, axis=0, keepdims=True)
    xtr, xte = xtr - mu, xte - mu
    if mode == "center":
        return xtr, xte
    d = xtr.shape[1]

    def scale(x):
        nrm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
        return x * jnp.sqrt(jnp.asarray(d, x.dtype)) / jnp.where(nrm > 0, nrm, 1.0)

    return scale(xtr), scale(xte)


class Task:
    """A classification task from ``data``: preprocessed inputs, one-hot-style
    targets and integer labels (train and test). ``name`` names the experiment
    in errors."""

    def __init__(self, cfg, data, name: str):
        if data.x_test.shape[0] == 0:
            raise DataError(f"{name} measures test accuracy: set data.n_test > 0 (or give "
                            "x_test in the .npz)")
        dt = data.x_train.dtype
        self.x, self.x_test = preprocess(data.x_train, data.x_test, cfg.params.preprocess)
        ttr, tte, self.labels, self.labels_test = class_targets(data.y_train, data.y_test, name)
        self.y, self.y_test = jnp.asarray(ttr, dt), jnp.asarray(tte, dt)
        self.k = self.y.shape[1]
        self.dtype = dt


@functools.partial(jax.jit, static_argnums=(0, 4))
def ntk_lambda_max(apply_fn, params, x, key, iters: int):
    """Largest eigenvalue of the empirical NTK ``J J^T`` on ``x`` by power iteration.

    ``J`` is the Jacobian of the flattened outputs ``(n k,)`` in the parameters;
    ``J J^T v`` costs one vjp and one jvp, so no ``(n k)^2`` matrix is formed.

    Returns:
      a scalar, the Rayleigh quotient after ``iters`` iterations (a lower bound
      of ``lambda_max`` that converges geometrically).
    """
    out, vjp = jax.vjp(lambda p: apply_fn(p, x), params)

    def mv(v):
        (g,) = vjp(v)
        return jax.jvp(lambda p: apply_fn(p, x), (params,), (g,))[1]

    v0 = jax.random.normal(key, out.shape, out.dtype)

    def body(_, v):
        w = mv(v)
        return w / jnp.linalg.norm(w)

    v = jax.lax.fori_loop(0, iters, body, v0 / jnp.linalg.norm(v0))
    return jnp.sum(v * mv(v))


def variants(cfg) -> list[tuple[str, bool]]:
    """``[(parameterization, centred)]`` in the order stored in the results."""
    return [(p, c) for p in cfg.params.parameterizations for c in cfg.params.centering]


def variant_name(p: str, c: bool) -> str:
    return f"{p}{'+C' if c else ''}"
