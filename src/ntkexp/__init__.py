"""ntkexp: finite neural networks beside their infinite-width limits.

Public API (stable)::

    import ntkexp as nx
    spec = nx.MLPSpec(depth=3, width=512, activation="relu", W_std=1.0, b_std=0.1)
    k = nx.analytic_kernel(spec, x1)               # Kernel(nngp, ntk)
    model = nx.MLP(spec, in_dim=d, rngs=nnx.Rngs(0))
    apply_fn, params = nx.functional(model)
    K = nx.empirical_ntk(apply_fn, params, x1)     # (n1, n2)
    res = nx.train(apply_fn, params, x, y, optimizer=nx.optim.gd(1.0), steps=200)

Any architecture as a composition of layers (each with its finite Flax
computation and its exact infinite-width map; :mod:`ntkexp.layers`)::

    net = nx.layers.serial(nx.layers.Dense(512), nx.layers.Activation("tanh"),
                           nx.layers.Dense(1, readout=True))
    k = nx.analytic_kernel(net, x1)
    apply_fn, params = nx.layers.init_network(net, x1.shape[1:], key)

Config-driven runs (``nx.load_config``, ``nx.run``) and the experiment, dataset
and plotting layers are imported lazily, so ``import ntkexp`` stays light.
"""

from ntkexp import layers, optim, theory
from ntkexp.activations import ACTIVATIONS, Activation, get_activation, register_activation
from ntkexp.empirical import empirical_nngp, empirical_ntk, monte_carlo_kernel
from ntkexp.kernels import (
    Kernel,
    arora_ntk,
    c_sigma,
    du_gram,
    fit_decay_exponent,
    lipschitz_constant_prop9,
    mercer_eigenvalues,
    two_layer_relu_ntk_sphere,
)
from ntkexp.kernels.tiling import TilingError, tiled_kernel
from ntkexp.layers import register_layer
from ntkexp.models import (
    ARCHITECTURES,
    MLP,
    MLPApply,
    MLPSpec,
    functional,
    init_params,
    register_architecture,
)
from ntkexp.models.analytic import analytic_kernel
from ntkexp.models.cnn import CNN, CNNApply, CNNSpec, cnn_kernel
from ntkexp.models.resmlp import ResMLP, ResMLPApply, ResMLPSpec, resmlp_kernel
from ntkexp.models.two_layer import TwoLayerApply, TwoLayerSpec
from ntkexp.optim import OPTIMIZERS, gd, ngd, sgd
from ntkexp.sharding import maybe_init_distributed, shard_ensemble, sharded_kernel, sharded_vmap
from ntkexp.theory import (
    SingularKernelError,
    gd_loss_curve,
    generalization_bound,
    gradient_flow,
    kernel_drift,
    kernel_regression,
    lambda_min,
    linearize,
    max_weight_distance,
    ntk_gp,
    ntk_predict,
    pattern_flip_fraction,
)
from ntkexp.tiles import analytic_tiles, empirical_tiles
from ntkexp.training import DivergenceError, TrainResult, init_ensemble, train

__version__ = "0.1.0"

_LAZY = {
    "load_config": ("ntkexp.config", "load"),
    "run": ("ntkexp.experiments", "run"),
    "EXPERIMENTS": ("ntkexp.experiments", "EXPERIMENTS"),
    "register_experiment": ("ntkexp.experiments", "register_experiment"),
    "DATASETS": ("ntkexp.data", "DATASETS"),
    "register_dataset": ("ntkexp.data", "register_dataset"),
    "load_dataset": ("ntkexp.data", "load_dataset"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'ntkexp' has no attribute {name!r}")


__all__ = [
    "layers",
    "register_layer",
    "ACTIVATIONS",
    "ARCHITECTURES",
    "CNN",
    "CNNApply",
    "CNNSpec",
    "MLP",
    "ResMLP",
    "ResMLPApply",
    "ResMLPSpec",
    "TwoLayerApply",
    "TwoLayerSpec",
    "cnn_kernel",
    "SingularKernelError",
    "TilingError",
    "analytic_tiles",
    "empirical_tiles",
    "tiled_kernel",
    "gd_loss_curve",
    "maybe_init_distributed",
    "ntk_predict",
    "resmlp_kernel",
    "shard_ensemble",
    "sharded_kernel",
    "sharded_vmap",
    "OPTIMIZERS",
    "Activation",
    "DivergenceError",
    "Kernel",
    "MLPApply",
    "MLPSpec",
    "TrainResult",
    "analytic_kernel",
    "arora_ntk",
    "c_sigma",
    "du_gram",
    "empirical_nngp",
    "empirical_ntk",
    "fit_decay_exponent",
    "functional",
    "gd",
    "generalization_bound",
    "get_activation",
    "gradient_flow",
    "init_ensemble",
    "init_params",
    "kernel_drift",
    "kernel_regression",
    "lambda_min",
    "linearize",
    "lipschitz_constant_prop9",
    "max_weight_distance",
    "mercer_eigenvalues",
    "monte_carlo_kernel",
    "ngd",
    "ntk_gp",
    "optim",
    "pattern_flip_fraction",
    "register_activation",
    "register_architecture",
    "sgd",
    "theory",
    "train",
    "two_layer_relu_ntk_sphere",
    *_LAZY,
]
