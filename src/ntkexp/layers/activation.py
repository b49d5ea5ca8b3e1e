"""Elementwise activation layer: any registered activation, in any position.

Finite side: ``y = phi(x)`` elementwise (:mod:`ntkexp.activations`).

Infinite-width map (Jacot et al. 2018, Theorem 1; Lee et al. 2019, eq. 4;
Arora et al. 2019, appendix B for the per-position form): on a Gaussian state,
with ``q1 = cov1[a, i, i]``, ``q2 = cov2[b, j, j]`` the variances at the two
positions of an entry ``c = nngp[a, b, i, j]``::

    nngp' = T(q1, c, q2),   ntk' = Tdot(q1, c, q2) * ntk
    cov1' = T(q1_i, cov1_ij, q1_j)   (likewise cov2)

``T, Tdot`` come from the activation's dual maps (how, by
:func:`ntkexp.kernels.analytic.dual_method`): the angular form of the
relu family (:class:`~ntkexp.activations.AngularDual`, exact at collinear and
antipodal pairs), the closed form where one is registered, otherwise the
Mehler expansion with exact tails (:class:`~ntkexp.kernels.quadrature.NumericalDual`),
so any registered activation (a user's own included) has an analytic limit.
A pure dense stack is routed to the MLP recursion of
:mod:`ntkexp.kernels.analytic` (exact angle gaps carried through the layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from ntkexp.activations import Activation as ActivationFn
from ntkexp.activations import get_activation
from ntkexp.kernels.analytic import dual_method
from ntkexp.kernels.quadrature import NumericalDual, gaussian_second_moment
from ntkexp.layers.base import KernelState, Layer, Shape, check_gaussian

Array = jax.Array


def _norm_params(params) -> tuple:
    if isinstance(params, dict):
        params = tuple(sorted(params.items()))
    return tuple(tuple(p) for p in params)


@dataclasses.dataclass(frozen=True)
class Activation(Layer):
    """The registered activation ``name`` with keyword ``params`` as a layer.

    Attributes:
      name: a name in :data:`ntkexp.activations.ACTIVATIONS`.
      params: the activation factory's keyword parameters (a mapping or pairs;
        stored as sorted pairs so that the layer stays hashable).
      degree, nodes: Mehler degree and quadrature nodes for activations without
        closed form (:mod:`ntkexp.kernels.quadrature`).
    """

    name: str
    params: Any = ()
    degree: int = 160
    nodes: int = 1201

    kind: ClassVar[str] = "activation"

    def __post_init__(self):
        object.__setattr__(self, "params", _norm_params(self.params))
        _ = self.act  # validates the name and parameters

    @property
    def act(self) -> ActivationFn:
        return get_activation(self.name, dict(self.params))

    def out_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def apply(self, params, x: Array) -> Array:
        return self.act.fn(x)

    def kernel(self, state: KernelState) -> KernelState:
        check_gaussian(self.name, state)
        T, Tdot = dual_maps(self.act, self.degree, self.nodes)
        q1, q2 = state.pair_variances()
        c = state.self_consistent_nngp()
        nngp, td = T.pair(q1, c, q2, state), Tdot.pair(q1, c, q2, state)
        cov1 = T.self_(state.cov1, state, 1)
        cov2 = cov1 if state.sym else T.self_(state.cov2, state, 2)
        return state.replace(nngp=nngp, ntk=td * state.ntk, cov1=cov1, cov2=cov2,
                             is_gaussian=False)


@dataclasses.dataclass(frozen=True)
class _Dual:
    """One dual map (``T`` or ``Tdot``) over kernel-state layouts."""

    act: ActivationFn
    deriv: bool
    method: str
    degree: int
    nodes: int

    def _elementwise(self):
        if self.method == "angular":
            ang = self.act.angular
            return ang.Tdot if self.deriv else ang.T
        return self.act.Tdot if self.deriv else self.act.T

    def pair(self, q1, c, q2, state: KernelState):
        """On ``nngp``: ``q1``, ``q2`` from :meth:`KernelState.pair_variances`."""
        if self.method != "numerical":
            return self._elementwise()(q1, c, q2)
        nd = self._numerical()
        n1, n2 = c.shape[:2]
        N = state.n_positions
        cf = c.reshape(n1, n2, N, N).transpose(0, 2, 1, 3).reshape(n1 * N, n2 * N)
        v1, v2 = state.variances()
        t, td = nd.pair(v1.reshape(-1), cf, v2.reshape(-1))
        out = td if self.deriv else t
        return out.reshape(n1, N, n2, N).transpose(0, 2, 1, 3).reshape(c.shape)

    def self_(self, cov, state: KernelState, which: int):
        """On ``cov1``/``cov2`` ``(n, *S, *S)``."""
        if self.method != "numerical":
            qa, qb = state.self_variances(which)
            return self._elementwise()(qa, cov, qb)
        nd = self._numerical()
        if not state.is_spatial:
            if self.deriv:  # E[phi'(u)^2]
                return gaussian_second_moment(self.act.derivative, cov, nodes=self.nodes)
            return nd.diag(cov)
        n = cov.shape[0]
        N = state.n_positions
        q = state.variances()[which - 1].reshape(n, N)

        def one(qa, ca):
            t, td = nd.pair(qa, ca, qa)
            return td if self.deriv else t

        return jax.vmap(one)(q, cov.reshape(n, N, N)).reshape(cov.shape)

    def _numerical(self):
        return NumericalDual(self.act, self.degree, self.nodes)


def dual_maps(act: ActivationFn, degree: int = 160, nodes: int = 1201) -> tuple[_Dual, _Dual]:
    """``(T, Tdot)`` of ``act`` over kernel-state layouts (see the module docstring)."""
    method = dual_method(act)
    return (_Dual(act, False, method, degree, nodes), _Dual(act, True, method, degree, nodes))


def activation_layer(name: str, **params) -> Activation:
    """The layer for the registered activation ``name``.

    YAML: ``relu`` or ``{leaky_relu: {slope: 0.1}}``.
    """
    return Activation(name, params)


__all__ = ["Activation", "activation_layer", "dual_maps"]
