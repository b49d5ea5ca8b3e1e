"""Architecture registry.

An architecture is registered under the name used in YAML (``model.arch``) as a
record with a ``build(spec_kwargs, in_dim, key, dtype) -> (apply_fn, params)``
builder and, optionally, an ``analytic(spec_kwargs, x1, x2) -> Kernel`` limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ntkexp.layers.base import Layer
from ntkexp.layers.network import Network, with_width
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


def architecture_of(spec) -> Architecture | None:
    """The registered architecture whose ``make_spec`` built ``spec`` (None if none)."""
    for _, arch in ARCHITECTURES.items():
        if isinstance(arch.make_spec, type) and type(spec) is arch.make_spec:
            return arch
    return None


def builder_for(spec_or_layer, in_shape: tuple, dtype=None):
    """``builder(key, width) -> (apply_fn, params)`` for a registered spec or a layer composition.

    A spec's ``width`` is replaced by the builder's width (``dataclasses.replace``);
    a composition's hidden widths are (:func:`ntkexp.layers.with_width`).

    Raises:
      TypeError: neither a registered architecture's spec nor a layer.
    """
    if isinstance(spec_or_layer, Network):
        spec_or_layer = spec_or_layer.layer
    if isinstance(spec_or_layer, Layer):
        layer = spec_or_layer

        def build_layer(key, width):
            net = Network(with_width(layer, width), tuple(in_shape))
            return net, net.init(key, dtype)

        return build_layer
    arch = architecture_of(spec_or_layer)
    if arch is None:
        raise TypeError(
            "expected a registered architecture's spec, a layer composition or a builder "
            f"(key, width) -> (apply_fn, params), got {type(spec_or_layer).__name__}")
    in_dim = in_shape[0] if len(in_shape) == 1 else tuple(in_shape)

    def build(key, width):
        return arch.build(dataclasses.replace(spec_or_layer, width=width), in_dim, key, dtype)

    return build
