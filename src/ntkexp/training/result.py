"""What :func:`ntkexp.training.train` returns (:class:`TrainResult`) or raises (divergence)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

Array = jax.Array


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
