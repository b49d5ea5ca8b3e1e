"""Architecture registry.

An architecture is registered under the name used in YAML (``model.arch``) as a
record with a ``build(spec_kwargs, in_dim, key, dtype) -> (apply_fn, params)``
builder and, optionally, an ``analytic(spec_kwargs, x1, x2) -> Kernel`` limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ntkexp.registry import Registry


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A registered architecture.

    Attributes:
      name: registry name.
      build: ``(spec, in_dim, key, dtype) -> (apply_fn, params)``.
      make_spec: ``(**model_config) -> spec`` (a frozen, hashable record).
      analytic: ``(spec, x1, x2) -> Kernel`` or None (Monte Carlo fallback).
    """

    name: str
    make_spec: Callable[..., Any]
    build: Callable[..., Any]
    analytic: Callable[..., Any] | None = None


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def register_architecture(name: str, *, make_spec, analytic=None, overwrite: bool = False):
    """Decorator over a builder ``(spec, in_dim, key, dtype) -> (apply_fn, params)``."""

    def deco(build):
        ARCHITECTURES.register(
            name, Architecture(name, make_spec, build, analytic), overwrite=overwrite
        )
        return build

    return deco
