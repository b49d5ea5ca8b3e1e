"""Layers: each holds its finite Flax NNX computation and its infinite-width kernel map.

A network is a composition of layers (see :mod:`ntkexp.layers.base` for the
protocol and the kernel-state shapes)::

    import ntkexp as nx
    from ntkexp import layers as L

    net = L.serial(L.Dense(512), L.Activation("tanh"), L.Dense(1, readout=True))
    k = nx.analytic_kernel(net, x1, x2)          # Kernel(nngp, ntk)
    apply_fn, params = L.init_network(net, x1.shape[1:], key)
    theta = nx.empirical_ntk(apply_fn, params, x1, x2)

In a config: ``model: {arch: layers, layers: [{dense: {width: 64}}, relu, {dense: {out: 1}}]}``
(:mod:`ntkexp.layers.registry`).
"""

import importlib.util as _ilu

from ntkexp.layers.activation import Activation, activation_layer
from ntkexp.layers.base import KernelState, Layer, input_state, position_diagonal
from ntkexp.layers.combinators import Frozen, Parallel, Serial, frozen, parallel, residual, serial
from ntkexp.layers.dense import Dense
from ntkexp.layers.network import (
    Network,
    composition_kernel,
    init_network,
    with_width,
)
from ntkexp.layers.registry import (
    LAYERS,
    LayerSpecError,
    build_layers,
    parse_layer,
    parse_layers,
    register_layer,
)
from ntkexp.layers.reshape import Flatten

# Optional layer modules register their kinds on import.
for _name in ("norm", "attention", "conv", "pool"):
    if _ilu.find_spec(f"ntkexp.layers.{_name}") is not None:
        __import__(f"ntkexp.layers.{_name}")

__all__ = [
    "LAYERS",
    "Activation",
    "Dense",
    "Flatten",
    "Frozen",
    "KernelState",
    "Layer",
    "LayerSpecError",
    "Network",
    "Parallel",
    "Serial",
    "activation_layer",
    "build_layers",
    "composition_kernel",
    "frozen",
    "init_network",
    "input_state",
    "parallel",
    "parse_layer",
    "parse_layers",
    "position_diagonal",
    "register_layer",
    "residual",
    "serial",
    "with_width",
]
