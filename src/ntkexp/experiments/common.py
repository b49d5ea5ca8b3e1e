"""Pieces shared by the experiment kinds: building a unit's network, one row of
the empirical NTK, and training through ``ntkexp.training.train``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.config import ConfigError
from ntkexp.experiments.base import Unit, init_key


def build_network(cfg, unit: Unit, in_dim: int, dtype):
    """``(apply_fn, params)`` of initialisation ``unit.init`` at ``unit.width``."""
    from ntkexp.models import ARCHITECTURES

    arch = ARCHITECTURES.get(cfg.model.arch)
    return arch.build(cfg.model.spec(unit.width), in_dim, init_key(cfg, unit), dtype)


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


@functools.lru_cache(maxsize=64)
def _optimizer(name: str, learning_rate: float, options: tuple):
    """One optimizer object per setting, so that the training loop's jit cache (keyed
    on the optimizer) is reused across initialisations instead of recompiling."""
    from ntkexp.optim import OPTIMIZERS

    return OPTIMIZERS.get(name)(learning_rate=learning_rate, **dict(options))


_FROM_CONFIG = object()


def train_unit(cfg, apply_fn, params, x, y, unit: Unit, progress, *, optimizer=None,
               learning_rate=None, batch_size=_FROM_CONFIG, record_steps=(), key_salt: int = 7):
    """Train one network as ``cfg.train`` says; returns ``ntkexp.training.TrainResult``.

    Args:
      cfg, apply_fn, params, x, y, unit, progress: the unit being computed.
      optimizer: registered optimizer name overriding ``cfg.train.optimizer``
        (its ``optimizer_options`` are then not applied).
      learning_rate: overrides ``unit.learning_rate``.
      batch_size: overrides ``cfg.train.batch_size`` (None: full batch).
      record_steps: steps at which ``train`` records its diagnostics.
      key_salt: folded into the unit's key for the SGD batch order.
    """
    from ntkexp.training import train

    options = cfg.train.optimizer_options if optimizer is None else {}
    try:
        opt = _optimizer(optimizer or cfg.train.optimizer,
                         unit.learning_rate if learning_rate is None else learning_rate,
                         tuple(sorted(options.items())))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.optimizer_options: {e}") from None
    done = [0]

    def callback(step, losses):
        progress(int(step) - done[0])
        done[0] = int(step)

    res = train(apply_fn, params, x, y, optimizer=opt, steps=cfg.train.steps,
                loss_reduction=cfg.train.loss_reduction,
                batch_size=cfg.train.batch_size if batch_size is _FROM_CONFIG else batch_size,
                key=jax.random.fold_in(init_key(cfg, unit), key_salt),
                record_steps=record_steps, callback=callback)
    progress(cfg.train.steps - done[0])
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

#: Key salt of the Monte Carlo limit's initialisations (distinct from the units').
_MC_SALT = 0x4D43


def limit_method(cfg, requested: str = "auto") -> str:
    """``"analytic"`` if the architecture registers an analytic kernel (and
    ``requested`` is not ``"monte_carlo"``), else ``"monte_carlo"``.

    Raises:
      ConfigError: ``requested == "analytic"`` but the architecture has none.
    """
    from ntkexp.models import ARCHITECTURES

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
    keys independent of the units'.

    Args:
      cfg: the resolved run config.
      x1: ``(n1, d)``; x2: ``(n2, d)`` or None.

    Returns:
      ``Kernel`` with ``(n1, n2)`` arrays.
    """
    import jax

    from ntkexp.empirical import monte_carlo_kernel
    from ntkexp.models import ARCHITECTURES

    arch = ARCHITECTURES.get(cfg.model.arch)
    if method == "analytic":
        return arch.analytic(cfg.model.spec(cfg.model.widths[0]), x1, x2)
    in_dim, dtype = x1.shape[1], x1.dtype

    def builder(key, width):
        return arch.build(cfg.model.spec(width), in_dim, key, dtype)

    key = jax.random.fold_in(jax.random.key(cfg.seed), _MC_SALT)
    return monte_carlo_kernel(builder, x1, x2, key=key, n_samples=int(mc_samples),
                              width=int(mc_width), batch_size=mc_batch)


def limit_summary(cfg, method: str, mc_width: int, mc_samples: int) -> dict:
    """The ``limit`` record of a summary: how the infinite-width side was obtained."""
    if method == "analytic":
        return {"method": "analytic", "architecture": cfg.model.arch,
                "note": f"analytic infinite-width kernel of architecture {cfg.model.arch!r}"}
    from ntkexp.models import ARCHITECTURES

    why = (f"architecture {cfg.model.arch!r} registers no analytic kernel"
           if ARCHITECTURES.get(cfg.model.arch).analytic is None
           else "params.limit asks for it")
    return {"method": "monte_carlo", "architecture": cfg.model.arch,
            "width": int(mc_width), "samples": int(mc_samples),
            "note": (f"Monte Carlo estimate of the limit ({why}): the mean empirical "
                     f"kernel of {int(mc_samples)} initialisations at width "
                     f"{int(mc_width)}")}
