"""Architectures: Flax NNX modules and the architecture registry.

Built in (names used as ``model.arch`` in a config): ``mlp``
(:mod:`ntkexp.models.mlp`), ``two_layer_relu`` (:mod:`ntkexp.models.two_layer`),
``cnn`` (:mod:`ntkexp.models.cnn`), ``resmlp`` (:mod:`ntkexp.models.resmlp`) and
``layers`` (:mod:`ntkexp.models.layered`: a layer list written in the config),
``diagonal`` (:mod:`ntkexp.models.diagonal`, Woodworth et al. 2020),
each with its analytic infinite-width kernel. A plugin registers more with
:func:`register_architecture` (see ``docs/extending.md``).
"""

from ntkexp.layers.network import composition_kernel
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
    # the composition's limit; the "mlp" rule of ntkexp.layers.fused runs the MLP recursion
    return composition_kernel(spec.layers(), x1, x2)


register_architecture("mlp", make_spec=MLPSpec, analytic=_mlp_analytic)(_build_mlp)


# The other built-in architectures register themselves on import (after "mlp", so that
# the registry lists "mlp" first).
from ntkexp.models import cnn, diagonal, layered, resmlp, two_layer  # noqa: E402, F401, I001  (registration)
