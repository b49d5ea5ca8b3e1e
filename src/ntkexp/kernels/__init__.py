"""Infinite-width kernels: analytic recursion, closed forms, quadrature, special cases, spectra."""

from ntkexp.kernels.analytic import analytic_kernel, diag_variances, dual_method, nngp_diagonal
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
    "NumericalDual",
    "analytic_kernel",
    "arora_ntk",
    "c_sigma",
    "diag_variances",
    "du_gram",
    "dual_method",
    "fit_decay_exponent",
    "gauss_jacobi",
    "hermite_coefficients",
    "lipschitz_constant_prop9",
    "mercer_eigenvalues",
    "nngp_diagonal",
    "numerical_dual",
    "smoothness_gammas",
    "two_layer_relu_kernel",
    "two_layer_relu_ntk_sphere",
]
