"""``analytic_kernel(net_or_spec, x1, x2)``: the one public entry to infinite-width kernels.

Every network goes through its layer composition and
:func:`ntkexp.layers.composition_kernel` (the layer-by-layer map, or the fused
map the rule table of :mod:`ntkexp.layers.fused` picks for it): an
:class:`~ntkexp.models.mlp.MLPSpec` through :meth:`~ntkexp.models.mlp.MLPSpec.layers`,
a layer composition or :class:`~ntkexp.layers.Network` directly, the spec of
any other registered architecture through its registered ``analytic`` (each a
composition limit too: :mod:`ntkexp.models.cnn`, :mod:`ntkexp.models.resmlp`, ...).
"""

from __future__ import annotations

from ntkexp.kernels.analytic import check_inputs
from ntkexp.kernels.base import Kernel
from ntkexp.layers.base import Layer
from ntkexp.layers.network import Network, composition_kernel
from ntkexp.models.mlp import MLPSpec
from ntkexp.models.registry import architecture_of


def analytic_kernel(net, x1, x2=None, *, block_size: int | None = None,
                    exact_angles: bool | None = None, degree: int | None = None,
                    nodes: int | None = None) -> Kernel:
    """Infinite-width NNGP and NTK of an MLP spec, a layer composition or any registered spec.

    Args:
      net: an :class:`~ntkexp.models.mlp.MLPSpec` (NTK or standard
        parameterization, ``docs/conventions.md``; Jacot et al. 2018, Lee et al.
        2019), a :class:`~ntkexp.layers.base.Layer` / :class:`~ntkexp.layers.Network`,
        or the spec of a registered architecture with an analytic kernel.
      x1: inputs ``(n1, d)`` (an MLP; a composition takes its own input shape).
      x2: like ``x1``, or None for ``x2 = x1`` (the result is then exactly symmetric).
      block_size, exact_angles, degree, nodes: options of the fused MLP recursion
        (:func:`ntkexp.kernels.analytic.mlp_kernel`: tile size, first-layer angles
        from coordinate differences, Mehler degree and quadrature nodes); they
        apply where the ``mlp`` rule runs and are ignored elsewhere.

    Returns:
      ``Kernel(nngp=(n1, n2), ntk=(n1, n2))`` in the floating dtype of the inputs.

    Raises:
      ParameterizationError: a ``mup`` / ``mean_field`` spec (a ValueError; its
        limit is not a kernel).
      TypeError: ``net`` is none of the above (the message names MLPSpec), inputs
        that are not real arrays. ValueError: inputs of the wrong shape, empty,
        or with NaN/inf; a bad option.
    """
    opts = {k: v for k, v in dict(block_size=block_size, exact_angles=exact_angles,
                                  degree=degree, nodes=nodes).items() if v is not None}
    if isinstance(net, (Layer, Network)):
        return composition_kernel(net, x1, x2, **opts)
    if isinstance(net, MLPSpec):
        x1 = check_inputs(x1, "x1")
        if x2 is not None:
            x2 = check_inputs(x2, "x2")
            if x2.shape[1] != x1.shape[1]:
                raise ValueError(f"x1 and x2 must have the same input dimension, got "
                                 f"{x1.shape[1]} and {x2.shape[1]}")
        return composition_kernel(net.layers(), x1, x2, **opts)
    arch = architecture_of(net)
    if arch is not None and arch.analytic is not None:
        return arch.analytic(net, x1, x2)
    raise TypeError(
        "analytic_kernel needs an MLPSpec, a layer composition (ntkexp.layers) or the spec "
        f"of a registered architecture with an analytic kernel, got {type(net).__name__}")


__all__ = ["analytic_kernel"]
