"""Analytic infinite-width NNGP and NTK of the residual MLP.

For :mod:`ntkexp.models.resmlp` (NTK parameterization; Huang et al. 2020,
section 3, residual NTK with branch scale ``alpha``; Yang & Schoenholz 2017 for
the forward variances), with ``T, Tdot`` the activation's dual maps applied to
a 2x2 covariance ``[[S(x,x), S(x,x')], [S(x',x), S(x',x')]]``::

    Sigma^0 = W_std^2 <x, x'> / d + b_std^2,          Theta^0 = Sigma^0
    per block b (input kernels Sigma = Sigma^{b-1}, Theta = Theta^{b-1}):
      S_1 = W_std^2 T(Sigma) + b_std^2,     H_1 = S_1 + W_std^2 Tdot(Sigma) Theta
      S_2 = W_std^2 T(S_1)   + b_std^2,     H_2 = S_2 + W_std^2 Tdot(S_1) H_1
      Sigma^b = Sigma + alpha^2 S_2,        Theta^b = Theta + alpha^2 H_2
    readout: nngp = W_std^2 T(Sigma^L) + b_std^2,  ntk = nngp + W_std^2 Tdot(Sigma^L) Theta^L

The skip and the branch are uncorrelated in the limit (the branch ends in
fresh zero-mean weights), and so are their parameter gradients (the cross
term is a sum of ``n`` zero-mean products scaled by ``1/n``), which is why
both kernels simply add along the skip connection.
"""

from __future__ import annotations

from ntkexp.kernels.base import Kernel


def resmlp_kernel(spec, x1, x2=None) -> Kernel:
    """Infinite-width NNGP and NTK of the residual MLP ``spec`` (scalar output).

    The limit of the composition ``spec.layers()`` (:mod:`ntkexp.layers`): the
    recursion above, for any registered activation (closed form, angular or
    Mehler fallback).

    Args:
      spec: a :class:`~ntkexp.models.resmlp.ResMLPSpec` (its ``width`` is ignored).
      x1: inputs ``(n1, d)``.
      x2: inputs ``(n2, d)`` or None for ``x2 = x1`` (then exactly symmetric).

    Returns:
      ``Kernel(nngp=(n1, n2), ntk=(n1, n2))`` in the dtype of the inputs.
    """
    from ntkexp.layers.network import composition_kernel

    layers = getattr(spec, "layers", None)
    if not callable(layers) or type(spec).__name__ != "ResMLPSpec":
        raise TypeError(f"resmlp_kernel needs a ResMLPSpec, got {type(spec).__name__}")
    x1 = _as_matrix(x1, "x1")
    x2 = None if x2 is None else _as_matrix(x2, "x2")
    if x2 is not None and x1.shape[1] != x2.shape[1]:
        raise ValueError(f"x1 has {x1.shape[1]} features but x2 has {x2.shape[1]}")
    return composition_kernel(layers(), x1, x2)


def _as_matrix(x, name: str):
    import jax.numpy as jnp

    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    return x
