"""Architectures: Flax NNX modules and the architecture registry."""

from ntkexp.models.mlp import MLP, MLPApply, MLPSpec, functional, init_params
from ntkexp.models.registry import ARCHITECTURES, register_architecture

__all__ = [
    "ARCHITECTURES",
    "MLP",
    "MLPApply",
    "MLPSpec",
    "functional",
    "init_params",
    "register_architecture",
]


def _build_mlp(spec: MLPSpec, in_dim: int, key, dtype=None):
    return MLPApply(spec), init_params(spec, in_dim, key, dtype)


def _mlp_analytic(spec: MLPSpec, x1, x2=None):
    from ntkexp.kernels import analytic_kernel

    return analytic_kernel(spec, x1, x2)


register_architecture("mlp", make_spec=MLPSpec, analytic=_mlp_analytic)(_build_mlp)
