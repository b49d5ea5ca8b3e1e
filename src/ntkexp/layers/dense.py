"""Dense (fully connected) layer: finite Flax NNX layer, kernel map and structured NTK.

On flat inputs ``a (n, C)`` (on spatial inputs ``(n, *S, C)`` it acts on the
channel axis at every position, a 1x1 convolution), with ``C`` the fan-in:

* ``"ntk"``:      ``y = W_std / sqrt(C) * a @ W + b_std * b``,  ``W, b ~ N(0, 1)``
* ``"standard"``: ``y = a @ W + b``,  ``W ~ N(0, W_std^2 / C)``, ``b ~ N(0, b_std^2)``

(Jacot et al. 2018, eq. 1; Lee et al. 2020, section 2). ``b_std = 0``: no bias.

Infinite-width map (per position pair; ``K`` the input state's per-channel NNGP,
``Theta`` its NTK; Jacot et al. 2018, Theorem 1; Lee et al. 2020, eqs. 3-4)::

    nngp' = W_std^2 K + b_std^2
    ntk'  = W_std^2 Theta + own,   own = nngp'          (ntk)
                                   own = C K + [bias]   (standard)

``own`` (the layer's own parameters) is left out inside ``frozen``.

Structured NTK: ``dy/dW = w_mult a b^T``, ``dy/db = b_mult b`` with ``b = df/dy``,
so the layer contributes ``w_mult^2 <a1, a2> <b1, b2> + b_mult^2 <b1, b2>``
(summed over position pairs on spatial inputs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ntkexp.layers.base import KernelState, Layer, Shape

Array = jax.Array
PARAMETERIZATIONS = ("ntk", "standard")


def _check_std(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"dense.{name} must be a finite number >= 0, got {v!r}")
    return float(v)


@dataclasses.dataclass(frozen=True)
class Dense(Layer):
    """A dense layer of ``width`` output channels.

    Attributes:
      width: output channels (>= 1).
      W_std: weight multiplier sigma_w (>= 0).
      b_std: bias multiplier sigma_b (>= 0; 0 means no bias).
      parameterization: ``"ntk"`` or ``"standard"``.
      readout: True for an output layer (``{dense: {out: k}}`` in YAML): its
        width is the output dimension and is not swept with the model width.
    """

    width: int
    W_std: float = 1.0
    b_std: float = 0.0
    parameterization: str = "ntk"
    readout: bool = False

    kind: ClassVar[str] = "dense"
    has_params: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"dense.width must be an integer >= 1, got {self.width!r}")
        for name in ("W_std", "b_std"):
            object.__setattr__(self, name, _check_std(name, getattr(self, name)))
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"dense.parameterization must be one of "
                             f"{', '.join(PARAMETERIZATIONS)}, got {self.parameterization!r}")

    @property
    def has_bias(self) -> bool:
        return self.b_std > 0

    def scales(self, fan_in: int) -> tuple[float, float]:
        """Forward multipliers ``(w_mult, b_mult)``."""
        if self.parameterization == "ntk":
            return self.W_std / math.sqrt(fan_in), self.b_std
        return 1.0, 1.0

    def init_scales(self, fan_in: int) -> tuple[float, float]:
        """Standard deviations ``(w_init, b_init)`` of the stored parameters."""
        if self.parameterization == "ntk":
            return 1.0, 1.0
        return self.W_std / math.sqrt(fan_in), self.b_std

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) < 1:
            raise ValueError(f"dense needs inputs with a channel axis, got shape {in_shape}")
        return (*in_shape[:-1], self.width)

    def module(self, in_shape: Shape, *, rngs: nnx.Rngs, dtype=None) -> nnx.Module:
        self.out_shape(in_shape)
        return DenseModule(self, in_shape[-1], rngs=rngs, dtype=dtype)

    def apply(self, params, x: Array) -> Array:
        W = params["W"]
        w_mult, b_mult = self.scales(W.shape[0])
        y = w_mult * jnp.matmul(x, W)
        if "b" in params:
            b = params["b"]
            y = y + b_mult * b.reshape((1,) * (y.ndim - 1) + b.shape)
        return y

    def kernel(self, state: KernelState) -> KernelState:
        w2, b2 = self.W_std**2, self.b_std**2
        nngp = w2 * state.nngp + b2
        ntk = w2 * state.ntk
        if state.trainable:
            if self.parameterization == "ntk":
                ntk = ntk + nngp
            else:
                ntk = ntk + state.channels * state.nngp + (1.0 if self.has_bias else 0.0)
        return state.replace(nngp=nngp, ntk=ntk, cov1=w2 * state.cov1 + b2,
                             cov2=w2 * state.cov2 + b2, channels=self.width, is_gaussian=True)

    def structured_ntk(self, a1, a2, b1, b2, *, full: bool):
        w_mult, b_mult = self.scales(a1.shape[-1])
        b_mult = b_mult if self.has_bias else 0.0
        hp = jax.lax.Precision.HIGHEST
        if a1.ndim == 2:
            c = (w_mult**2) * jnp.matmul(a1, a2.T, precision=hp)
            if b_mult:
                c = c + b_mult**2
            if full:
                return c[:, :, None, None] * jnp.einsum("iaw,jbw->ijab", b1, b2, precision=hp)
            return c * jnp.matmul(b1.reshape(b1.shape[0], -1), b2.reshape(b2.shape[0], -1).T,
                                  precision=hp)
        # spatial: sum over position pairs (i, j) of <a1_i, a2_j> <b1_i, b2_j>
        n1, n2 = a1.shape[0], a2.shape[0]
        A1 = a1.reshape(n1, -1, a1.shape[-1])
        A2 = a2.reshape(n2, -1, a2.shape[-1])
        o = b1.shape[1]
        B1 = b1.reshape(n1, o, -1, b1.shape[-1])
        B2 = b2.reshape(n2, o, -1, b2.shape[-1])
        c = (w_mult**2) * jnp.einsum("xpc,yqc->xypq", A1, A2, precision=hp)
        if b_mult:
            c = c + b_mult**2
        if full:
            return jnp.einsum("xypq,xapw,ybqw->xyab", c, B1, B2, precision=hp)
        return jnp.einsum("xypq,xapw,yaqw->xy", c, B1, B2, precision=hp)


class DenseModule(nnx.Module):
    """Parameters of one :class:`Dense` layer: ``W (C, width)``, ``b (width,)``."""

    def __init__(self, layer: Dense, fan_in: int, *, rngs: nnx.Rngs, dtype=None):
        dtype = dtype or jnp.float32
        w_init, b_init = layer.init_scales(fan_in)
        self.W = nnx.Param(w_init * jax.random.normal(rngs.params(), (fan_in, layer.width), dtype))
        if layer.has_bias:
            self.b = nnx.Param(b_init * jax.random.normal(rngs.params(), (layer.width,), dtype))
        self.layer = layer

    def __call__(self, x: Array) -> Array:
        return self.layer.apply(nnx.to_pure_dict(nnx.state(self, nnx.Param)), x)
