"""Field checks shared by the frozen architecture specs (one readable error each)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ntkexp.activations import Activation, get_activation


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


class SpecActivationMixin:
    """``act`` and ``has_bias`` for frozen specs with ``activation``,
    ``activation_params`` and ``b_std`` fields."""

    @property
    def act(self) -> Activation:
        """The :class:`Activation` object for this spec."""
        return get_activation(self.activation, dict(self.activation_params))

    @property
    def has_bias(self) -> bool:
        return self.b_std > 0
