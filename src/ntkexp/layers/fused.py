"""The one rule table: which fused kernel map replaces the layer-by-layer map.

:func:`ntkexp.layers.composition_kernel` computes the infinite-width limit of
any composition layer by layer (each layer's :meth:`~ntkexp.layers.base.Layer.kernel`
on the :class:`~ntkexp.layers.base.KernelState`). Two shapes of composition
have a fused map that gives the same numbers (tested equal to the layer map to
1e-13 in float64, ``tests/layers/test_fused.py``) faster or in less memory:

* ``mlp``: flat inputs, ``[Dense, Activation] * depth + [Dense]`` with one
  activation, equal hidden widths and equal ``W_std``/``b_std``/parameterization
  (``depth >= 0``) -> :func:`ntkexp.kernels.analytic.mlp_kernel` (the tiled MLP
  recursion, exact angles for the relu family; Jacot et al. 2018, Lee et al. 2019).
* ``conv_stack``: 1-D or 2-D images, ``[Conv(q, SAME, stride 1), Activation] *
  depth + [GlobalAvgPool | Flatten, Dense]`` (``depth >= 0``), NTK
  parameterization, one ``W_std``/``b_std``, an activation with a closed form ->
  :func:`ntkexp.kernels.cnn.conv_stack_kernel` (pairs in cache-sized blocks;
  Arora et al. 2019, CNTK-GAP and CNTK-V).

:data:`RULES` is that table; :func:`fused_rule` tells which rule (if any) a
composition takes, :func:`fused_kernel` runs it. Nothing else in ntkexp picks a
kernel code path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ntkexp.kernels.analytic import MLPKernelSpec, mlp_kernel
from ntkexp.kernels.base import Kernel
from ntkexp.kernels.cnn import conv_stack_kernel
from ntkexp.layers.activation import Activation
from ntkexp.layers.base import Layer, Shape
from ntkexp.layers.combinators import Serial
from ntkexp.layers.conv import conv_stack_of
from ntkexp.layers.dense import Dense

#: keyword options a fused map understands (the layer map ignores them)
MLP_OPTIONS = ("block_size", "exact_angles", "degree", "nodes")
CONV_OPTIONS = ("pixel_pairs", "block_entries")


def dense_stack_of(layer: Layer, in_shape: Shape) -> dict | None:
    """``{"spec": MLPKernelSpec, "degree", "nodes"}`` if ``layer`` is a plain dense stack.

    A flat-input serial ``[dense, act, dense, act, ..., dense]`` with one
    activation, equal hidden widths and equal ``W_std``/``b_std``/parameterization;
    None otherwise.
    """
    if len(in_shape) != 1 or not isinstance(layer, Serial):
        return None
    ls = layer.layers
    if len(ls) % 2 != 1:
        return None
    dense, acts = ls[0::2], ls[1::2]
    if not all(type(d) is Dense for d in dense) or not all(type(a) is Activation for a in acts):
        return None
    d0 = dense[0]
    if any((d.W_std, d.b_std, d.parameterization) != (d0.W_std, d0.b_std, d0.parameterization)
           for d in dense):
        return None
    if len({(a.name, a.params, a.degree, a.nodes) for a in acts}) > 1:
        return None
    hidden = {d.width for d in dense[:-1]}
    if len(hidden) > 1:
        return None
    act = acts[0] if acts else Activation("relu")
    spec = MLPKernelSpec(depth=len(acts), W_std=d0.W_std, b_std=d0.b_std,
                         activation=act.name, activation_params=act.params,
                         parameterization=d0.parameterization,
                         width=hidden.pop() if hidden else 1)
    return {"spec": spec, "degree": act.degree, "nodes": act.nodes}


def _mlp(hp: dict, x1, x2, options: dict) -> Kernel:
    kw = {"degree": hp["degree"], "nodes": hp["nodes"]}
    kw.update({k: v for k, v in options.items() if k in MLP_OPTIONS and v is not None})
    return mlp_kernel(hp["spec"], x1, x2, **kw)


def _conv(hp: dict, x1, x2, options: dict) -> Kernel:
    kw = {k: v for k, v in options.items() if k in CONV_OPTIONS and v is not None}
    return conv_stack_kernel(x1, x2, **hp, **kw)


@dataclasses.dataclass(frozen=True)
class FusedRule:
    """One row of the table: ``match(layer, in_shape) -> hp | None`` and
    ``kernel(hp, x1, x2, options) -> Kernel`` (``x2`` None: symmetric)."""

    name: str
    match: Callable[[Layer, Shape], Any]
    kernel: Callable[..., Kernel]


#: the rule table, tried in order; the first match runs
RULES: tuple[FusedRule, ...] = (
    FusedRule("mlp", dense_stack_of, _mlp),
    FusedRule("conv_stack", conv_stack_of, _conv),
)


def fused_rule(layer: Layer, in_shape: Shape) -> tuple[FusedRule, Any] | None:
    """``(rule, hyperparameters)`` of the first rule matching ``layer`` on inputs of
    per-example shape ``in_shape``, or None (then the layer-by-layer map runs)."""
    for rule in RULES:
        hp = rule.match(layer, tuple(in_shape))
        if hp is not None:
            return rule, hp
    return None


def fused_kernel(layer: Layer, x1, x2=None, **options) -> Kernel | None:
    """The fused kernel of ``layer`` (validated inputs ``x1``, ``x2``), or None if no rule
    matches. ``options`` go to the matching map (:data:`MLP_OPTIONS`, :data:`CONV_OPTIONS`)."""
    found = fused_rule(layer, tuple(x1.shape[1:]))
    if found is None:
        return None
    rule, hp = found
    return rule.kernel(hp, x1, x2, options)


__all__ = ["CONV_OPTIONS", "MLP_OPTIONS", "RULES", "FusedRule", "dense_stack_of",
           "fused_kernel", "fused_rule"]
