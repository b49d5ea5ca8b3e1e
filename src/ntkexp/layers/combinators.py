"""Combinators: ``serial``, ``parallel`` (+ sum with branch scales), ``residual``, ``frozen``.

Each returns a :class:`~ntkexp.layers.base.Layer`, so they nest. Parameters of a
combinator are a dict keyed by the position of each sub-layer (``{0: ..., 1: ...}``),
like the MLP's ``{"layers": {i: ...}}``.

Kernel maps (Novak et al. 2020, ``stax.serial`` / ``parallel`` + ``FanInSum``;
Huang et al. 2020 and Yang & Schoenholz 2017 for residual branches):

* ``serial``: the composition of the maps.
* ``parallel(*branches, scales=s)``: ``y = sum_k s_k branch_k(x)``;
  ``nngp' = sum_k s_k^2 nngp_k`` and ``ntk' = sum_k s_k^2 ntk_k``. The cross
  terms vanish in the limit because every branch but at most one ends in a
  parameterised layer with fresh zero-mean weights (checked: two branches
  without one, e.g. two identities, raise ``ValueError``).
* ``residual(*branch, scale=a)``: ``y = x + a serial(*branch)(x)``.
* ``frozen(layer)``: the same forward pass with the layer's parameters not
  trained (``stop_gradient``; training masks them out); its map adds no NTK
  contribution of its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
from flax import nnx

from ntkexp.layers.base import KernelState, Layer, LayerModule, Shape

Array = jax.Array


class Tape:
    """Trace-time recorder threaded through :meth:`Layer.apply_tapped`.

    Records, in forward order, every trained parameterised layer's
    ``(layer, params, input)`` (adding ``taps[i]`` to its output when taps are given:
    the vjp with respect to the taps gives the backward vectors ``df/dy``) and
    every activation's input (its pre-activation, for pattern-flip diagnostics).
    """

    def __init__(self, taps=None):
        self.taps = taps
        self.entries: list[tuple[Layer, Any, Array]] = []
        self.outputs: list[Array] = []
        self.preacts: list[Array] = []
        self.frozen = 0

    def leaf(self, layer: Layer, params, x: Array, y: Array) -> Array:
        if layer.kind == "activation":
            self.preacts.append(x)
        if layer.has_params and not self.frozen:
            i = len(self.entries)
            self.entries.append((layer, params, x))
            if self.taps is not None:
                y = y + self.taps[i]
            self.outputs.append(y)
        return y


def _as_layer(obj, where: str) -> Layer:
    if not isinstance(obj, Layer):
        raise TypeError(f"{where} must be a Layer, got {type(obj).__name__}")
    return obj


@dataclasses.dataclass(frozen=True)
class Serial(Layer):
    """Layers applied one after another (``serial(*layers)``)."""

    layers: tuple = ()
    kind: ClassVar[str] = "serial"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(
            _as_layer(la, f"serial layer {i}") for i, la in enumerate(self.layers)))

    def children(self) -> Sequence[Layer]:
        return self.layers

    @property
    def has_params(self) -> bool:  # noqa: D401 - property overriding a class attribute
        return False

    def out_shape(self, in_shape: Shape) -> Shape:
        s = tuple(in_shape)
        for la in self.layers:
            s = la.out_shape(s)
        return s

    def module(self, in_shape: Shape, *, rngs: nnx.Rngs, dtype=None):
        return LayerModule(self, in_shape, rngs=rngs, dtype=dtype)

    def apply(self, params, x: Array) -> Array:
        for i, la in enumerate(self.layers):
            x = la.apply(params[i], x)
        return x

    def apply_tapped(self, params, x, tape: Tape):
        for i, la in enumerate(self.layers):
            x = la.apply_tapped(params[i], x, tape)
        return x

    def kernel(self, state: KernelState) -> KernelState:
        for la in self.layers:
            state = la.kernel(state)
        return state

    def ends_fresh(self) -> bool:
        """Whether the output is a fresh zero-mean parameterised layer's (see ``parallel``)."""
        return bool(self.layers) and _ends_fresh(self.layers[-1])


def _ends_fresh(layer: Layer) -> bool:
    if isinstance(layer, (Serial, Frozen)):
        return layer.ends_fresh()
    if isinstance(layer, Parallel):
        return all(_ends_fresh(b) for b in layer.branches)
    return bool(layer.has_params)


@dataclasses.dataclass(frozen=True)
class Parallel(Layer):
    """``y = sum_k scales[k] * branches[k](x)`` (``parallel(*branches, scales=...)``)."""

    branches: tuple = ()
    scales: tuple = ()
    kind: ClassVar[str] = "parallel"

    def __post_init__(self):
        br = tuple(_as_layer(b, f"parallel branch {i}") for i, b in enumerate(self.branches))
        if not br:
            raise ValueError("parallel needs at least one branch")
        sc = tuple(self.scales) if self.scales else (1.0,) * len(br)
        if len(sc) != len(br):
            raise ValueError(f"parallel has {len(br)} branches but {len(sc)} scales")
        for s in sc:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"parallel scales must be finite numbers, got {s!r}")
        if sum(not _ends_fresh(b) for b in br) > 1:
            raise ValueError(
                "parallel: at most one branch may end without a parameterised layer "
                "(dense/conv): otherwise the branches are correlated and their sum has no "
                "simple limit")
        object.__setattr__(self, "branches", br)
        object.__setattr__(self, "scales", tuple(float(s) for s in sc))

    @property
    def has_params(self) -> bool:
        return False

    def children(self) -> Sequence[Layer]:
        return self.branches

    def out_shape(self, in_shape: Shape) -> Shape:
        shapes = [b.out_shape(in_shape) for b in self.branches]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"parallel branches give different output shapes: {shapes}")
        return shapes[0]

    def module(self, in_shape: Shape, *, rngs: nnx.Rngs, dtype=None):
        return LayerModule(self, in_shape, rngs=rngs, dtype=dtype)

    def apply(self, params, x: Array) -> Array:
        out = None
        for i, (b, s) in enumerate(zip(self.branches, self.scales, strict=True)):
            y = b.apply(params[i], x)
            y = y if s == 1.0 else s * y
            out = y if out is None else out + y
        return out

    def apply_tapped(self, params, x, tape: Tape):
        out = None
        for i, (b, s) in enumerate(zip(self.branches, self.scales, strict=True)):
            y = b.apply_tapped(params[i], x, tape)
            y = y if s == 1.0 else s * y
            out = y if out is None else out + y
        return out

    def kernel(self, state: KernelState) -> KernelState:
        outs = [b.kernel(state) for b in self.branches]
        first = outs[0]
        for o in outs[1:]:
            if o.spatial != first.spatial or o.channels != first.channels:
                raise ValueError("parallel branches give different output shapes")

        def total(name):
            acc = None
            for o, s in zip(outs, self.scales, strict=True):
                v = (s * s) * getattr(o, name)
                acc = v if acc is None else acc + v
            return acc

        return first.replace(nngp=total("nngp"), ntk=total("ntk"), cov1=total("cov1"),
                             cov2=total("cov2"),
                             is_gaussian=all(o.is_gaussian for o in outs))


@dataclasses.dataclass(frozen=True)
class Frozen(Layer):
    """``layer`` with its parameters held at their initial values (``frozen(layer)``)."""

    layer: Layer = None
    kind: ClassVar[str] = "frozen"

    def __post_init__(self):
        _as_layer(self.layer, "frozen layer")

    @property
    def has_params(self) -> bool:
        return False

    def children(self) -> Sequence[Layer]:
        return (self.layer,)

    def ends_fresh(self) -> bool:
        return _ends_fresh(self.layer)

    def out_shape(self, in_shape: Shape) -> Shape:
        return self.layer.out_shape(in_shape)

    def init(self, key, in_shape: Shape, dtype=None):
        return self.layer.init(key, in_shape, dtype)

    def module(self, in_shape: Shape, *, rngs: nnx.Rngs, dtype=None):
        return self.layer.module(in_shape, rngs=rngs, dtype=dtype)

    def apply(self, params, x: Array) -> Array:
        return self.layer.apply(jax.lax.stop_gradient(params), x)

    def apply_tapped(self, params, x, tape: Tape):
        tape.frozen += 1
        try:
            return self.layer.apply_tapped(jax.lax.stop_gradient(params), x, tape)
        finally:
            tape.frozen -= 1

    def kernel(self, state: KernelState) -> KernelState:
        out = self.layer.kernel(state.replace(trainable=False))
        return out.replace(trainable=state.trainable)


def serial(*layers: Layer) -> Serial:
    """Layers applied one after another."""
    return Serial(tuple(layers))


def parallel(*branches: Layer, scales: Sequence[float] | None = None) -> Parallel:
    """Branches applied to the same input, summed with weights ``scales`` (default 1)."""
    return Parallel(tuple(branches), tuple(scales) if scales is not None else ())


def residual(*branch: Layer, scale: float = 1.0) -> Parallel:
    """``y = x + scale * serial(*branch)(x)`` (pre-activation residual block)."""
    return Parallel((Serial(()), Serial(tuple(branch))), (1.0, float(scale)))


def frozen(layer: Layer) -> Frozen:
    """``layer`` with untrained parameters (no NTK contribution of its own)."""
    return Frozen(layer)


__all__ = ["Frozen", "Parallel", "Serial", "Tape", "frozen", "parallel", "residual", "serial"]
