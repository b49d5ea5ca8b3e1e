"""Infinite-width kernels: analytic recursion, closed forms, special cases, spectra."""

from ntkexp.kernels.analytic import analytic_kernel
from ntkexp.kernels.base import Kernel

__all__ = ["Kernel", "analytic_kernel"]
