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

import functools

import jax
import jax.numpy as jnp

from ntkexp.kernels.base import Kernel
from ntkexp.models.resmlp import ResMLPSpec

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("spec", "sym"))
def _resmlp_kernel(spec: ResMLPSpec, x1: Array, x2: Array, sym: bool) -> Kernel:
    act = spec.act
    w2, b2, a2 = spec.W_std**2, spec.b_std**2, spec.alpha**2
    d = x1.shape[1]
    q1 = w2 * jnp.sum(x1 * x1, axis=1) / d + b2
    q2 = w2 * jnp.sum(x2 * x2, axis=1) / d + b2
    sigma = w2 * jnp.matmul(x1, x2.T, precision=jax.lax.Precision.HIGHEST) / d + b2
    theta = sigma

    def dense_after_act(q1, s, q2, th):
        Q1, Q2 = q1[:, None], q2[None, :]
        s_new = w2 * act.T(Q1, s, Q2) + b2
        th_new = s_new + w2 * act.Tdot(Q1, s, Q2) * th
        return (w2 * act.T(q1, q1, q1) + b2, s_new, w2 * act.T(q2, q2, q2) + b2, th_new)

    for _ in range(spec.depth):
        p1, s1, p2, h1 = dense_after_act(q1, sigma, q2, theta)
        r1, s2, r2, h2 = dense_after_act(p1, s1, p2, h1)
        sigma, theta = sigma + a2 * s2, theta + a2 * h2
        q1, q2 = q1 + a2 * r1, q2 + a2 * r2
    _, nngp, _, ntk = dense_after_act(q1, sigma, q2, theta)
    if sym:
        nngp = (nngp + nngp.T) / 2
        ntk = (ntk + ntk.T) / 2
    return Kernel(nngp, ntk)


def resmlp_kernel(spec: ResMLPSpec, x1, x2=None) -> Kernel:
    """Infinite-width NNGP and NTK of the residual MLP ``spec`` (scalar output).

    Args:
      spec: a :class:`~ntkexp.models.resmlp.ResMLPSpec` (its ``width`` is ignored).
      x1: inputs ``(n1, d)``.
      x2: inputs ``(n2, d)`` or None for ``x2 = x1`` (then exactly symmetric).

    Returns:
      ``Kernel(nngp=(n1, n2), ntk=(n1, n2))`` in the dtype of the inputs.
    """
    if not isinstance(spec, ResMLPSpec):
        raise TypeError(f"resmlp_kernel needs a ResMLPSpec, got {type(spec).__name__}")
    if not spec.act.has_closed_form:
        raise NotImplementedError(
            f"activation {spec.activation!r} has no closed-form dual maps, so the "
            "analytic ResMLP kernel is not available for it"
        )
    sym = x2 is None
    x1 = _as_matrix(x1, "x1")
    x2 = x1 if sym else _as_matrix(x2, "x2")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"x1 has {x1.shape[1]} features but x2 has {x2.shape[1]}")
    if x1.dtype != x2.dtype:
        dt = jnp.promote_types(x1.dtype, x2.dtype)
        x1, x2 = x1.astype(dt), x2.astype(dt)
    return _resmlp_kernel(spec, x1, x2, sym)


def _as_matrix(x, name: str) -> Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x
