"""ntkexp: finite neural networks beside their infinite-width limits.

Public API (stable)::

    import ntkexp as nx
    spec = nx.MLPSpec(depth=3, width=512, activation="relu", W_std=1.0, b_std=0.1)
    k = nx.analytic_kernel(spec, x1)               # Kernel(nngp, ntk)
    model = nx.MLP(spec, in_dim=d, rngs=nnx.Rngs(0))
    apply_fn, params = nx.functional(model)
    K = nx.empirical_ntk(apply_fn, params, x1)     # (n1, n2)
"""

from ntkexp.activations import ACTIVATIONS, Activation, get_activation, register_activation
from ntkexp.empirical import empirical_ntk
from ntkexp.kernels import Kernel, analytic_kernel
from ntkexp.models import (
    ARCHITECTURES,
    MLP,
    MLPApply,
    MLPSpec,
    functional,
    init_params,
    register_architecture,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "MLP",
    "Activation",
    "Kernel",
    "MLPApply",
    "MLPSpec",
    "analytic_kernel",
    "empirical_ntk",
    "functional",
    "get_activation",
    "init_params",
    "register_activation",
    "register_architecture",
]
