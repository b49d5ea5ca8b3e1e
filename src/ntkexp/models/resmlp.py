"""Residual MLP (ResMLP) in NTK parameterization (Flax NNX).

Architecture (:class:`ResMLPSpec`), pre-activation residual blocks with a
branch multiplier ``alpha`` (the residual NTK of Huang et al. 2020, "Why do
deep residual networks generalize better than deep feedforward networks? A
neural tangent kernel perspective", and of Yang & Schoenholz 2017, with two
dense layers per branch)::

    h^0     = Dense_in(x)                                        (width n)
    h^b     = h^{b-1} + alpha * Dense_b2(phi(Dense_b1(phi(h^{b-1}))))   b = 1..depth
    f(x)    = Dense_out(phi(h^depth))                            (out_dim)

Every Dense is NTK-parameterized: ``z = W_std / sqrt(n_in) * a @ W + b_std * b``
with ``W, b ~ N(0, 1)`` (``b_std = 0``: no bias). ``depth`` counts residual
blocks; ``depth = 0`` is exactly the one-hidden-layer MLP ``MLPSpec(depth=1)``.
The skip path carries no parameters, so the variance grows with depth unless
``alpha`` shrinks (``alpha = 1/sqrt(depth)`` keeps it bounded; Huang et al.
use ``alpha = depth^{-gamma}``). The analytic kernel is :func:`resmlp_kernel`
(the limit of the layer composition).

Parameters as a pytree: ``{"inp": {"W": (d, n), "b": (n,)}, "blocks": {b: {"l1":
{...}, "l2": {...}}}, "out": {"W": (n, out_dim), "b": (out_dim,)}}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ntkexp.activations import SpecActivationMixin
from ntkexp.kernels.base import Kernel
from ntkexp.layers.activation import Activation
from ntkexp.layers.combinators import residual, serial
from ntkexp.layers.dense import Dense
from ntkexp.layers.network import Network, composition_kernel
from ntkexp.models.registry import ARCHITECTURES, register_architecture
from ntkexp.models.validation import check_int as _check_int
from ntkexp.models.validation import check_std as _check_std
from ntkexp.models.validation import norm_activation_params as _norm_activation_params
from ntkexp.models.validation import promote

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ResMLPSpec(SpecActivationMixin):
    """A residual MLP, as the analytic and the finite side both see it.

    Attributes:
      depth: number of residual blocks (>= 0).
      width: hidden width n (> 0).
      alpha: branch multiplier (finite, >= 0).
      activation: registered activation name.
      W_std: weight multiplier sigma_w (>= 0).
      b_std: bias multiplier sigma_b (>= 0; 0 means no bias).
      out_dim: output dimension (>= 1).
      activation_params: keyword parameters of the activation factory.
    """

    depth: int
    width: int
    alpha: float = 1.0
    activation: str = "relu"
    W_std: float = 1.0
    b_std: float = 0.0
    out_dim: int = 1
    activation_params: Any = ()

    def __post_init__(self):
        object.__setattr__(self, "activation_params",
                           _norm_activation_params(self.activation_params))
        _check_int("ResMLPSpec", "depth", self.depth, minimum=0)
        _check_int("ResMLPSpec", "width", self.width, minimum=1)
        _check_int("ResMLPSpec", "out_dim", self.out_dim, minimum=1)
        for name in ("alpha", "W_std", "b_std"):
            object.__setattr__(self, name, _check_std("ResMLPSpec", name, getattr(self, name)))
        _ = self.act  # validates the activation name and its parameters

    def replace(self, **changes) -> ResMLPSpec:
        return dataclasses.replace(self, **changes)

    def layers(self):
        """This network as a layer composition (:func:`resmlp_layers`)."""
        return resmlp_layers(self)


@dataclasses.dataclass(frozen=True)
class ResMLPApply:
    """Pure ``apply_fn(params, x) -> (n, out_dim)`` for a :class:`ResMLPSpec` (hashable).

    The network is the layer composition :func:`resmlp_layers`; this record keeps
    the ResMLP's own parameter layout (``inp`` / ``blocks`` / ``out``) and maps it
    onto the composition's (:meth:`to_layer_params`), so it shares the
    composition's forward pass, structured empirical NTK and diagnostics.
    """

    spec: ResMLPSpec

    @property
    def network(self):
        """The :class:`~ntkexp.layers.Network` of the composition (input shape from params)."""
        return lambda in_dim: Network(resmlp_layers(self.spec), (in_dim,))

    def to_layer_params(self, params):
        """``{"inp", "blocks", "out"}`` -> the composition's ``{i: ...}`` layout (no copy)."""
        blocks = params["blocks"]
        out = {0: params["inp"]}
        for b in range(self.spec.depth):
            blk = blocks[b]
            out[1 + b] = {0: {}, 1: {0: {}, 1: blk["l1"], 2: {}, 3: blk["l2"]}}
        out[self.spec.depth + 1] = {}
        out[self.spec.depth + 2] = params["out"]
        return out

    def _net(self, params, x):
        spec = self.spec
        blocks = params["blocks"]
        if len(blocks) != spec.depth:
            raise ValueError(
                f"params have {len(blocks)} residual blocks but the spec needs {spec.depth}"
            )
        d = params["inp"]["W"].shape[0]
        x, params = promote(jnp.asarray(x), params)  # JAX promotion: no silent downcast
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"inputs must have shape (n, {d}), got {tuple(x.shape)}")
        return self.network(d), self.to_layer_params(params), x

    def __call__(self, params, x: Array) -> Array:
        net, p, x = self._net(params, x)
        return net(p, x)

    # ---- model protocol (delegated to the composition) ----
    def structure_features(self, params, x: Array):
        net, p, x = self._net(params, x)
        return net.structure_features(p, x)

    def structure_pair(self, f1, f2, *, full: bool):
        d = f1[0][0].shape[-1]
        return self.network(d).structure_pair(f1, f2, full=full)

    def preactivations(self, params, x: Array):
        net, p, x = self._net(params, x)
        return net.preactivations(p, x)

    def hidden_weights(self, params):
        return params["inp"]["W"].T

    def readout_features(self, params, x: Array):
        net, p, x = self._net(params, x)
        return net.readout_features(p, x)


def resmlp_layers(spec: ResMLPSpec):
    """The ResMLP as a layer composition::

        serial(dense(n), residual(act, dense(n), act, dense(n), scale=alpha) x depth,
               act, dense(out_dim))
    """
    kw = dict(W_std=spec.W_std, b_std=spec.b_std)
    act = Activation(spec.activation, spec.activation_params)
    blocks = [residual(act, Dense(spec.width, **kw), act, Dense(spec.width, **kw),
                       scale=spec.alpha) for _ in range(spec.depth)]
    return serial(Dense(spec.width, **kw), *blocks, act,
                  Dense(spec.out_dim, readout=True, **kw))


class _Dense(nnx.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool, *, rngs: nnx.Rngs, dtype):
        self.W = nnx.Param(jax.random.normal(rngs.params(), (n_in, n_out), dtype))
        if bias:
            self.b = nnx.Param(jax.random.normal(rngs.params(), (n_out,), dtype))


class _Block(nnx.Module):
    def __init__(self, n: int, bias: bool, *, rngs: nnx.Rngs, dtype):
        self.l1 = _Dense(n, n, bias, rngs=rngs, dtype=dtype)
        self.l2 = _Dense(n, n, bias, rngs=rngs, dtype=dtype)


class ResMLP(nnx.Module):
    """Flax NNX residual MLP described by a :class:`ResMLPSpec`.

    Args:
      spec: the architecture.
      in_dim: input dimension d.
      rngs: ``nnx.Rngs``; parameters are drawn from ``rngs.params()``.
      dtype: parameter dtype (default float32).

    Calling the module maps ``x: (n, in_dim)`` to ``(n, out_dim)``.
    """

    def __init__(self, spec: ResMLPSpec, in_dim: int, *, rngs: nnx.Rngs, dtype=None):
        if not isinstance(spec, ResMLPSpec):
            raise TypeError(f"ResMLP needs a ResMLPSpec, got {type(spec).__name__}")
        _check_int("ResMLP", "in_dim", in_dim, minimum=1)
        dtype = dtype or jnp.float32
        n, bias = spec.width, spec.has_bias
        self.spec = spec
        self.inp = _Dense(in_dim, n, bias, rngs=rngs, dtype=dtype)
        self.blocks = nnx.List([_Block(n, bias, rngs=rngs, dtype=dtype) for _ in range(spec.depth)])
        self.out = _Dense(n, spec.out_dim, bias, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return ResMLPApply(self.spec)(nnx.to_pure_dict(nnx.state(self, nnx.Param)), x)


def init_resmlp_params(spec: ResMLPSpec, in_dim: int, key: Array, dtype=None):
    """Draw ResMLP parameters as a pure pytree (same draw as ``ResMLP(spec, in_dim, rngs)``)."""
    model = ResMLP(spec, in_dim, rngs=nnx.Rngs(params=key), dtype=dtype)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _build_resmlp(spec: ResMLPSpec, in_dim: int, key, dtype=None):
    return ResMLPApply(spec), init_resmlp_params(spec, in_dim, key, dtype)


def _resmlp_analytic(spec: ResMLPSpec, x1, x2=None):
    return composition_kernel(resmlp_layers(spec), x1, x2)


def resmlp_kernel(spec: ResMLPSpec, x1, x2=None) -> Kernel:
    """Infinite-width NNGP and NTK of the residual MLP ``spec`` (scalar output).

    The limit of the composition ``spec.layers()`` (:mod:`ntkexp.layers`), for
    any registered activation (closed form, angular or Mehler fallback). Both
    kernels add along the skip connection (the residual branch's outputs are
    independent of the skip at infinite width; Huang et al. 2020, Yang 2019).

    The recursion (NTK parameterization; Huang et al. 2020, section 3, residual
    NTK with branch scale ``alpha``; Yang & Schoenholz 2017 for the forward
    variances), with ``T, Tdot`` the activation's dual maps::

        Sigma^0 = W_std^2 <x, x'> / d + b_std^2,          Theta^0 = Sigma^0
        per block b (input kernels Sigma = Sigma^{b-1}, Theta = Theta^{b-1}):
          S_1 = W_std^2 T(Sigma) + b_std^2,     H_1 = S_1 + W_std^2 Tdot(Sigma) Theta
          S_2 = W_std^2 T(S_1)   + b_std^2,     H_2 = S_2 + W_std^2 Tdot(S_1) H_1
          Sigma^b = Sigma + alpha^2 S_2,        Theta^b = Theta + alpha^2 H_2
        readout: nngp = W_std^2 T(Sigma^L) + b_std^2,
                 ntk = nngp + W_std^2 Tdot(Sigma^L) Theta^L

    Args:
      spec: a :class:`ResMLPSpec` (its ``width`` is ignored).
      x1: inputs ``(n1, d)``.
      x2: inputs ``(n2, d)`` or None for ``x2 = x1`` (then exactly symmetric).

    Returns:
      ``Kernel(nngp=(n1, n2), ntk=(n1, n2))`` in the dtype of the inputs.
    """
    if not isinstance(spec, ResMLPSpec):
        raise TypeError(f"resmlp_kernel needs a ResMLPSpec, got {type(spec).__name__}")
    x1 = _as_matrix(x1, "x1")
    x2 = None if x2 is None else _as_matrix(x2, "x2")
    if x2 is not None and x1.shape[1] != x2.shape[1]:
        raise ValueError(f"x1 has {x1.shape[1]} features but x2 has {x2.shape[1]}")
    return _resmlp_analytic(spec, x1, x2)


def _as_matrix(x, name: str):
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    return x


def _register() -> None:
    if "resmlp" not in ARCHITECTURES:
        register_architecture("resmlp", make_spec=ResMLPSpec, analytic=_resmlp_analytic)(
            _build_resmlp
        )


_register()
