"""Dual maps of any activation by numerical integration (Hermite / Mehler expansion).

For ``(u, v) ~ N(0, [[q1, c], [c, q2]])`` write ``u = sqrt(q1) z1``,
``v = sqrt(q2) z2`` with ``corr(z1, z2) = rho = c / sqrt(q1 q2)``. Expanding
``phi(sqrt(q) z) = sum_k a_k(q) h_k(z)`` in the orthonormal (probabilists')
Hermite polynomials ``h_k = He_k / sqrt(k!)``, Mehler's formula
(``E[h_j(z1) h_k(z2)] = delta_jk rho^k``; O'Donnell 2014, Prop. 11.31;
Daniely et al. 2016, section 4) gives::

    T(q1, c, q2) = E[phi(u) phi(v)] = sum_k a_k(q1) a_k(q2) rho^k.

The coefficients ``a_k(q) = E[phi(sqrt(q) z) h_k(z)]`` are computed once per
distinct variance (one per input point and layer) by a trapezoid rule in z
with ``nodes`` points (see :func:`gaussian_rule`):
``A = (sqrt(w) * phi(sqrt(q) z)) @ Psi``, with ``Psi`` the
Hermite *functions* ``sqrt(w_m) h_k(z_m)`` (bounded, so no overflow in float32),
a constant built once in float64 numpy. Then each pair costs one Horner
evaluation of degree ``degree``.

**Tail correction.** The series converges slowly at ``rho -> +-1`` when
``phi(sqrt(q) z)`` is nearly a step (large ``q``; ``a_k`` then decays only like
``k^(-3/4)`` up to ``k ~ q``). The exact sums at ``rho = +-1`` are 1-D integrals,
``S+ = E[phi(sqrt(q1) z) phi(sqrt(q2) z)]`` and
``S- = E[phi(sqrt(q1) z) phi(-sqrt(q2) z)]`` (two matmuls over the nodes). The
missing even and odd tails ``t_e = ((S+ - P+) + (S- - P-)) / 2``,
``t_o = ((S+ - P+) - (S- - P-)) / 2`` (``P+-`` the truncated sums at ``+-1``)
are added as ``t_e rho^(K_e) + t_o rho^(K_o)`` (``K_e``, ``K_o`` the first even
and odd degree beyond the truncation), which makes the result exact at
``rho = +-1`` (collinear and antipodal inputs, the diagonal) and leaves an
error ``sum_{k > K} a_k b_k (rho^k - rho^(K_{e,o}))``, small everywhere.
``Tdot`` is the same with ``phi'``.

Accuracy (float64, defaults ``degree=160``, ``nodes=1201``): about 1e-9 relative on
the tanh reference case of ``tests/kernels/data/nt_kernels.json``
(pre-activation variances up to ~12); see ``tests/kernels/test_reference.py``.
It degrades gracefully as ``q`` grows past a few hundred for step-like
activations (the tails then carry more of the sum); raise ``degree`` and
``nodes`` there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntkexp.activations import Activation, get_activation, safe_sqrt

Array = jax.Array

DEFAULT_DEGREE = 160
DEFAULT_NODES = 1201


Z_MAX = 12.0


@functools.lru_cache(maxsize=32)
def gaussian_rule(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Trapezoid rule for ``E[g(z)]``, ``z ~ N(0, 1)``: ``sum_m w_m g(z_m)``.

    Equispaced nodes on ``[-12, 12]`` (step ``h = 24 / (nodes - 1)``), weights
    ``h exp(-z^2/2) / sqrt(2 pi)``. For ``g(z) = phi(sqrt(q) z)`` analytic in the
    strip ``|Im z| < tau`` the error is ``O(exp(-2 pi tau / h))`` (Trefethen &
    Weideman 2014, Thm 5.1) plus the Gaussian mass beyond 12 (``~1e-32``); for
    ``tanh`` (``tau = pi / (2 sqrt q)``) and the default 1201 nodes that is
    ``exp(-pi^2 / (0.02 sqrt q))``: below 1e-15 up to ``q ~ 1000``. A fixed
    Gauss-Hermite grid converges only like ``exp(-c tau sqrt(n))`` for such
    functions (that is why a degree-301 grid is still 1e-4 off).

    Returns float64 numpy ``(z (nodes,), w (nodes,))``.
    """
    if nodes < 3 or nodes % 2 == 0:
        raise ValueError(f"nodes must be an odd integer >= 3, got {nodes}")
    z = np.linspace(-Z_MAX, Z_MAX, nodes)
    h = z[1] - z[0]
    return z, h * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)


@functools.lru_cache(maxsize=32)
def hermite_functions(nodes: int, degree: int) -> np.ndarray:
    """``Psi[m, k] = sqrt(w_m) h_k(z_m)`` for ``k = 0..degree`` (float64, ``(nodes, degree+1)``).

    ``h_k = He_k / sqrt(k!)`` by the three-term recurrence
    ``h_{k+1} = (z h_k - sqrt(k) h_{k-1}) / sqrt(k+1)``, started from ``sqrt(w)``
    so that every entry stays bounded.
    """
    z, w = gaussian_rule(nodes)
    psi = np.zeros((nodes, degree + 1))
    psi[:, 0] = np.sqrt(w)
    if degree >= 1:
        psi[:, 1] = z * psi[:, 0]
    for k in range(1, degree):
        psi[:, k + 1] = (z * psi[:, k] - np.sqrt(k) * psi[:, k - 1]) / np.sqrt(k + 1)
    return psi


def hermite_coefficients(fn: Callable[[Array], Array], q: Array, *, degree: int = DEFAULT_DEGREE,
                         nodes: int = DEFAULT_NODES) -> Array:
    """``a_k(q) = E[fn(sqrt(q) z) h_k(z)]`` for each variance in ``q``.

    Args:
      fn: elementwise function.
      q: variances ``(n,)``, ``>= 0``.

    Returns:
      ``(n, degree + 1)`` coefficients in the dtype of ``q``.
    """
    z, w = gaussian_rule(nodes)
    dt = q.dtype
    vals = fn(safe_sqrt(q)[:, None] * jnp.asarray(z, dt)[None, :])
    vals = vals * jnp.asarray(np.sqrt(w), dt)[None, :]
    return jnp.matmul(vals, jnp.asarray(hermite_functions(nodes, degree), dt),
                      precision=lax.Precision.HIGHEST)


def gaussian_second_moment(fn: Callable[[Array], Array], q: Array, *,
                           nodes: int = DEFAULT_NODES) -> Array:
    """``E[fn(u)^2]``, ``u ~ N(0, q)``, elementwise over ``q`` (:func:`gaussian_rule`)."""
    z, w = gaussian_rule(nodes)
    dt = q.dtype
    zz = jnp.asarray(z, dt).reshape((1,) * q.ndim + (-1,))
    vals = fn(safe_sqrt(q)[..., None] * zz)
    return jnp.sum(vals * vals * jnp.asarray(w, dt).reshape(zz.shape), axis=-1)


def _mehler_pair(fn, q1, c, q2, degree, nodes):
    z, w = gaussian_rule(nodes)
    dt = c.dtype
    zj, wj = jnp.asarray(z, dt), jnp.asarray(w, dt)
    r1, r2 = safe_sqrt(q1), safe_sqrt(q2)
    s = r1[:, None] * r2[None, :]
    rho = jnp.clip(c / jnp.where(s > 0, s, 1.0), -1.0, 1.0)
    rho = jnp.where(s > 0, rho, 0.0)
    a1 = hermite_coefficients(fn, q1, degree=degree, nodes=nodes)
    a2 = hermite_coefficients(fn, q2, degree=degree, nodes=nodes)

    def step(acc, ab):
        x, y = ab
        return acc * rho + x[:, None] * y[None, :], None

    acc, _ = lax.scan(step, jnp.zeros_like(rho), (a1.T[::-1], a2.T[::-1]))
    hp = lax.Precision.HIGHEST
    f1 = fn(r1[:, None] * zj[None, :])
    f2p = fn(r2[:, None] * zj[None, :]) * wj[None, :]
    f2m = fn(-r2[:, None] * zj[None, :]) * wj[None, :]
    s_plus = jnp.matmul(f1, f2p.T, precision=hp)
    s_minus = jnp.matmul(f1, f2m.T, precision=hp)
    sign = jnp.asarray((-1.0) ** np.arange(degree + 1), dt)
    p_plus = jnp.matmul(a1, a2.T, precision=hp)
    p_minus = jnp.matmul(a1 * sign[None, :], a2.T, precision=hp)
    d_plus, d_minus = s_plus - p_plus, s_minus - p_minus
    t_even, t_odd = (d_plus + d_minus) / 2, (d_plus - d_minus) / 2
    k_even = degree + 1 if (degree + 1) % 2 == 0 else degree + 2
    k_odd = degree + 1 if (degree + 1) % 2 == 1 else degree + 2
    return acc + t_even * lax.integer_pow(rho, k_even) + t_odd * lax.integer_pow(rho, k_odd)


@dataclasses.dataclass(frozen=True)
class NumericalDual:
    """Numerical dual maps of an activation (Mehler expansion with exact tails).

    Attributes:
      act: the :class:`~ntkexp.activations.Activation` (its ``fn`` and ``derivative``).
      degree: truncation degree ``K`` of the Mehler series.
      nodes: quadrature nodes (:func:`gaussian_rule`) for the coefficients and the 1-D integrals.
    """

    act: Activation
    degree: int = DEFAULT_DEGREE
    nodes: int = DEFAULT_NODES

    def pair(self, q1: Array, c: Array, q2: Array) -> tuple[Array, Array]:
        """``(T, Tdot)`` ``q1 (n1,)``, ``c (n1, n2)``, ``q2 (n2,)`` -> ``(n1, n2)``."""
        t = _mehler_pair(self.act.fn, q1, c, q2, self.degree, self.nodes)
        td = _mehler_pair(self.act.derivative, q1, c, q2, self.degree, self.nodes)
        return t, td

    def diag(self, q: Array) -> Array:
        """``T(q, q, q) = E[phi(u)^2]``, ``u ~ N(0, q)``, elementwise."""
        return gaussian_second_moment(self.act.fn, q, nodes=self.nodes)

    def T(self, q1: Array, c: Array, q2: Array) -> Array:
        """Elementwise ``T`` on broadcastable arrays (each pair's own coefficients)."""
        return self._elementwise(self.act.fn, q1, c, q2)

    def Tdot(self, q1: Array, c: Array, q2: Array) -> Array:
        """Elementwise ``Tdot`` on broadcastable arrays."""
        return self._elementwise(self.act.derivative, q1, c, q2)

    def _elementwise(self, fn, q1, c, q2):
        dt = jnp.result_type(q1, c, q2)
        q1, c, q2 = jnp.broadcast_arrays(*(jnp.asarray(a, dt) for a in (q1, c, q2)))
        shape = c.shape
        f = jax.vmap(lambda a, b, d: _mehler_pair(fn, a[None], b[None, None], d[None],
                                                  self.degree, self.nodes)[0, 0])
        return f(q1.ravel(), c.ravel(), q2.ravel()).reshape(shape)


def numerical_dual(act: str | Activation, *, degree: int = DEFAULT_DEGREE,
                   nodes: int = DEFAULT_NODES) -> NumericalDual:
    """A :class:`NumericalDual` for a registered name or an :class:`Activation`."""
    return NumericalDual(get_activation(act), degree, nodes)
