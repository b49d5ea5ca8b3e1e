"""A layer composition as a network: pure ``apply_fn``, parameters, analytic kernel.

:class:`Network` is the hashable ``apply_fn(params, x)`` of a composition (what
training, the empirical NTK and the optimizers take); it also implements the
model protocol the rest of ntkexp asks for, so that no module outside
``layers``/``models`` names an architecture:

* ``structure_features(params, x)`` / ``structure_pair(f1, f2, full=)``: the
  structured empirical NTK (:mod:`ntkexp.empirical`), from each trained
  parameterised layer's input ``a`` and backward vector ``b = df/dy``
  (:meth:`~ntkexp.layers.base.Layer.structured_ntk`); ``structured_available``
  tells whether every such layer has a structured form;
* ``preactivations(params, x)`` / ``hidden_weights(params)``: pattern-flip and
  weight-distance diagnostics (:mod:`ntkexp.theory`);
* ``trainable_mask(params)``: False under :func:`~ntkexp.layers.combinators.frozen`.

:func:`composition_kernel` is the infinite-width limit of a composition; a
plain dense stack goes to the MLP recursion of :mod:`ntkexp.kernels.analytic`
(same numbers and speed as ``arch: mlp``) and a plain conv stack to the
fused map of :mod:`ntkexp.kernels.cnn`, by the one rule table of
:mod:`ntkexp.layers.fused`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.kernels.base import Kernel
from ntkexp.layers.activation import Activation
from ntkexp.layers.base import Layer, Shape, input_state
from ntkexp.layers.combinators import Frozen, Parallel, Serial, Tape
from ntkexp.layers.dense import Dense
from ntkexp.layers.fused import CONV_OPTIONS, MLP_OPTIONS, fused_kernel

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Network:
    """Pure ``apply_fn(params, x) -> (n, out_dim)`` of a layer composition (hashable).

    Attributes:
      layer: the composition.
      in_shape: input shape without the batch axis (``(d,)``, ``(P, C)``, ``(H, W, C)``).
      reshape: optional per-example shape the inputs are reshaped to before the
        first layer (e.g. ``(P, C)`` for flat ``(n, P C)`` data of 1-D signals,
        channels last); None keeps ``in_shape``.
    """

    layer: Layer
    in_shape: Shape
    reshape: Shape | None = None

    def __post_init__(self):
        object.__setattr__(self, "in_shape", tuple(int(s) for s in self.in_shape))
        if self.reshape is not None:
            rs = tuple(int(s) for s in self.reshape)
            if int(np.prod(rs)) != int(np.prod(self.in_shape)):
                raise ValueError(f"input_shape {rs} does not hold inputs of shape "
                                 f"{self.in_shape} ({int(np.prod(self.in_shape))} values)")
            object.__setattr__(self, "reshape", rs)
        out = self.layer.out_shape(self.layer_in_shape)
        if len(out) != 1:
            raise ValueError(
                f"the network's output must be flat (n, out_dim), got per-example shape {out}; "
                "end with flatten or global_avg_pool and a dense readout")

    @property
    def layer_in_shape(self) -> Shape:
        """The first layer's per-example input shape."""
        return self.in_shape if self.reshape is None else self.reshape

    @property
    def out_dim(self) -> int:
        return self.layer.out_shape(self.layer_in_shape)[0]

    def init(self, key, dtype=None):
        """Parameters (pure pytree) drawn from ``key``."""
        return self.layer.init(key, self.layer_in_shape, dtype)

    def _inputs(self, params, x):
        x = jnp.asarray(x)
        if x.shape[1:] != self.in_shape:
            raise ValueError(
                f"inputs must have shape (n, {', '.join(map(str, self.in_shape))}), "
                f"got {tuple(x.shape)}")
        leaves = jax.tree_util.tree_leaves(params)
        if leaves:
            x = x.astype(leaves[0].dtype)
        if self.reshape is not None:
            x = x.reshape(x.shape[0], *self.reshape)
        return x

    def __call__(self, params, x: Array) -> Array:
        return self.layer.apply(params, self._inputs(params, x))

    # ---- protocol: structured empirical NTK ------------------------------
    def tapped_layers(self) -> tuple[Layer, ...]:
        """The trained parameterised layers, in forward order (what the taps follow)."""
        out: list[Layer] = []

        def walk(la):
            if isinstance(la, Frozen):
                return
            if la.children():
                for c in la.children():
                    walk(c)
            elif la.has_params:
                out.append(la)

        walk(self.layer)
        return tuple(out)

    @property
    def structured_available(self) -> bool:
        """Whether every tapped layer has a structured NTK form (Dense; Conv)."""
        ls = self.tapped_layers()
        return bool(ls) and all(type(la).structured_ntk is not Layer.structured_ntk for la in ls)

    def structure_features(self, params, x: Array):
        """``(inputs, backward)``: each tapped layer's input ``(n, *in)`` and
        ``df_o/dy`` at its output ``(n, out_dim, *out)``."""
        x = self._inputs(params, x)

        def outs(p, xx):
            t = Tape(None)
            self.layer.apply_tapped(p, xx, t)
            return t.outputs

        shapes = jax.eval_shape(outs, params, x)
        taps = [jnp.zeros(s.shape, s.dtype) for s in shapes]

        def f(t):
            tape = Tape(list(t))
            out = self.layer.apply_tapped(params, x, tape)
            return out, tuple(a for _, _, a in tape.entries)

        out, vjp_fn, inputs = jax.vjp(f, taps, has_aux=True)
        n, o = out.shape
        eye = jnp.eye(o, dtype=out.dtype)
        cots = jnp.broadcast_to(eye[:, None, :], (o, n, o))
        bs = jax.vmap(lambda c: vjp_fn(c)[0])(cots)  # each (o, n, *out_h)
        backward = tuple(jnp.swapaxes(b, 0, 1) for b in bs)
        return tuple(inputs), backward

    def structure_pair(self, f1, f2, *, full: bool):
        """NTK block ``(n1, n2)`` (sum over outputs) or ``(n1, n2, o, o)`` from features."""
        (in1, bk1), (in2, bk2) = f1, f2
        K = None
        for la, a1, a2, b1, b2 in zip(self.tapped_layers(), in1, in2, bk1, bk2, strict=True):
            term = la.structured_ntk(a1, a2, b1, b2, full=full)
            K = term if K is None else K + term
        return K

    # ---- protocol: diagnostics -------------------------------------------
    def preactivations(self, params, x: Array) -> list[Array]:
        """Inputs of every activation layer, each flattened to ``(n, units)``."""
        x = self._inputs(params, x)
        tape = Tape(None)
        self.layer.apply_tapped(params, x, tape)
        return [z.reshape(z.shape[0], -1) for z in tape.preacts]

    @property
    def has_hidden_units(self) -> bool:
        """Whether there is an activation after a trained Dense (pattern diagnostics apply)."""
        return _first_dense_path(self.layer) is not None and any(
            isinstance(la, Activation) for la in _leaves(self.layer))

    def readout_features(self, params, x: Array):
        """``(a, w2, b2)``: the final Dense readout's input features ``(n, fan_in)`` and its
        ``W_std^2 / fan_in``, ``b_std^2`` (the empirical NNGP), or None."""
        la = self.layer
        if not (isinstance(la, Serial) and la.layers and isinstance(la.layers[-1], Dense)):
            return None
        x = self._inputs(params, x)
        for i, sub in enumerate(la.layers[:-1]):
            x = sub.apply(params[i], x)
        if x.ndim != 2:
            return None
        d = la.layers[-1]
        return x, d.W_std**2 / x.shape[-1], d.b_std**2

    def hidden_weights(self, params):
        """Incoming weights ``(m, d)`` of the first trained Dense layer's units, or None."""
        path = _first_dense_path(self.layer)
        if path is None:
            return None
        p = params
        for i in path:
            p = p[i]
        return p["W"].T

    def trainable_mask(self, params):
        """Pytree of bools like ``params``: False for the leaves under ``frozen``."""
        return _mask(self.layer, params, True)


def _first_dense_path(layer: Layer, path=()):
    if isinstance(layer, Dense):
        return path
    if isinstance(layer, Frozen):
        return None
    for i, c in enumerate(layer.children()):
        r = _first_dense_path(c, path + (i,))
        if r is not None:
            return r
        if not isinstance(layer, Parallel):
            if any(True for _ in _leaves_with_params(c)):
                return None
    return None


def _leaves(layer):
    if layer.children():
        for c in layer.children():
            yield from _leaves(c)
    else:
        yield layer


def _leaves_with_params(layer):
    if layer.children():
        for c in layer.children():
            yield from _leaves_with_params(c)
    elif layer.has_params:
        yield layer


def _mask(layer: Layer, params, on: bool):
    if isinstance(layer, Frozen):
        return jax.tree_util.tree_map(lambda _: False, params)
    if layer.children():
        return {i: _mask(c, params[i], on) for i, c in enumerate(layer.children())}
    return jax.tree_util.tree_map(lambda _: on, params)


# --------------------------------------------------------------------------
# Width substitution (width sweeps, Monte Carlo)
# --------------------------------------------------------------------------


def with_width(layer: Layer, width: int) -> Layer:
    """``layer`` with every hidden (non-readout) layer's ``width`` set to ``width``."""
    if isinstance(layer, Serial):
        return Serial(tuple(with_width(c, width) for c in layer.layers))
    if isinstance(layer, Parallel):
        return Parallel(tuple(with_width(c, width) for c in layer.branches), layer.scales)
    if isinstance(layer, Frozen):
        return Frozen(with_width(layer.layer, width))
    if dataclasses.is_dataclass(layer):
        names = {f.name for f in dataclasses.fields(layer)}
        if "width" in names and not getattr(layer, "readout", False):
            return dataclasses.replace(layer, width=int(width))
    return layer


# --------------------------------------------------------------------------
# Analytic kernel
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("layer", "sym"))
def _composition_kernel(layer: Layer, x1, x2, sym: bool) -> Kernel:
    state = layer.kernel(input_state(x1, x1 if sym else x2))
    if state.is_spatial:
        raise ValueError(
            "the composition's output is still spatial; end with flatten or global_avg_pool")
    nngp, ntk = state.nngp, state.ntk
    if sym:
        nngp, ntk = _mirror(nngp), _mirror(ntk)
    return Kernel(nngp, ntk)


def _mirror(k):
    r = jnp.arange(k.shape[0])
    return jnp.where(r[:, None] <= r[None, :], k, k.T)


def _as_inputs(x, name: str):
    try:
        arr = jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array of numbers: {e}") from None
    if arr.ndim < 2 or arr.shape[0] == 0 or 0 in arr.shape[1:]:
        raise ValueError(f"{name} must have shape (n, ..., C) with no empty axis, got "
                         f"{tuple(arr.shape)}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        if jnp.issubdtype(arr.dtype, jnp.complexfloating):
            raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
        arr = arr.astype(jnp.result_type(float))
    if not isinstance(arr, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(arr))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def composition_kernel(layer: Layer, x1, x2=None, *, fused: bool = True,
                       **options) -> Kernel:
    """Infinite-width NNGP and NTK (per output) of a layer composition.

    The one kernel path: the layer-by-layer map, or, where the rule table of
    :mod:`ntkexp.layers.fused` matches (a plain dense stack, a plain conv
    stack), its fused map with the same numbers.

    Args:
      layer: a :class:`~ntkexp.layers.base.Layer` (or a :class:`Network`).
      x1: inputs ``(n1, d)``, ``(n1, P, C)`` or ``(n1, H, W, C)``.
      x2: like ``x1`` or None for ``x2 = x1`` (then exactly symmetric).
      fused: False runs the layer-by-layer map even where a rule matches.
      options: for a fused map (``block_size``, ``exact_angles``, ``degree``,
        ``nodes`` for the MLP recursion; ``pixel_pairs``, ``block_entries`` for
        the conv stack); the layer map ignores them.

    Returns:
      ``Kernel(nngp=(n1, n2), ntk=(n1, n2))`` in the inputs' floating dtype.

    Raises:
      ValueError: inputs the composition cannot take, an output that is not
        flat, an activation on a non-Gaussian state.
    """
    reshape = None
    if isinstance(layer, Network):
        layer, reshape = layer.layer, layer.reshape
    if not isinstance(layer, Layer):
        raise TypeError(f"expected a Layer, got {type(layer).__name__}")
    sym = x2 is None
    x1 = _as_inputs(x1, "x1")
    x2 = x1 if sym else _as_inputs(x2, "x2")
    if reshape is not None:
        x1 = x1.reshape(x1.shape[0], *reshape)
        x2 = x1 if sym else x2.reshape(x2.shape[0], *reshape)
    if x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"x1 and x2 must have the same per-example shape, got "
                         f"{tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}")
    if x1.dtype != x2.dtype:
        dt = jnp.promote_types(x1.dtype, x2.dtype)
        x1, x2 = x1.astype(dt), x2.astype(dt)
    out = layer.out_shape(tuple(x1.shape[1:]))
    if len(out) != 1:
        raise ValueError(f"the composition's output must be flat, got per-example shape {out}")
    unknown = set(options) - set(MLP_OPTIONS) - set(CONV_OPTIONS)
    if unknown:
        raise TypeError(f"unknown kernel option(s) {sorted(unknown)}; known: "
                        f"{', '.join(MLP_OPTIONS + CONV_OPTIONS)}")
    if fused:
        k = fused_kernel(layer, x1, None if sym else x2, **options)
        if k is not None:
            return k
    return _composition_kernel(layer, x1, x1 if sym else x2, sym)


def init_network(layer: Layer, in_shape: Shape, key, dtype=None, *,
                 reshape: Shape | None = None) -> tuple[Network, Any]:
    """``(apply_fn, params)`` of a composition for inputs of shape ``in_shape``."""
    net = Network(layer, tuple(in_shape), reshape)
    return net, net.init(key, dtype)


__all__ = ["Network", "composition_kernel", "init_network", "with_width"]
