"""Pieces shared by the experiment kinds: building a unit's network, one row of
the empirical NTK, and training through ``ntkexp.training.train``."""

from __future__ import annotations

import functools
import inspect

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


def train_unit(cfg, apply_fn, params, x, y, unit: Unit, progress):
    """Train one network as ``cfg.train`` says; returns ``ntkexp.training.TrainResult``."""
    from ntkexp.training import train

    try:
        opt = _optimizer(cfg.train.optimizer, unit.learning_rate,
                         tuple(sorted(cfg.train.optimizer_options.items())))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.optimizer_options: {e}") from None
    done = [0]

    def callback(step, losses):
        progress(int(step) - done[0])
        done[0] = int(step)

    kw = {}
    if "callback" in inspect.signature(train).parameters:
        kw["callback"] = callback
    res = train(apply_fn, params, x, y, optimizer=opt, steps=cfg.train.steps,
                loss_reduction=cfg.train.loss_reduction, batch_size=cfg.train.batch_size,
                key=jax.random.fold_in(init_key(cfg, unit), 7), **kw)
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
