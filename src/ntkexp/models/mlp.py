"""Fully connected networks in NTK and standard parameterization (Flax NNX).

Architecture (``MLPSpec``): ``depth`` hidden layers, each Dense(width) followed by
the activation, then Dense(out_dim): the layer composition :func:`mlp_layers`
(:mod:`ntkexp.layers`). :class:`MLPApply` is that composition's dense-stack
fast path (hand-written vjp, structured NTK, the exact-angle recursion of
:mod:`ntkexp.kernels.analytic`), with the same parameter draw and layout.
Jacot et al. (2018) count layers including the output, so their "L = 4" is
``depth=3``.

Parameterizations (Jacot et al. 2018, eq. 1; Lee et al. 2020, section 2), with
``a`` the layer input of width ``n_in``:

* ``"ntk"``:      ``z = W_std / sqrt(n_in) * a @ W + b_std * b``,  ``W, b ~ N(0, 1)``
* ``"standard"``: ``z = a @ W + b``,  ``W ~ N(0, W_std^2 / n_in)``, ``b ~ N(0, b_std^2)``

Both give the same function distribution at initialisation (same NNGP); they
differ in the scale of the gradients, hence in the NTK and in how learning rates
must scale with width. ``b_std = 0`` means the layers have no bias.

Parameters as a pytree (``functional``): ``{"layers": {i: {"W": (n_in, n_out),
"b": (n_out,)}}}`` for ``i = 0 .. depth`` (``"b"`` absent when ``b_std == 0``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ntkexp.activations import SpecActivationMixin
from ntkexp.layers.activation import Activation
from ntkexp.layers.combinators import serial
from ntkexp.layers.dense import Dense as DenseLayer
from ntkexp.models import parameterization as P
from ntkexp.models.validation import (
    check_int,
    check_std,
    norm_activation_params,
    promote,
)

Array = jax.Array
PARAMETERIZATIONS = P.PRESETS


@dataclasses.dataclass(frozen=True)
class MLPSpec(SpecActivationMixin):
    """A fully connected network, as the analytic and the finite side both see it.

    Attributes:
      depth: number of hidden layers (>= 0). ``depth=0`` is a linear model.
      width: hidden width (> 0).
      activation: registered activation name (``ntkexp.activations.ACTIVATIONS``).
      W_std: weight standard deviation multiplier sigma_w (>= 0).
      b_std: bias standard deviation sigma_b (>= 0; 0 means no bias).
      parameterization: ``"ntk"``, ``"standard"``, ``"mup"`` or ``"mean_field"``
        (depth 1 only): :mod:`ntkexp.models.parameterization`. Only the first
        two have a kernel limit (``analytic_kernel``).
      out_dim: output dimension (>= 1).
      activation_params: keyword parameters of the activation factory, e.g.
        ``{"slope": 0.1}`` for ``leaky_relu``; stored as a sorted tuple of pairs
        so that the spec stays hashable (usable as a static jit argument).
    """

    depth: int
    width: int
    activation: str = "relu"
    W_std: float = 1.0
    b_std: float = 0.0
    parameterization: str = "ntk"
    out_dim: int = 1
    activation_params: Any = ()

    def __post_init__(self):
        object.__setattr__(self, "activation_params",
                           norm_activation_params(self.activation_params))
        check_int("MLPSpec", "depth", self.depth, minimum=0)
        check_int("MLPSpec", "width", self.width, minimum=1)
        check_int("MLPSpec", "out_dim", self.out_dim, minimum=1)
        for name in ("W_std", "b_std"):
            object.__setattr__(self, name, check_std("MLPSpec", name, getattr(self, name)))
        P.check(self.parameterization, self.depth)  # unknown / undefined here: one line
        _ = self.act  # validates the activation name and its parameters

    def layers(self):
        """This MLP as a layer composition ``serial(dense, act, ..., dense(out))``."""
        return mlp_layers(self)

    def layer_dims(self, in_dim: int) -> list[tuple[int, int]]:
        """``[(n_in, n_out)]`` for the ``depth + 1`` dense layers."""
        dims = [in_dim] + [self.width] * self.depth + [self.out_dim]
        return list(zip(dims[:-1], dims[1:], strict=True))

    def replace(self, **changes) -> MLPSpec:
        return dataclasses.replace(self, **changes)


def _abc_scales(spec: MLPSpec, fan_in: int, layer: int | None):
    if layer is None:
        raise ValueError(f"parameterization {spec.parameterization!r} needs the layer index")
    return P.scales(spec.parameterization, spec.depth, layer, width=spec.width, fan_in=fan_in,
                    W_std=spec.W_std, b_std=spec.b_std)


def layer_scales(spec: MLPSpec, fan_in: int, layer: int | None = None) -> tuple[float, float]:
    """Multipliers ``(w_mult, b_mult)`` applied in the forward pass of dense layer
    ``layer`` (0 .. depth; needed by the abc presets ``mup`` / ``mean_field``)."""
    if spec.parameterization == "ntk":
        return spec.W_std / math.sqrt(fan_in), spec.b_std
    if spec.parameterization == "standard":
        return 1.0, 1.0
    return _abc_scales(spec, fan_in, layer)[:2]


def init_scales(spec: MLPSpec, fan_in: int, layer: int | None = None) -> tuple[float, float]:
    """Standard deviations ``(w_init, b_init)`` of the stored parameters of layer ``layer``."""
    if spec.parameterization == "ntk":
        return 1.0, 1.0
    if spec.parameterization == "standard":
        return spec.W_std / math.sqrt(fan_in), spec.b_std
    return _abc_scales(spec, fan_in, layer)[2:]


class Dense(nnx.Module):
    """One dense layer of an :class:`MLP` (parameterization from the spec)."""

    def __init__(self, fan_in: int, fan_out: int, spec: MLPSpec, *, rngs: nnx.Rngs, dtype=None,
                 layer: int | None = None):
        dtype = dtype or jnp.float32
        w_init, b_init = init_scales(spec, fan_in, layer)
        self.W = nnx.Param(w_init * jax.random.normal(rngs.params(), (fan_in, fan_out), dtype))
        if spec.has_bias:
            self.b = nnx.Param(b_init * jax.random.normal(rngs.params(), (fan_out,), dtype))
        self.w_mult, self.b_mult = layer_scales(spec, fan_in, layer)

    def __call__(self, a: Array) -> Array:
        z = self.w_mult * (a @ self.W[...])
        if hasattr(self, "b"):
            z = z + self.b_mult * self.b[...][None, :]
        return z


class MLP(nnx.Module):
    """Flax NNX multilayer perceptron described by an :class:`MLPSpec`.

    Args:
      spec: the architecture.
      in_dim: input dimension d.
      rngs: ``nnx.Rngs``; parameters are drawn from ``rngs.params()``.
      dtype: parameter dtype (default float32; float64 needs ``jax_enable_x64``).

    Calling the module maps ``x: (n, in_dim)`` to ``(n, out_dim)``, computed in
    the promoted dtype of ``x`` and the parameters
    (:func:`ntkexp.models.validation.promote`: float64 inputs to a
    float32 network give float64 outputs, never a silent downcast).
    """

    def __init__(self, spec: MLPSpec, in_dim: int, *, rngs: nnx.Rngs, dtype=None):
        check_int("MLP", "in_dim", in_dim, minimum=1)
        self.spec = spec
        self.in_dim = in_dim
        self.layers = nnx.List(
            [Dense(i, o, spec, rngs=rngs, dtype=dtype, layer=h)
             for h, (i, o) in enumerate(spec.layer_dims(in_dim))]
        )

    def __call__(self, x: Array) -> Array:
        return MLPApply(self.spec)(nnx.to_pure_dict(nnx.state(self, nnx.Param)), x)


@dataclasses.dataclass(frozen=True)
class MLPApply:
    """Pure ``apply_fn(params, x) -> (n, out_dim)`` for an :class:`MLPSpec`.

    Hashable (safe as a static jit argument). Exposes the dense-layer structure
    (``spec``) so the structured empirical NTK can use it.
    """

    spec: MLPSpec

    def __call__(self, params, x: Array) -> Array:
        out, _ = self.forward(params, x)
        return out

    def forward(self, params, x: Array, taps=None):
        """Forward pass returning ``(output, layer_inputs)``.

        Args:
          params: MLP parameter pytree.
          x: inputs ``(n, in_dim)``.
          taps: optional list of ``depth + 1`` arrays (or None entries, meaning
            no tap) added to each layer's pre-activation ``z^(h)`` (zeros give
            the plain forward pass); the vjp with respect to them is the
            backward vector ``b^(h) = df/dz^(h)``.

        Returns:
          ``(out (n, out_dim), [a^(0) = x, a^(1), ..., a^(depth)])`` where
          ``a^(h)`` is the input of dense layer ``h``.
        """
        layers = params["layers"]
        n_layers = self.spec.depth + 1
        if len(layers) != n_layers:
            raise ValueError(
                f"params have {len(layers)} dense layers but the spec needs {n_layers}"
            )
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != layers[0]["W"].shape[0]:
            raise ValueError(
                f"inputs must have shape (n, {layers[0]['W'].shape[0]}), got {tuple(x.shape)}"
            )
        act = self.spec.act
        a, layers = promote(x, layers)  # JAX promotion: no silent downcast
        inputs = []
        for h in range(n_layers):
            p = layers[h]
            inputs.append(a)
            z = _pre_activation(self.spec, p, a, jnp.matmul, h)
            if taps is not None and taps[h] is not None:
                z = z + taps[h]
            a = act.fn(z) if h < n_layers - 1 else z
        return a, inputs

    def vjp(self, params, x: Array):
        """Forward pass and a hand-written pullback: ``(out, pullback)``.

        Equal to ``jax.vjp(lambda p: self(p, x), params)`` (to rounding), but
        the backward pass is spelled out layer by layer (chain rule; Jacot et
        al. 2018, eq. 1):

            dL/dW^(h) = w_mult_h  a^(h)T g^(h),    dL/db^(h) = b_mult_h sum_i g^(h)_i,
            g^(h-1)   = sigma'(z^(h-1)) * (w_mult_h  g^(h) W^(h)T),

        with ``g^(h) = dL/dz^(h)``. The layer inputs are transposed once, as
        small ``(n_in, n)`` arrays, so that each weight gradient is a plain
        ``(n_in, n) @ (n, n_out)`` matmul: XLA:CPU otherwise contracts over
        the batch axis in place, measured 3x slower for the many small
        matmuls of short-batch training (``benchmarks/bench_training.py``).
        Layers with at most 4 inputs (low-dimensional data, as in Jacot et al.
        Fig. 2) are written as sums of outer products, which fuse with the
        bias and activation instead of running as separate matmuls (measured
        15% of a width-50 step).
        :func:`ntkexp.training.train` uses this pullback when the model has
        one. Reverse mode only: it is not itself differentiable in forward
        mode (``jvp`` of the pullback), which training never needs.

        Args:
          params: MLP parameter pytree.
          x: inputs ``(n, in_dim)``.

        Returns:
          ``(out (n, out_dim), pullback)``; ``pullback(ct)`` maps a cotangent
          ``ct`` of shape ``(n, out_dim)`` to a gradient pytree shaped like
          ``params``.
        """
        layers = params["layers"]
        n_layers = self.spec.depth + 1
        act = self.spec.act
        x = jnp.asarray(x)
        if len(layers) != n_layers or x.ndim != 2 or x.shape[1] != layers[0]["W"].shape[0]:
            self.forward(params, x)  # raises the forward pass's one-line error
        # forward pass, keeping each layer input and the activation's pullback
        inputs, pulls = [], []
        stored = layers
        a, layers = promote(x, layers)
        for h in range(n_layers):
            p = layers[h]
            inputs.append(a)
            z = _pre_activation(self.spec, p, a, _matmul, h)
            if h < n_layers - 1:
                a, pull = jax.vjp(act.fn, z)
                pulls.append(pull)
            else:
                a = z
        out = a

        def pullback(ct):
            g = jnp.asarray(ct, out.dtype)
            grads = [None] * n_layers
            for h in reversed(range(n_layers)):
                p = layers[h]
                w_mult, b_mult = layer_scales(self.spec, p["W"].shape[0], h)
                # gradients in the parameters' dtype, as jax.vjp gives them
                dt = {k: v.dtype for k, v in stored[h].items()}
                grads[h] = {"W": (w_mult * _weight_grad(inputs[h], g)).astype(dt["W"])}
                if "b" in p:
                    grads[h]["b"] = (b_mult * jnp.sum(g, axis=0)).astype(dt["b"])
                if h > 0:
                    # g W^T as one dot_general (no transposed copy of W)
                    ga = jax.lax.dot_general(g, p["W"], (((1,), (1,)), ((), ())))
                    g = pulls[h - 1](w_mult * ga)[0]
            return {"layers": {h: grads[h] for h in range(n_layers)}}

        return out, pullback

    def structure(self, params, x: Array) -> MLPStructure:
        """Layer inputs and backward vectors for the structured empirical NTK.

        One forward pass (with zero taps on the hidden pre-activations) and one
        vjp per output component with respect to the taps give every backward
        vector ``b^(h) = df/dz^(h)``; no parameter gradient is formed. Cost
        ``O(n P out_dim)``.

        Args:
          params: MLP parameter pytree.
          x: inputs ``(n, in_dim)``.

        Returns:
          An :class:`MLPStructure`.
        """
        spec = self.spec
        layers = params["layers"]
        dtype = promote(x, layers)[0].dtype
        n = jnp.shape(x)[0]
        taps = [jnp.zeros((n, spec.width), dtype) for _ in range(spec.depth)]

        def f(t):
            out, inputs = self.forward(params, x, list(t) + [None])
            return out, inputs

        out, vjp_fn, inputs = jax.vjp(f, taps, has_aux=True)
        out_dim = out.shape[1]
        if spec.depth == 0:
            backward = ()
        elif out_dim == 1:
            backward = tuple(b[:, None, :] for b in vjp_fn(jnp.ones_like(out))[0])
        else:
            eye = jnp.eye(out_dim, dtype=out.dtype)
            cots = jnp.broadcast_to(eye[:, None, :], (out_dim, n, out_dim))
            bs = jax.vmap(lambda c: vjp_fn(c)[0])(cots)  # each (out, n, width)
            backward = tuple(jnp.swapaxes(b, 0, 1) for b in bs)
        w_mults, b_mults = [], []
        for h, p in ((h, layers[h]) for h in range(spec.depth + 1)):
            wm, bm = layer_scales(spec, p["W"].shape[0], h)
            w_mults.append(wm)
            b_mults.append(bm if "b" in p else 0.0)
        return MLPStructure(out, tuple(inputs), backward, tuple(w_mults), tuple(b_mults))


    # ---- model protocol (structured NTK, diagnostics); see ntkexp.layers.network ----
    def structure_features(self, params, x: Array):
        """``(inputs, backward)`` of :meth:`structure` (the structured-NTK protocol)."""
        st = self.structure(params, x)
        return tuple(st.inputs), tuple(st.backward)

    def structure_pair(self, f1, f2, *, full: bool) -> Array:
        """Structured NTK block (Jacot et al. 2018, eq. 1; see ``MLPStructure``)::

            Theta_ab(x, x') = sum_h (w_h^2 <a_h(x), a_h(x')> + beta_h^2) <b_h,a(x), b_h,b(x')>.

        Returns ``(n1, n2)`` (traced over outputs) or ``(n1, n2, out, out)``.
        """
        (inputs1, back1), (inputs2, back2) = f1, f2
        spec = self.spec
        L = len(inputs1) - 1
        out_dim = spec.out_dim
        K = None
        for h in range(L + 1):
            w_mult, b_mult = layer_scales(spec, inputs1[h].shape[-1], h)
            c = (w_mult**2) * (inputs1[h] @ inputs2[h].T)
            if spec.has_bias:
                c = c + b_mult**2
            if h < L:
                u, v = back1[h], back2[h]  # (m, out, width)
                if full:
                    term = c[:, :, None, None] * jnp.einsum("iaw,jbw->ijab", u, v)
                else:
                    term = c * (u.reshape(u.shape[0], -1) @ v.reshape(v.shape[0], -1).T)
            elif full:
                eye = jnp.eye(out_dim, dtype=c.dtype)
                term = c[:, :, None, None] * eye[None, None]
            else:
                term = out_dim * c
            K = term if K is None else K + term
        return K

    @property
    def structured_available(self) -> bool:
        return True

    def readout_features(self, params, x: Array):
        """``(a, w2, b2)``: last hidden features ``(n, width)`` and the readout's
        initial weight and bias variances (``W_std^2 / fan_in``, ``b_std^2`` under
        ntk and standard; the empirical NNGP, Lee et al. 2018)."""
        a = self.forward(params, x)[1][-1]
        spec, fan_in, h = self.spec, a.shape[-1], self.spec.depth
        (wm, bm), (wi, bi) = layer_scales(spec, fan_in, h), init_scales(spec, fan_in, h)
        if spec.parameterization in ("ntk", "standard"):
            return a, spec.W_std**2 / fan_in, spec.b_std**2
        return a, (wm * wi) ** 2, (bm * bi) ** 2

    def preactivations(self, params, x: Array) -> list[Array]:
        """Hidden pre-activations ``[(n, width)] * depth`` (pattern-flip diagnostics)."""
        spec = self.spec
        layers = params["layers"]
        a = jnp.asarray(x).astype(layers[0]["W"].dtype)
        zs = []
        for h in range(spec.depth):
            z = _pre_activation(spec, layers[h], a, jnp.matmul, h)
            zs.append(z)
            a = spec.act.fn(z)
        return zs

    @property
    def has_hidden_units(self) -> bool:
        return self.spec.depth >= 1

    def hidden_weights(self, params):
        """Incoming weights ``(width, d)`` of the first hidden layer, or None for depth 0."""
        if self.spec.depth < 1:
            return None
        return params["layers"][0]["W"].T

    def layers(self):
        """This MLP as a layer composition (:mod:`ntkexp.layers`)."""
        return mlp_layers(self.spec)


def mlp_layers(spec: MLPSpec):
    """The MLP as ``serial(dense, act, ..., dense(out))`` (same parameters' draw order).

    Raises:
      ParameterizationError: ``mup`` / ``mean_field``, whose limit is not a kernel
        (the layer compositions carry kernel maps).
    """
    P.require_kernel_limit(spec.parameterization)
    kw = dict(W_std=spec.W_std, b_std=spec.b_std, parameterization=spec.parameterization)
    ls = []
    for _ in range(spec.depth):
        ls += [DenseLayer(spec.width, **kw),
               Activation(spec.activation, spec.activation_params)]
    ls.append(DenseLayer(spec.out_dim, readout=True, **kw))
    return serial(*ls)


class MLPStructure(NamedTuple):
    """Per-layer factors of an MLP's parameter gradients (see :meth:`MLPApply.structure`).

    With ``a^(h)`` the input of dense layer ``h`` and ``b^(h) = df/dz^(h)`` the
    backward vector at its pre-activation, ``df/dW^(h) = w_mult_h a^(h) b^(h)^T``
    and ``df/db^(h) = b_mult_h b^(h)`` (Jacot et al. 2018, eq. 1; chain rule).

    Attributes:
      out: network output ``(n, out_dim)``.
      inputs: ``depth + 1`` arrays ``a^(h)`` of shape ``(n, n_in_h)``
        (``a^(0) = x``).
      backward: ``depth`` arrays ``b^(h)`` of shape ``(n, out_dim, width)`` for
        the hidden layers ``h = 0 .. depth-1``; the output layer's backward
        vector is the identity ``df_a/dz^(depth)_c = delta_ac`` and is omitted.
      w_mults: ``depth + 1`` forward weight multipliers (``layer_scales``).
      b_mults: ``depth + 1`` bias multipliers; 0.0 where the layer has no bias.
    """

    out: Array
    inputs: tuple
    backward: tuple
    w_mults: tuple
    b_mults: tuple


def _pre_activation(spec: MLPSpec, p, a: Array, matmul, layer: int | None = None) -> Array:
    """``z = w_mult * matmul(a, W) + b_mult * b`` for dense layer ``layer``'s params ``p``."""
    w_mult, b_mult = layer_scales(spec, p["W"].shape[0], layer)
    z = w_mult * matmul(a, p["W"])
    if "b" in p:
        z = z + b_mult * p["b"][None, :]
    return z


_SMALL_FAN_IN = 4


def _matmul(a: Array, W: Array) -> Array:
    """``a @ W``; for fan-in <= 4 a sum of ``fan_in`` broadcast products (one fused loop)."""
    if W.shape[0] > _SMALL_FAN_IN:
        return a @ W
    return sum(a[:, i:i + 1] * W[i][None, :] for i in range(W.shape[0]))


_SMALL_BATCH = 128


def _weight_grad(a: Array, g: Array) -> Array:
    """``a.T @ g`` ``(n_in, n_out)`` for layer inputs ``a`` ``(n, n_in)``, cotangents ``g``.

    Fan-in <= 4: one column reduction per input. Batches of at most 128 rows:
    ``a.T`` is materialised first (XLA:CPU's small matmuls contracting over
    axis 0 in place measured 3x slower). Larger batches contract in place,
    as autodiff does (materialising ``a.T`` there measured 15% slower at
    n = 1024, width 2048).
    """
    if a.shape[1] <= _SMALL_FAN_IN:
        return jnp.stack([jnp.sum(a[:, i:i + 1] * g, axis=0) for i in range(a.shape[1])])
    if a.shape[0] <= _SMALL_BATCH:
        return _transposed(a) @ g
    return jax.lax.dot_general(a, g, (((0,), (0,)), ((), ())))


def _transposed(a: Array) -> Array:
    """``a.T`` materialised: the barrier stops XLA folding the transpose back into the dot."""
    return jax.lax.optimization_barrier(jnp.swapaxes(a, -1, -2))


def init_params(spec: MLPSpec, in_dim: int, key: Array, dtype=None):
    """Draw MLP parameters as a pure pytree (same draw as ``MLP(spec, in_dim, rngs)``)."""
    model = MLP(spec, in_dim, rngs=nnx.Rngs(params=key), dtype=dtype)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def functional(module: nnx.Module):
    """Split a Flax NNX module into ``(apply_fn, params)``.

    ``apply_fn(params, x)`` is a pure function over the parameter pytree
    ``params`` (a nested dict of arrays). For :class:`MLP` it is an
    :class:`MLPApply` (structured NTK available); for any other NNX module
    non-parameter state (batch statistics, RNG counters) is frozen at its
    current value.
    """
    if isinstance(module, MLP):
        return MLPApply(module.spec), nnx.to_pure_dict(nnx.state(module, nnx.Param))
    if not isinstance(module, nnx.Module):
        raise TypeError(f"functional() takes a flax.nnx.Module, got {type(module).__name__}")
    graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)
    template = param_state

    def apply_fn(params, x):
        state = nnx.State(jax.tree_util.tree_map(lambda v: v, template))
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state, rest)
        return model(x)

    return apply_fn, nnx.to_pure_dict(param_state)
