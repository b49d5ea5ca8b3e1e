"""The seed's special cases of the infinite-width kernels, as named functions.

Each is the general recursion of :func:`ntkexp.kernels.analytic.mlp_kernel`
in a particular setting (tested equal to it in ``tests/kernels/test_special.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ntkexp.activations import Activation, get_activation, safe_sqrt
from ntkexp.kernels.analytic import MLPKernelSpec, mlp_kernel
from ntkexp.kernels.base import Kernel
from ntkexp.kernels.quadrature import gaussian_second_moment

Array = jax.Array


def second_moment(activation: str | Activation) -> float:
    """``E[sigma(z)^2]``, ``z ~ N(0, 1)`` (closed form where known, else quadrature)."""
    act = get_activation(activation)
    if act.angular is not None:
        return float(act.angular.j0)
    one = jnp.ones((), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    if act.has_closed_form:
        return float(act.T(one, one, one))
    return float(gaussian_second_moment(act.fn, one[None])[0])


def c_sigma(activation: str | Activation) -> float:
    """Arora et al. (2019)'s normalisation ``c_sigma = 1 / E[sigma(z)^2]`` (relu: 2)."""
    m = second_moment(activation)
    if not m > 0:
        raise ValueError(f"E[sigma(z)^2] must be positive to define c_sigma, got {m}")
    return 1.0 / m


def arora_ntk(x1, x2=None, *, depth: int, activation: str | Activation = "relu") -> Array:
    """Arora et al. (2019, "On exact computation...", eqs. 4-6) fully connected NTK.

    ``Sigma^0 = x.x'``; for ``h = 1..L``: ``Sigma^h = c_sigma E[sigma(u) sigma(v)]``
    and ``Sigmadot^h = c_sigma E[sigma'(u) sigma'(v)]`` under
    ``Lambda^h = [[Sigma^{h-1}(x,x), Sigma^{h-1}(x,x')], [., Sigma^{h-1}(x',x')]]``;
    ``Theta = sum_{h=1}^{L+1} Sigma^{h-1} prod_{h'=h}^{L+1} Sigmadot^{h'}``
    (``Sigmadot^{L+1} = 1``), ``c_sigma = 1 / E[sigma(z)^2]``.

    It is the NTK-parameterization recursion with ``W_std^2 = d`` on the first
    layer and ``W_std^2 = c_sigma`` after, ``b_std = 0``. Since
    :class:`~ntkexp.kernels.analytic.MLPKernelSpec` has one ``W_std``, this uses
    ``W_std^2 = c_sigma`` throughout and pre-scales the inputs by
    ``sqrt(d / c_sigma)`` (so ``c_sigma <x~, x~'> / d = <x, x'>``).

    Args:
      x1: ``(n1, d)``; x2: ``(n2, d)`` or None.
      depth: ``L``, the number of hidden layers (>= 0).
      activation: registered name or :class:`Activation`.

    Returns:
      ``Theta`` of shape ``(n1, n2)``.
    """
    name = activation.name if isinstance(activation, Activation) else activation
    cs = c_sigma(activation)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
    spec = MLPKernelSpec(depth=depth, W_std=math.sqrt(cs), b_std=0.0, activation=name)
    x1 = jnp.asarray(x1)
    if x1.ndim != 2:
        raise ValueError(f"x1 must have shape (n, d), got {tuple(x1.shape)}")
    scale = math.sqrt(x1.shape[1] / cs)
    x2s = None if x2 is None else jnp.asarray(x2) * scale
    return mlp_kernel(spec, x1 * scale, x2s).ntk


def _arccos(u: Array) -> Array:
    # arccos(u) = 2 atan2(sqrt(1-u), sqrt(1+u)): exact near u = +-1, finite gradients.
    u = jnp.clip(u, -1.0, 1.0)
    return 2 * jnp.arctan2(safe_sqrt(1 - u), safe_sqrt(1 + u))


def two_layer_relu_ntk_sphere(u) -> Array:
    """Bietti & Mairal (2019, eq. 7) two-layer ReLU NTK on the sphere, ``kappa(u)``.

    ``kappa(u) = u kappa0(u) + kappa1(u)`` with ``kappa0(u) = (pi - arccos u) / pi``
    and ``kappa1(u) = (u (pi - arccos u) + sqrt(1 - u^2)) / pi`` (the arc-cosine
    kernels of degree 0 and 1, Cho & Saul 2009). For unit-norm ``x, x'`` it is
    the NTK of ``sqrt(2/m) sum_j v_j relu(w_j.x)`` (both layers trained), i.e.
    the general recursion with depth 1, ``W_std^2 = 2`` after the first layer,
    no bias, and ``nngp_1 = <x, x'>``. Elementwise on ``u`` in ``[-1, 1]``.
    """
    u = jnp.asarray(u)
    if not jnp.issubdtype(u.dtype, jnp.floating):
        u = u.astype(jnp.float32)
    u = jnp.clip(u, -1.0, 1.0)
    a = _arccos(u)
    k0 = (jnp.pi - a) / jnp.pi
    k1 = (u * (jnp.pi - a) + safe_sqrt((1 - u) * (1 + u))) / jnp.pi
    return u * k0 + k1


def two_layer_relu_kernel(x1, x2=None, *, kappa: float = 1.0):
    """``Kernel(nngp, ntk)`` of ``f = (1/sqrt m) sum_r a_r relu(w_r.x)``, first layer trained.

    The one copy of the two-layer limit (Du et al. 2019, eq. 3.1; Arora et al.
    2019, eq. 4): ``ntk = H^inf = <x, x'> (pi - theta) / (2 pi)`` (independent of
    ``kappa``: the indicator is scale invariant) and ``nngp = kappa^2 |x||x'|
    (sin theta + (pi - theta) cos theta) / (2 pi)`` (Cho & Saul 2009), ``w_r ~
    N(0, kappa^2 I)``, ``theta`` the angle between ``x`` and ``x'``. Computed by
    the depth-1, bias-free ReLU recursion of :mod:`ntkexp.kernels.analytic` on
    inputs scaled by ``sqrt(d)`` (``nngp_rec = E[relu(w.x) relu(w.x')]``,
    ``ntk_rec - nngp_rec = H^inf``), so it has the exact-angle treatment, no
    NaN for zero rows, and is exactly symmetric for ``x2=None``.

    Args:
      x1: ``(n1, d)``; x2: ``(n2, d)`` or None; kappa: first-layer weight scale.
    """
    x1 = jnp.asarray(x1)
    if x1.ndim != 2:
        raise ValueError(f"x1 must have shape (n, d), got {tuple(x1.shape)}")
    spec = MLPKernelSpec(depth=1, W_std=1.0, b_std=0.0, activation="relu")
    s = math.sqrt(x1.shape[1])
    k = mlp_kernel(spec, x1 * s, None if x2 is None else jnp.asarray(x2) * s)
    return Kernel(kappa**2 * k.nngp, k.ntk - k.nngp)


def du_gram(x1, x2=None) -> Array:
    """Du et al. (2019, eq. 3) Gram matrix ``H_ij = x_i.x_j (pi - arccos(x_i.x_j)) / (2 pi)``.

    The first-layer-only NTK of ``f = (1/sqrt m) sum_r a_r relu(w_r.x)`` with
    ``a_r = +-1`` fixed, ``w_r ~ N(0, I)``:
    ``H(x, x') = <x, x'> E[1{w.x > 0} 1{w.x' > 0}]``. For unit-norm inputs this is
    the formula above; for other norms the angle between ``x`` and ``x'`` is used
    (the same expectation). The ``ntk`` of :func:`two_layer_relu_kernel`.

    Args:
      x1: ``(n1, d)``; x2: ``(n2, d)`` or None.

    Returns:
      ``H`` of shape ``(n1, n2)``.
    """
    return two_layer_relu_kernel(x1, x2).ntk
