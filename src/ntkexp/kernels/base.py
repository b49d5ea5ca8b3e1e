"""The kernel record shared by the analytic and empirical sides."""

from __future__ import annotations

from typing import NamedTuple

import jax


class Kernel(NamedTuple):
    """Infinite-width (or Monte Carlo) kernels of a network; a pytree.

    Attributes:
      nngp: ``(n1, n2)`` NNGP covariance Sigma(x, x') of the output.
      ntk: ``(n1, n2)`` neural tangent kernel Theta(x, x').
    """

    nngp: jax.Array
    ntk: jax.Array
