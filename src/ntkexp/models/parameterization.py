"""abc-parameterizations of a dense stack, as data (Yang & Hu 2021).

Yang & Hu (ICML 2021), "Feature Learning in Infinite-Width Neural Networks"
(Tensor Programs IV), section 3: an abc-parameterization of an MLP of width n
gives every layer ``l`` three exponents: the forward multiplier, the initial
scale and the learning rate of its trainable weights,

    W^l = n^{-a_l} w^l,   w^l_ij ~ N(0, n^{-2 b_l}),   lr_l = eta n^{-c_l}.

Here (ntkexp's convention, reducing to the library's ``ntk`` and ``standard``
forms, :mod:`ntkexp.models.mlp`) a dense layer ``h = 0 .. depth`` with fan-in
``n_in`` computes ``z = w_mult a @ W + b_mult b`` with stored ``W ~ N(0, w_init^2)``,
``b ~ N(0, b_init^2)``, and

    w_mult = n^{-a_h} * (s_h if the constant sits in the multiplier else 1)
    w_init = n^{-b_h} * (s_h if the constant sits in the initialisation else 1)

where ``n`` is the hidden width and ``s_h = W_std / sqrt(d)`` for the input layer
(fan-in d, a constant as n grows) and ``s_h = W_std`` for the others (whose
``n^{-1/2}`` is part of the exponents). Biases have their own ``(a, b, c)``
with ``b_std`` as the constant. The learning-rate exponent ``c`` is folded into
``(a, b)`` by the abc symmetry of SGD (Yang & Hu 2021, eq. (4): ``(a, b, c) ->
(a + t, b - t, c - 2 t)`` leaves the trained function unchanged for SGD/GD) with
``t = c / 2``, so a plain GD step of size ``eta`` on the stored parameters is the
step ``eta n^{-c}`` of the definition; this is exact for (S)GD, not for Adam.

Presets (``L = depth`` hidden layers; layer 0 the input layer, ``L`` the readout):

* ``standard`` (SP): ``a = 0``; ``b_0 = 0``, ``b_{>=1} = 1/2``; ``c = 0``; constants in
  the initialisation (PyTorch's default layout).
* ``ntk``: ``a_0 = 0``, ``a_{>=1} = 1/2``; ``b = 0``; ``c = 0``; constants in the
  multiplier (Jacot et al. 2018).
* ``mup`` (maximal update, Yang & Hu 2021, eq. (5)): ``a_0 = -1/2``, ``a_{1..L-1} = 0``,
  ``a_L = 1/2``; ``b = 1/2``; ``c = 0``; hidden biases like input weights
  (``a = -1/2, b = 1/2``), the readout bias ``a = b = 0``. The readout's initial
  output variance is ``O(1/n)`` and every hidden feature moves by ``Theta(1)``.
* ``mean_field`` (two-layer net only, ``depth == 1``; Mei, Montanari & Nguyen
  2018, Chizat & Bach 2018): ``f = (W_std / n) sum_r v_r sigma(w_r . x / sqrt(d))``
  with ``w, v ~ N(0, 1)`` and the per-unit learning rate ``eta n``: ``a = (0, 1)``,
  ``b = (0, 0)``, ``c = (-1, -1)``; the hidden bias ``c = -1``, the readout bias
  ``c = 0``. By the abc symmetry it is ``mup`` at depth 1 (Yang & Hu 2021, sec. 5).

Only ``ntk`` and ``standard`` have a kernel limit (the NTK stays fixed in
training); for ``mup`` and ``mean_field`` the limit is not a kernel
(:func:`require_kernel_limit`).
"""

from __future__ import annotations

import dataclasses
import math

PRESETS = ("ntk", "standard", "mup", "mean_field")
KERNEL_LIMIT = ("ntk", "standard")


class ParameterizationError(ValueError):
    """A parameterization that is unknown or not defined for the composition."""


@dataclasses.dataclass(frozen=True)
class LayerABC:
    """Exponents of one dense layer (weights and bias) and where the constant goes.

    Attributes:
      a, b, c: weight multiplier, initialisation and learning-rate exponents.
      bias_a, bias_b, bias_c: the same for the bias.
      const_in_mult: the constant ``s_h`` (``W_std``-based, and ``b_std`` for the
        bias) multiplies the forward pass (True) or the initial draw (False).
    """

    a: float
    b: float
    c: float = 0.0
    bias_a: float = 0.0
    bias_b: float = 0.0
    bias_c: float = 0.0
    const_in_mult: bool = True


def layer_abc(name: str, depth: int, layer: int) -> LayerABC:
    """The exponents of dense layer ``layer`` (0 = input layer, ``depth`` = readout)
    of a ``depth``-hidden-layer MLP under preset ``name``.

    Raises:
      ParameterizationError: an unknown preset, a layer out of range, or
        ``mean_field`` for ``depth != 1``.
    """
    if name not in PRESETS:
        raise ParameterizationError(f"unknown parameterization {name!r}; known: "
                                    f"{', '.join(PRESETS)}")
    if not 0 <= layer <= depth:
        raise ParameterizationError(f"layer {layer} out of range 0..{depth}")
    first, last = layer == 0, layer == depth
    if name == "ntk":
        return LayerABC(a=0.0 if first else 0.5, b=0.0)
    if name == "standard":
        return LayerABC(a=0.0, b=0.0 if first else 0.5, const_in_mult=False)
    if name == "mup":
        if depth == 0:
            raise ParameterizationError("parameterization 'mup' needs at least one hidden "
                                        "layer (depth >= 1); a linear model has no width")
        a = -0.5 if first else (0.5 if last else 0.0)
        return LayerABC(a=a, b=0.5, bias_a=0.0 if last else -0.5,
                        bias_b=0.0 if last else 0.5)
    # mean_field
    if depth != 1:
        raise ParameterizationError(
            f"parameterization 'mean_field' is defined for the two-layer net (depth 1), "
            f"got depth {depth}; use 'mup' for deeper nets")
    if first:
        return LayerABC(a=0.0, b=0.0, c=-1.0, bias_c=-1.0)
    return LayerABC(a=1.0, b=0.0, c=-1.0, bias_c=0.0)


def check(name: str, depth: int) -> None:
    """Raise :class:`ParameterizationError` if ``name`` is not defined at this depth."""
    for h in range(depth + 1):
        layer_abc(name, depth, h)


def scales(name: str, depth: int, layer: int, *, width: int, fan_in: int, W_std: float,
           b_std: float) -> tuple[float, float, float, float]:
    """``(w_mult, b_mult, w_init, b_init)`` of one dense layer (see the module docstring).

    The learning-rate exponent is folded in (``t = c / 2``: ``a + t``, ``b - t``).

    Args:
      name: a preset; depth: hidden layers; layer: 0 .. depth.
      width: the hidden width n; fan_in: this layer's fan-in (the input
        dimension for layer 0).
    """
    e = layer_abc(name, depth, layer)
    n = float(width)
    s = W_std / math.sqrt(fan_in) if layer == 0 else W_std
    tw, tb = e.c / 2.0, e.bias_c / 2.0
    wm, wi = n ** -(e.a + tw), n ** -(e.b - tw)
    bm, bi = n ** -(e.bias_a + tb), n ** -(e.bias_b - tb)
    if e.const_in_mult:
        return s * wm, b_std * bm, wi, bi
    return wm, bm, s * wi, b_std * bi


def require_kernel_limit(name: str) -> None:
    """Raise a one-line :class:`ParameterizationError` when ``name`` has no kernel limit."""
    if name in KERNEL_LIMIT:
        return
    if name not in PRESETS:
        raise ParameterizationError(f"unknown parameterization {name!r}; known: "
                                    f"{', '.join(PRESETS)}")
    raise ParameterizationError(
        f"parameterization {name!r}: the infinite-width limit is not a kernel (features move "
        f"by Theta(1) in training, Yang & Hu 2021), so there is no analytic_kernel; kernel "
        f"limits exist for {', '.join(KERNEL_LIMIT)}")
