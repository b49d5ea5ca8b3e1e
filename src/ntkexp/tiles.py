"""Tile functions for :func:`ntkexp.kernels.tiling.tiled_kernel`, each with a stable fingerprint.

:func:`analytic_tiles` (the registered analytic limit of an architecture, or a
layer composition's), :func:`empirical_tiles` (the empirical NTK of an
``apply_fn``) and :class:`MonteCarloTiles` (a Monte Carlo average over
initialisations). They sit above :mod:`ntkexp.models` and :mod:`ntkexp.empirical`,
which they name; :mod:`ntkexp.kernels.tiling` tiles any function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ntkexp.empirical import empirical_ntk, monte_carlo_kernel
from ntkexp.models import ARCHITECTURES


@dataclasses.dataclass(frozen=True)
class AnalyticTiles:
    """``(a, b) -> Kernel``: the registered analytic limit of architecture ``arch``.

    Goes through ``ntkexp.models.ARCHITECTURES[arch].analytic``, so any
    architecture (or layer composition) that registers an analytic kernel is
    tiled without code of its own.
    """

    arch: str
    spec: Any

    def __call__(self, a, b):
        return ARCHITECTURES.get(self.arch).analytic(self.spec, a, b)

    @property
    def fingerprint(self) -> str:
        return f"analytic:{self.arch}:{self.spec!r}"


def analytic_tiles(spec, arch: str | None = None) -> AnalyticTiles:
    """The analytic tile function of ``spec``; ``arch`` defaults to the registered
    architecture whose ``make_spec`` is ``type(spec)``.

    Raises:
      ValueError: no (or several) architectures with this spec type, or one without
        an analytic kernel.
    """
    if arch is None:
        names = [n for n, a in ARCHITECTURES.items() if a.make_spec is type(spec)]
        if len(names) != 1:
            raise ValueError(f"cannot tell the architecture of a {type(spec).__name__} "
                             f"(candidates: {names or 'none'}); pass arch=")
        arch = names[0]
    if ARCHITECTURES.get(arch).analytic is None:
        raise ValueError(f"architecture {arch!r} has no analytic kernel")
    return AnalyticTiles(arch, spec)


@dataclasses.dataclass(frozen=True)
class EmpiricalTiles:
    """``(a, b, params) -> (t1, t2)`` empirical NTK (pass ``args=(params,)``)."""

    apply_fn: Callable
    method: str = "auto"

    def __call__(self, a, b, params):
        return empirical_ntk(self.apply_fn, params, a, b, method=self.method)

    @property
    def fingerprint(self) -> str:
        return f"empirical:{self.method}:{self.apply_fn!r}"


def empirical_tiles(apply_fn, method: str = "auto") -> EmpiricalTiles:
    """The empirical-NTK tile function of ``apply_fn``; call with ``args=(params,)``."""
    return EmpiricalTiles(apply_fn, method)


@dataclasses.dataclass(frozen=True)
class MonteCarloTiles:
    """``(a, b, key) -> Kernel``: :func:`ntkexp.empirical.monte_carlo_kernel` with the
    same key for every tile (so every tile averages the same initialisations)."""

    spec: Any
    n_samples: int
    width: int
    method: str = "auto"

    def __call__(self, a, b, key):
        return monte_carlo_kernel(self.spec, a, b, key=key, n_samples=self.n_samples,
                                  width=self.width, method=self.method)

    @property
    def fingerprint(self) -> str:
        return f"monte_carlo:{self.spec!r}:{self.n_samples}:{self.width}:{self.method}"


__all__ = ["AnalyticTiles", "EmpiricalTiles", "MonteCarloTiles", "analytic_tiles",
           "empirical_tiles"]
