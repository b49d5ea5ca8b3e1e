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
import math
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
      angular: for ``phi(u) = sigma u + delta |u|`` (relu, leaky_relu, abs,
        identity) an :class:`AngularDual`; the analytic recursion then carries
        the angle between inputs exactly through the layers. None otherwise.
    """

    name: str
    fn: Callable[[Array], Array]
    T: DualMap | None = None
    Tdot: DualMap | None = None
    deriv: Callable[[Array], Array] | None = None
    homogeneous_degree: int | None = None
    angular: Any = None

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
        raise ValueError(
            f"bad parameters {dict(params or {})} for activation {name!r}: {e}"
        ) from None
    if not isinstance(act, Activation):
        raise TypeError(
            f"activation factory {name!r} returned {type(act).__name__}, not Activation"
        )
    return act


class SpecActivationMixin:
    """``act`` and ``has_bias`` for frozen specs with ``activation``,
    ``activation_params`` and ``b_std`` fields (the model specs and the kernels'
    :class:`~ntkexp.kernels.analytic.MLPKernelSpec`)."""

    @property
    def act(self) -> Activation:
        """The :class:`Activation` object for this spec."""
        return get_activation(self.activation, dict(self.activation_params))

    @property
    def has_bias(self) -> bool:
        return self.b_std > 0


# --------------------------------------------------------------------------
# Numerically safe helpers (no NaN in values or gradients at the edges).
# --------------------------------------------------------------------------


def safe_sqrt(x: Array) -> Array:
    """``sqrt(max(x, 0))`` whose gradient is 0 (not inf/NaN) where ``x <= 0``."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _f_small(t: Array) -> Array:
    """``sin t - t cos t`` for ``|t| <= 0.5`` by its Taylor series (no cancellation).

    ``sin t - t cos t = sum_{k>=1} (-1)^(k+1) 2k t^(2k+1) / (2k+1)!``; nine terms
    give full float64 accuracy for ``|t| <= 0.5`` (the tenth is 1e-22 relative),
    five full float32 accuracy (the sixth is 1e-11 relative).
    """
    t2 = t * t
    acc = jnp.zeros_like(t)
    for k in range(9 if jnp.dtype(t.dtype) == jnp.float64 else 5, 0, -1):
        coef = (-1) ** (k + 1) * 2 * k / math.factorial(2 * k + 1)
        acc = acc * t2 + coef
    return acc * t2 * t


def sin_minus_tcos(t: Array) -> Array:
    """``f(t) = sin t - t cos t`` on ``[0, pi]``, accurate near 0 (``f ~ t^3/3``)."""
    small = t < 0.5
    ts = jnp.where(small, t, 0.0)
    tl = jnp.where(small, 1.0, t)
    return jnp.where(small, _f_small(ts), jnp.sin(tl) - tl * jnp.cos(tl))


def _h_abs(t: Array) -> Array:
    """``h(t) = pi - 2 sin t - (pi - 2t) cos t = pi (1 - J_abs(t))`` on ``[0, pi]``.

    Symmetric under ``t -> pi - t``; near 0 it is ``2 pi sin^2(t/2) - 2 f(t)`` with
    ``f = sin t - t cos t``, a sum of two terms of different orders, so the value
    is computed without cancellation at both ends.
    """
    u = jnp.minimum(t, jnp.pi - t)
    return 2 * jnp.pi * jnp.sin(u / 2) ** 2 - 2 * sin_minus_tcos(u)


# Cephes atan (S. L. Moshier, Cephes Math Library 2.8, atan.c / atanf.c):
# float64: atan(z) = z + z^3 P(z^2) / Q(z^2) on |z| <= 0.66 (peak rel. error 2.6e-18);
# float32: atan(z) = z + z^3 p(z^2) on |z| <= tan(pi/8) (~1 ulp).
_ATAN_P64 = (-8.750608600031904122785e-1, -1.615753718733365076637e1,
             -7.500855792314704667340e1, -1.228866684490136173410e2,
             -6.485021904942025371773e1)
_ATAN_Q64 = (1.0, 2.485846490142306297962e1, 1.650270098316988542046e2,
             4.328810604912902668951e2, 4.853903996359136964868e2,
             1.945506571482613964425e2)
_ATAN_MOREBITS = 6.123233995736765886130e-17  # pi/4 - fl(pi/4) is half of this
_ATAN_P32 = (8.05374449538e-2, -1.38776856032e-1, 1.99777106478e-1, -3.33329491539e-1)
_TAN_PI_8 = 0.41421356237309504880


def _horner(coefs, z: Array) -> Array:
    acc = jnp.full_like(z, coefs[0])
    for c in coefs[1:]:
        acc = acc * z + c
    return acc


def atan_ratio(y: Array, x: Array) -> Array:
    """``atan(y / x)`` in ``[0, pi/4]`` for ``0 <= y <= x`` (``0`` where ``x = 0``).

    Plain arithmetic and selects (Cephes range reduction and rational/polynomial
    kernel, see the coefficients above), so XLA fuses and vectorizes it; XLA:CPU
    calls a scalar ``atan2`` (~28 ns per element) otherwise. For ``y > k x``
    (``k = 0.66`` in float64, ``tan(pi/8)`` in float32) it uses
    ``atan(y/x) = pi/4 + atan((y - x) / (y + x))``; the reduced argument is one
    division of exact differences. Relative error about 1 ulp of the dtype,
    including ``y -> 0`` (``atan ~ y/x``) and ``y = x``.
    """
    f64 = jnp.dtype(y.dtype) == jnp.float64
    big = y > (0.66 if f64 else _TAN_PI_8) * x
    num = jnp.where(big, y - x, y)
    den = jnp.where(big, y + x, x)
    z = num / jnp.where(den > 0, den, 1.0)
    zz = z * z
    if f64:
        a = z + z * zz * (_horner(_ATAN_P64, zz) / _horner(_ATAN_Q64, zz))
        return jnp.where(big, math.pi / 4 + (a + 0.5 * _ATAN_MOREBITS), a)
    a = z + z * zz * _horner(_ATAN_P32, zz)
    return jnp.where(big, math.pi / 4 + a, a)


def angle_from_gaps(e: Array, f: Array) -> Array:
    """Angle ``theta in [0, pi]`` from the gaps ``e = s - c >= 0``, ``f = s + c >= 0``.

    ``tan(theta / 2) = sqrt(e / f)``, so ``theta = 2 atan2(sqrt e, sqrt f)`` is exact
    at both edges (``e -> 0``: collinear; ``f -> 0``: antipodal), unlike
    ``arccos(c / s)``, which loses half the digits there.
    """
    e = jnp.maximum(e, 0.0)
    f = jnp.maximum(f, 0.0)
    return 2 * jnp.arctan2(safe_sqrt(e), safe_sqrt(f))


def gaps(q1: Array, c: Array, q2: Array) -> tuple[Array, Array, Array]:
    """``(s, e, f) = (sqrt(q1 q2), s - c, s + c)``, clipped to ``|c| <= s``."""
    s = safe_sqrt(q1 * q2)
    return s, jnp.maximum(s - c, 0.0), jnp.maximum(s + c, 0.0)


@dataclasses.dataclass(frozen=True)
class AngularDual:
    """Dual maps of ``phi(u) = sigma u + delta |u|`` (Cho & Saul 2009, arc-cosine kernels).

    ``relu = (1/2, 1/2)``, ``leaky_relu(a) = ((1+a)/2, (1-a)/2)``, ``abs = (0, 1)``,
    ``identity = (1, 0)``. These are positively homogeneous of degree 1, so with
    ``s = sqrt(q1 q2)`` and ``theta`` the angle (``cos theta = c / s``)::

        T    = s J(theta),   J(t)    = sigma^2 cos t + delta^2 J_abs(t),
        Tdot = Jdot(theta),  Jdot(t) = sigma^2 + delta^2 (1 - 2 t / pi),

    with ``J_abs(t) = (2 sin t + (pi - 2t) cos t) / pi`` (the cross term
    ``E[u |v|]`` vanishes by symmetry; ``E[sign u sign v] = 1 - 2 theta/pi``).
    ``J(0) = sigma^2 + delta^2``; ``jm = J(0) - J`` and ``jp = J(0) + J`` are
    written as sums of non-negative terms so the analytic recursion can carry the
    angle through the layers without cancellation near ``theta = 0`` or ``pi``.
    """

    sigma: float
    delta: float

    @property
    def j0(self) -> float:
        return self.sigma**2 + self.delta**2

    def J(self, t: Array, tc: Array | None = None) -> Array:
        """``J(t)``; ``tc = pi - t`` may be passed when known more precisely.

        For ``t > pi/2`` it uses ``J = (delta^2 - sigma^2) cos tc + 2 delta^2 f(tc) / pi``
        (``f(x) = sin x - x cos x``), exact as ``J -> 0`` for relu at ``t -> pi``.
        """
        tc = jnp.pi - t if tc is None else tc
        lo = t <= jnp.pi / 2
        tl = jnp.where(lo, t, 0.0)
        th = jnp.where(lo, 0.0, tc)
        j_abs = (2 * jnp.sin(tl) + (jnp.pi - 2 * tl) * jnp.cos(tl)) / jnp.pi
        j_lo = self.sigma**2 * jnp.cos(tl) + self.delta**2 * j_abs
        j_hi = ((self.delta**2 - self.sigma**2) * jnp.cos(th)
                + 2 * self.delta**2 * sin_minus_tcos(th) / jnp.pi)
        return jnp.where(lo, j_lo, j_hi)

    def Jdot(self, t: Array, tc: Array | None = None) -> Array:
        """``Jdot(t)``; for ``t > pi/2`` written as ``(sigma^2 - delta^2) + 2 delta^2 tc / pi``."""
        tc = jnp.pi - t if tc is None else tc
        lo = t <= jnp.pi / 2
        return jnp.where(lo, self.sigma**2 + self.delta**2 * (jnp.pi - 2 * t) / jnp.pi,
                         (self.sigma**2 - self.delta**2) + 2 * self.delta**2 * tc / jnp.pi)

    def jm(self, t: Array) -> Array:
        """``J(0) - J(t) >= 0``, accurate near ``t = 0`` and ``t = pi``."""
        return self.sigma**2 * 2 * jnp.sin(t / 2) ** 2 + self.delta**2 * _h_abs(t) / jnp.pi

    def jp(self, t: Array) -> Array:
        """``J(0) + J(t) >= 0``, accurate near ``t = pi``."""
        j_abs = (2 * jnp.sin(t) + (jnp.pi - 2 * t) * jnp.cos(t)) / jnp.pi
        return self.sigma**2 * 2 * jnp.cos(t / 2) ** 2 + self.delta**2 * (1 + j_abs)

    def from_gaps(self, e: Array, f: Array) -> tuple[Array, Array, Array, Array]:
        """``(J, Jdot, jm, jp)`` at the angle with gaps ``e = s - c``, ``f = s + c``.

        The same functions as :meth:`J`, :meth:`Jdot`, :meth:`jm`, :meth:`jp`,
        computed by :meth:`from_sorted_gaps` (fused, vectorized arithmetic; exact
        at both edges).
        """
        e = jnp.maximum(e, 0.0)
        f = jnp.maximum(f, 0.0)
        tot = e + f
        inv = jnp.where(tot > 0, 1.0 / jnp.where(tot > 0, tot, 1.0), 0.0)
        return self.from_sorted_gaps(jnp.minimum(e, f), jnp.maximum(e, f), e <= f, inv)

    def from_sorted_gaps(self, mn: Array, mx: Array, lo: Array,
                         inv: Array) -> tuple[Array, Array, Array, Array]:
        """``(J, Jdot, jm, jp)`` from the smaller and larger gap (fast path of the recursion).

        Args:
          mn, mx: ``min(e, f)`` and ``max(e, f)`` of the gaps ``e = s - c``,
            ``f = s + c`` (``0 <= mn <= mx``).
          lo: ``e <= f``, i.e. ``theta <= pi/2``.
          inv: ``1 / (e + f) = 1 / (2 s)`` (0 where ``s = 0``; the outputs are
            then finite and multiplied by ``s = 0`` in the recursion).

        With ``u = min(theta, pi - theta)``: ``tan(u/2) = sqrt(mn/mx) = p/mx``
        (``p = sqrt(mn mx)``), so ``u = 2 atan(p/mx)`` (:func:`atan_ratio`),
        ``sin u = 2 p inv``, ``cos u = (mx - mn) inv``, ``sin^2(u/2) = mn inv``,
        ``cos^2(u/2) = mx inv``: one square root and one division, no
        cancellation at either edge. Every output is ``where(lo, A(u), B(u))``
        of non-cancelling terms (``pi - theta = u`` when ``theta > pi/2``).
        """
        p = safe_sqrt(mn * mx)
        u = 2 * atan_ratio(p, mx)  # min(t, pi - t) in [0, pi/2]
        sh2u = mn * inv  # sin^2(u/2)
        ch2u = mx * inv  # cos^2(u/2)
        cos_u = (mx - mn) * inv  # |cos t|
        sin = 2 * p * inv  # sin t = sin u
        small = u < 0.5
        f_u = jnp.where(small, _f_small(jnp.where(small, u, 0.0)), sin - u * cos_u)
        s2, d2 = self.sigma**2, self.delta**2
        lin = 1 - u * (2 / jnp.pi)  # 1 - 2u/pi in [0, 1]
        j_abs_lo = (2 / jnp.pi) * sin + lin * cos_u  # J_abs(t) for t = u <= pi/2
        J = jnp.where(lo, s2 * cos_u + d2 * j_abs_lo,
                      (d2 - s2) * cos_u + (2 * d2 / jnp.pi) * f_u)
        Jdot = s2 + jnp.where(lo, d2, -d2) * lin
        h_abs = (2 * jnp.pi) * sh2u - 2 * f_u  # pi (1 - J_abs(u)) >= 0
        # 1 + J_abs = (pi + 2 sin t + (pi - 2t) cos t) / pi, all terms >= 0 for t <= pi/2;
        # for t > pi/2, J_abs = 2 f(tc)/pi + cos(tc) >= 0 (tc = pi - t = u).
        jm = (2 * s2) * jnp.where(lo, sh2u, ch2u) + (d2 / jnp.pi) * h_abs
        one_p_jabs = 1 + jnp.where(lo, j_abs_lo, (2 / jnp.pi) * f_u + cos_u)
        jp = (2 * s2) * jnp.where(lo, ch2u, sh2u) + d2 * one_p_jabs
        return J, Jdot, jm, jp

    def T(self, q1: Array, c: Array, q2: Array) -> Array:
        s, e, f = gaps(q1, c, q2)
        return s * self.J(angle_from_gaps(e, f), angle_from_gaps(f, e))

    def Tdot(self, q1: Array, c: Array, q2: Array) -> Array:
        _, e, f = gaps(q1, c, q2)
        return self.Jdot(angle_from_gaps(e, f), angle_from_gaps(f, e))


def _angular(name: str, fn, deriv, sigma: float, delta: float) -> Activation:
    ang = AngularDual(float(sigma), float(delta))
    return Activation(name, fn, T=ang.T, Tdot=ang.Tdot, deriv=deriv,
                      homogeneous_degree=1, angular=ang)


# --------------------------------------------------------------------------
# Built-in activations. Closed-form dual maps are attached where known.
# --------------------------------------------------------------------------


@register_activation("relu")
def _relu() -> Activation:
    """ReLU; arc-cosine kernel of degree 1 (Cho & Saul 2009)."""
    return _angular("relu", jax.nn.relu, lambda z: (z > 0).astype(z.dtype), 0.5, 0.5)


@register_activation("leaky_relu")
def _leaky_relu(slope: float = 0.01) -> Activation:
    """``max(z, 0) + slope * min(z, 0) = (1+slope)/2 z + (1-slope)/2 |z|``."""
    a = float(slope)
    return _angular(
        "leaky_relu",
        lambda z: jnp.where(z > 0, z, a * z),
        lambda z: jnp.where(z > 0, 1.0, a).astype(z.dtype),
        (1 + a) / 2, (1 - a) / 2,
    )


@register_activation("abs")
def _abs() -> Activation:
    return _angular("abs", jnp.abs, jnp.sign, 0.0, 1.0)


@register_activation("identity")
def _identity() -> Activation:
    return _angular("identity", lambda z: z, jnp.ones_like, 1.0, 0.0)


def _erf_T(q1, c, q2):
    # Williams 1997: E[erf(u) erf(v)] = (2/pi) asin(2c / sqrt((1+2q1)(1+2q2))),
    # written as an atan2 with P - 4c^2 = 1 + 2q1 + 2q2 + 4(q1 q2 - c^2) >= 1.
    p = 1 + 2 * q1 + 2 * q2 + 4 * jnp.maximum(q1 * q2 - c * c, 0.0)
    return (2 / jnp.pi) * jnp.arctan2(2 * c, jnp.sqrt(p))


def _erf_Tdot(q1, c, q2):
    # d/dc of _erf_T (Price's theorem): (4/pi) / sqrt((1+2q1)(1+2q2) - 4c^2).
    p = 1 + 2 * q1 + 2 * q2 + 4 * jnp.maximum(q1 * q2 - c * c, 0.0)
    return (4 / jnp.pi) / jnp.sqrt(p)


@register_activation("erf")
def _erf() -> Activation:
    return Activation(
        "erf",
        jax.scipy.special.erf,
        T=_erf_T,
        Tdot=_erf_Tdot,
        deriv=lambda z: 2.0 / jnp.sqrt(jnp.pi).astype(z.dtype) * jnp.exp(-z * z),
    )


def _orthant_moments(rho):
    """For standard ``(X, Y)`` with correlation ``rho`` (``|rho| < 1``):
    ``P(X>0, Y>0)``, ``E[X^2; X>0, Y>0]`` and ``E[XY; X>0, Y>0]`` (Sheppard; Rosenbaum 1961)."""
    r = jnp.sqrt(1 - rho * rho)
    p = 0.25 + jnp.arctan2(rho, r) / (2 * jnp.pi)
    return p, p + rho * r / (2 * jnp.pi), rho * p + r / (2 * jnp.pi)


def _gelu_T(q1, c, q2):
    """``E[u Phi(u) v Phi(v)]`` in closed form.

    With ``g1, g2 ~ N(0, 1)`` independent, ``Phi(u) Phi(v) = P(a >= 0, b >= 0 | u, v)``
    for ``a = u - g1``, ``b = v - g2``, so ``T = E[u v; a >= 0, b >= 0]``. Regressing
    ``(u, v)`` on ``(a, b)`` (covariance ``S = [[1+q1, c], [c, 1+q2]]``) reduces it
    to Gaussian orthant moments: ``T = Cov(u, v | a, b) P + w_u^T M w_v`` with
    ``w_u = S^-1 (q1, c)``, ``w_v = S^-1 (c, q2)`` and ``M = E[(a,b)(a,b)^T; orthant]``.
    ``|corr(a, b)| < 1`` always, so there is no edge singularity.
    """
    A, B = 1 + q1, 1 + q2
    det = A * B - c * c
    # S^-1 = [[B, -c], [-c, A]] / det
    wu_a, wu_b = (B * q1 - c * c) / det, (A * c - c * q1) / det
    wv_a, wv_b = (B * c - c * q2) / det, (A * q2 - c * c) / det
    cond = c - (q1 * wv_a + c * wv_b)
    sa, sb = jnp.sqrt(A), jnp.sqrt(B)
    rho = c / (sa * sb)
    p, m2, mxy = _orthant_moments(rho)
    maa, mbb, mab = A * m2, B * m2, sa * sb * mxy
    quad = wu_a * (maa * wv_a + mab * wv_b) + wu_b * (mab * wv_a + mbb * wv_b)
    return cond * p + quad


def _gelu_Tdot(q1, c, q2):
    # Price's theorem: E[phi'(u) phi'(v)] = d/dc E[phi(u) phi(v)] (exact autodiff of _gelu_T).
    _, t = jax.jvp(lambda cc: _gelu_T(q1, cc, q2), (c,), (jnp.ones_like(c),))
    return t


@register_activation("gelu")
def _gelu() -> Activation:
    # exact (erf-based) GELU: z * Phi(z)
    return Activation("gelu", lambda z: jax.nn.gelu(z, approximate=False), T=_gelu_T,
                      Tdot=_gelu_Tdot)


def _sin_T(q1, c, q2):
    # E[sin u sin v] = exp(-(q1+q2)/2) sinh(c), written without overflow (c <= (q1+q2)/2).
    h = (q1 + q2) / 2
    return (jnp.exp(c - h) - jnp.exp(-c - h)) / 2


def _cos_T(q1, c, q2):
    # E[cos u cos v] = exp(-(q1+q2)/2) cosh(c).
    h = (q1 + q2) / 2
    return (jnp.exp(c - h) + jnp.exp(-c - h)) / 2


@register_activation("sin")
def _sin() -> Activation:
    return Activation("sin", jnp.sin, T=_sin_T, Tdot=_cos_T, deriv=jnp.cos)


@register_activation("cos")
def _cos() -> Activation:
    return Activation("cos", jnp.cos, T=_cos_T, Tdot=_sin_T, deriv=lambda z: -jnp.sin(z))


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
