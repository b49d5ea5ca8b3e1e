"""Layers: each holds its finite Flax NNX computation and its infinite-width kernel map.

See :mod:`ntkexp.layers.base` for the protocol and the kernel-state shapes.
"""

from ntkexp.layers.base import KernelState, Layer, input_state, position_diagonal

__all__ = ["KernelState", "Layer", "input_state", "position_diagonal"]
