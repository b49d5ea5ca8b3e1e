"""Activation registry.

Each registered name maps to a *factory* ``(**params) -> Activation``. An
:class:`Activation` carries the elementwise function and, where a closed form is
known, its *dual maps* (Cho & Saul 2009; Daniely et al. 2016):

    T(q1, c, q2)    = E[phi(u) phi(v)]
    Tdot(q1, c, q2) = E[phi'(u) phi'(v)]

with ``(u, v) ~ N(0, [[q1, c], [c, q2]])``. These are what the analytic
infinite-width recursion (``ntkexp.kernels``) needs. Activations without a
closed form fall back to numerical integration (``ntkexp.kernels.quadrature``).

Users add their own from any module::

    import ntkexp as nx

    @nx.register_activation("swish")
    def swish():
        return nx.Activation("swish", lambda z: z * jax.nn.sigmoid(z))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ntkexp.registry import Registry

Array = jax.Array
DualMap = Callable[[Array, Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise activation and (optionally) its closed-form dual maps.

    Attributes:
      name: registry name (for messages).
      fn: elementwise ``phi``; must be jax-traceable.
      T: closed-form ``E[phi(u) phi(v)]`` as ``T(q1, c, q2)`` on broadcastable
        arrays, or None (numerical integration is used).
      Tdot: closed-form ``E[phi'(u) phi'(v)]``, or None.
      deriv: ``phi'``; defaults to ``jax.grad`` of ``fn`` elementwise.
      homogeneous_degree: k if ``phi(a z) = a^k phi(z)`` for a > 0 (relu: 1),
        else None. Lets kernels factor out input norms exactly.
    """

    name: str
    fn: Callable[[Array], Array]
    T: DualMap | None = None
    Tdot: DualMap | None = None
    deriv: Callable[[Array], Array] | None = None
    homogeneous_degree: int | None = None

    def __call__(self, z: Array) -> Array:
        return self.fn(z)

    @property
    def has_closed_form(self) -> bool:
        return self.T is not None and self.Tdot is not None

    def derivative(self, z: Array) -> Array:
        """``phi'(z)`` elementwise."""
        if self.deriv is not None:
            return self.deriv(z)
        g = jax.grad(lambda s: self.fn(s))
        flat = jnp.ravel(z)
        return jax.vmap(g)(flat).reshape(jnp.shape(z))


ACTIVATIONS: Registry[Callable[..., Activation]] = Registry("activation")


def register_activation(name: str, *, overwrite: bool = False):
    """Decorator: register an activation factory ``(**params) -> Activation``."""
    return ACTIVATIONS.register(name, overwrite=overwrite)


def get_activation(name: str | Activation, params: Mapping[str, Any] | None = None) -> Activation:
    """Build the activation registered as ``name`` with keyword ``params``."""
    if isinstance(name, Activation):
        return name
    factory = ACTIVATIONS.get(name)
    try:
        act = factory(**dict(params or {}))
    except TypeError as e:
        raise ValueError(f"bad parameters {dict(params or {})} for activation {name!r}: {e}") from None
    if not isinstance(act, Activation):
        raise TypeError(f"activation factory {name!r} returned {type(act).__name__}, not Activation")
    return act


# --------------------------------------------------------------------------
# Built-in activations. Closed-form dual maps are attached where known.
# --------------------------------------------------------------------------


def _relu_T(q1, c, q2):
    s = jnp.sqrt(q1 * q2)
    cos = jnp.clip(c / jnp.where(s > 0, s, 1.0), -1.0, 1.0)
    th = jnp.arccos(cos)
    return s * (jnp.sqrt(1.0 - cos * cos) + (jnp.pi - th) * cos) / (2 * jnp.pi)


def _relu_Tdot(q1, c, q2):
    s = jnp.sqrt(q1 * q2)
    cos = jnp.clip(c / jnp.where(s > 0, s, 1.0), -1.0, 1.0)
    return (jnp.pi - jnp.arccos(cos)) / (2 * jnp.pi)


@register_activation("relu")
def _relu() -> Activation:
    return Activation("relu", jax.nn.relu, T=_relu_T, Tdot=_relu_Tdot,
                      deriv=lambda z: (z > 0).astype(z.dtype), homogeneous_degree=1)


@register_activation("leaky_relu")
def _leaky_relu(slope: float = 0.01) -> Activation:
    return Activation(
        "leaky_relu",
        lambda z: jnp.where(z > 0, z, slope * z),
        deriv=lambda z: jnp.where(z > 0, 1.0, slope).astype(z.dtype),
        homogeneous_degree=1,
    )


@register_activation("abs")
def _abs() -> Activation:
    return Activation("abs", jnp.abs, deriv=jnp.sign, homogeneous_degree=1)


@register_activation("identity")
def _identity() -> Activation:
    return Activation("identity", lambda z: z, deriv=jnp.ones_like, homogeneous_degree=1)


@register_activation("erf")
def _erf() -> Activation:
    return Activation(
        "erf",
        jax.scipy.special.erf,
        deriv=lambda z: 2.0 / jnp.sqrt(jnp.pi).astype(z.dtype) * jnp.exp(-z * z),
    )


@register_activation("gelu")
def _gelu() -> Activation:
    # exact (erf-based) GELU: z * Phi(z)
    return Activation("gelu", lambda z: jax.nn.gelu(z, approximate=False))


@register_activation("sin")
def _sin() -> Activation:
    return Activation("sin", jnp.sin, deriv=jnp.cos)


@register_activation("cos")
def _cos() -> Activation:
    return Activation("cos", jnp.cos, deriv=lambda z: -jnp.sin(z))


@register_activation("tanh")
def _tanh() -> Activation:
    return Activation("tanh", jnp.tanh, deriv=lambda z: 1.0 - jnp.tanh(z) ** 2)


@register_activation("softplus")
def _softplus() -> Activation:
    return Activation("softplus", jax.nn.softplus, deriv=jax.nn.sigmoid)


@register_activation("sigmoid")
def _sigmoid() -> Activation:
    return Activation(
        "sigmoid", jax.nn.sigmoid, deriv=lambda z: jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z))
    )


@register_activation("exp")
def _exp(shift: float = 0.0) -> Activation:
    """``exp(z - shift)`` (Bietti & Mairal 2019 use shift 1 or 2)."""
    return Activation("exp", lambda z: jnp.exp(z - shift), deriv=lambda z: jnp.exp(z - shift))
