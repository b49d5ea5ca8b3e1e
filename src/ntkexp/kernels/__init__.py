"""Infinite-width kernels as pure maths over arrays: dual maps, the MLP recursion, the
conv-stack map, quadrature, special cases, spectra, tiling.

This package imports no layer, model, experiment, config or CLI module; the public
``analytic_kernel(net_or_spec, ...)`` is :func:`ntkexp.models.analytic.analytic_kernel`
(``nx.analytic_kernel``)."""

from ntkexp.kernels.analytic import (
    MLPKernelSpec,
    diag_variances,
    dual_method,
    mlp_kernel,
    nngp_diagonal,
)
from ntkexp.kernels.base import Kernel
from ntkexp.kernels.quadrature import NumericalDual, hermite_coefficients, numerical_dual
from ntkexp.kernels.special import (
    arora_ntk,
    c_sigma,
    du_gram,
    two_layer_relu_kernel,
    two_layer_relu_ntk_sphere,
)
from ntkexp.kernels.spectra import (
    fit_decay_exponent,
    gauss_jacobi,
    lipschitz_constant_prop9,
    mercer_eigenvalues,
    smoothness_gammas,
)

__all__ = [
    "Kernel",
    "MLPKernelSpec",
    "NumericalDual",
    "arora_ntk",
    "c_sigma",
    "diag_variances",
    "du_gram",
    "dual_method",
    "fit_decay_exponent",
    "gauss_jacobi",
    "hermite_coefficients",
    "lipschitz_constant_prop9",
    "mlp_kernel",
    "mercer_eigenvalues",
    "nngp_diagonal",
    "numerical_dual",
    "smoothness_gammas",
    "two_layer_relu_kernel",
    "two_layer_relu_ntk_sphere",
]
