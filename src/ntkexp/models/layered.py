"""``arch: layers``: an architecture written in the config as a list of layers.

::

    model:
      arch: layers
      width: [64, 256]        # swept; fills the dense/conv entries without a width
      layers: [{dense: {}}, relu, {dense: {out: 1}}]

The list is parsed by :mod:`ntkexp.layers.registry` (one-line errors naming the
key path); the finite network, its analytic limit and its empirical NTK all
come from the composition (:mod:`ntkexp.layers.network`).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ntkexp.layers.network import Network, composition_kernel
from ntkexp.layers.registry import build_layers
from ntkexp.models.registry import register_architecture


def _freeze(v):
    if isinstance(v, Mapping):
        return types.MappingProxyType({str(k): _freeze(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _key(v):
    """A hashable form of frozen YAML data."""
    if isinstance(v, Mapping):
        return ("{}", tuple(sorted((k, _key(x)) for k, x in v.items())))
    if isinstance(v, tuple):
        return ("[]", tuple(_key(x) for x in v))
    return v


@dataclasses.dataclass(frozen=True, eq=False)
class LayersSpec:
    """A layer list and the model-level defaults of its entries.

    Attributes:
      layers: the YAML list (see :mod:`ntkexp.layers.registry`).
      width: hidden width of the entries that set none (the runner sweeps it).
      W_std, b_std, parameterization: defaults of dense/conv entries.
      input_shape: per-example shape the (flat) data are reshaped to before the
        first layer, channels last: ``[P, C]`` for 1-D signals, ``[H, W, C]``
        for images; None keeps the data's shape.
    """

    layers: Any = ()
    width: int | None = None
    W_std: float = 1.0
    b_std: float = 0.0
    parameterization: str = "ntk"
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", _freeze(self.layers))
        if self.input_shape is not None:
            shp = tuple(self.input_shape)
            if not shp or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                              for s in shp):
                raise ValueError(f"input_shape must be a list of positive integers, got "
                                 f"{self.input_shape!r}")
            object.__setattr__(self, "input_shape", shp)
        _ = self.layer  # validates every entry

    def _fields(self):
        return (_key(self.layers), self.width, self.W_std, self.b_std, self.parameterization,
                self.input_shape)

    def __eq__(self, other):
        return isinstance(other, LayersSpec) and self._fields() == other._fields()

    def __hash__(self):
        return hash(self._fields())

    @property
    def layer(self):
        """The composition ``serial(*layers)``."""
        return build_layers(self.layers, width=self.width, W_std=self.W_std, b_std=self.b_std,
                            parameterization=self.parameterization)

    @property
    def out_dim(self) -> int:
        return 1  # informational only; the network's own out_dim is authoritative

    def replace(self, **changes) -> LayersSpec:
        return dataclasses.replace(self, **changes)


def network(spec: LayersSpec, in_shape):
    """The :class:`~ntkexp.layers.Network` of ``spec`` for data of per-example ``in_shape``."""
    in_shape = tuple(in_shape) if isinstance(in_shape, (tuple, list)) else (int(in_shape),)
    return Network(spec.layer, in_shape, spec.input_shape)


def _build(spec: LayersSpec, in_dim, key, dtype=None):
    net = network(spec, in_dim)
    return net, net.init(key, dtype)


def _analytic(spec: LayersSpec, x1, x2=None):
    return composition_kernel(network(spec, jnp.shape(x1)[1:]), x1, x2)


register_architecture("layers", make_spec=LayersSpec, analytic=_analytic)(_build)
