"""Global self-attention and its infinite-width limit (Hron et al. 2020, "Infinite attention").

Finite side, on ``x (n, *S, C)`` with the ``N = prod(S)`` positions attending to
each other, NTK parameterization (every weight ``~ N(0, 1)``), ``H`` heads of
key size ``d_k`` and value size ``d_v``, and query and key weights *tied*
(``W^Q_h = W^K_h``; Hron et al. 2020, section 3, the ``d^-1`` logit scaling
under which the logits stay non-degenerate in the limit)::

    logits_h = QK_std / (C d_k) (x W_h) (x W_h)^T          (N, N), QK_std = W_query_std W_key_std
    G_h      = mechanism(logits_h)                            softmax over the key position
    y        = OV_std / sqrt(H d_v C) concat_h(G_h x W^V_h) W^O + b_std b
    (OV_std = W_out_std W_value_std)

Infinite-width map (heads, d_k, d_v and C to infinity; Hron et al. 2020,
Theorem 3 and appendix; neural-tangents' ``GlobalSelfAttention`` with
``linear_scaling=True``): the logits converge to the deterministic
``QK_std * cov(x)_ij`` of each input's own per-position covariance, so with
``G(x) = mechanism(QK_std * cov1[a])`` ``(N, N)``::

    nngp' = OV_std^2 G(x) nngp G(x')^T + b_std^2
    ntk'  = OV_std^2 G(x) ntk G(x')^T + b_std^2 + 2 (nngp' - b_std^2)

(the bias, the value and the output weights each add their own term; the
query/key gradients vanish under the ``d^-1`` scaling).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ntkexp.layers.base import KernelState, Layer, Shape
from ntkexp.layers.registry import register_layer

Array = jax.Array
MECHANISMS = ("SOFTMAX", "IDENTITY")


def _std(name, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"attention.{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _pos_int(name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"attention.{name} must be an integer >= 1, got {v!r}")
    return v


@dataclasses.dataclass(frozen=True)
class GlobalSelfAttention(Layer):
    """Multi-head global self-attention over all positions.

    Attributes:
      width: output channels.
      n_heads, n_chan_key, n_chan_val: heads ``H``, key size ``d_k``, value size
        ``d_v``. ``n_chan_key`` / ``n_chan_val`` None (the default) mean "the
        layer's width", so they grow with the swept width (``with_width``, the
        runner's ``model.width``) and the empirical NTK converges to the limit at
        the ``1/sqrt(width)`` rate; numbers given stay fixed across the sweep (then
        the error plateaus at the fixed sizes' level). ``n_heads`` stays fixed:
        the limit needs ``d_k, d_v -> infinity``, not more heads (Hron et al. 2020).
      W_key_std, W_query_std, W_value_std, W_out_std, b_std: weight multipliers.
      mechanism: ``"SOFTMAX"`` (over the key position) or ``"IDENTITY"``.
    """

    width: int
    n_heads: int = 4
    n_chan_key: int | None = None
    n_chan_val: int | None = None
    W_key_std: float = 1.0
    W_query_std: float = 1.0
    W_value_std: float = 1.0
    W_out_std: float = 1.0
    b_std: float = 0.0
    mechanism: str = "SOFTMAX"

    kind: ClassVar[str] = "attention"
    has_params: ClassVar[bool] = True

    def __post_init__(self):
        for name in ("width", "n_heads", "n_chan_key", "n_chan_val"):
            if getattr(self, name) is not None or name in ("width", "n_heads"):
                _pos_int(name, getattr(self, name))
        for name in ("W_key_std", "W_query_std", "W_value_std", "W_out_std", "b_std"):
            object.__setattr__(self, name, _std(name, getattr(self, name)))
        m = str(self.mechanism).upper()
        if m not in MECHANISMS:
            raise ValueError(f"attention.mechanism must be one of {', '.join(MECHANISMS)}, "
                             f"got {self.mechanism!r}")
        object.__setattr__(self, "mechanism", m)

    @property
    def d_k(self) -> int:
        """Key size: ``n_chan_key``, or the width when that is None."""
        return self.width if self.n_chan_key is None else self.n_chan_key

    @property
    def d_v(self) -> int:
        """Value size: ``n_chan_val``, or the width when that is None."""
        return self.width if self.n_chan_val is None else self.n_chan_val

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) < 2:
            raise ValueError("attention needs inputs with positions, (n, P, C) or (n, H, W, C); "
                             f"got per-example shape {in_shape}")
        return (*in_shape[:-1], self.width)

    def module(self, in_shape: Shape, *, rngs: nnx.Rngs, dtype=None):
        self.out_shape(in_shape)
        return AttentionModule(self, in_shape[-1], rngs=rngs, dtype=dtype)

    def _mech(self, logits: Array) -> Array:
        if self.mechanism == "SOFTMAX":
            return jax.nn.softmax(logits, axis=-1)
        return logits

    def apply(self, params, x: Array) -> Array:
        n, C = x.shape[0], x.shape[-1]
        S = x.shape[1:-1]
        xf = x.reshape(n, -1, C)  # (n, N, C)
        qk = jnp.einsum("npc,chk->nhpk", xf, params["W_qk"])  # (n, H, N, d_k)
        dk = params["W_qk"].shape[-1]
        logits = (self.W_query_std * self.W_key_std / (C * dk)) * jnp.einsum(
            "nhpk,nhqk->nhpq", qk, qk)
        G = self._mech(logits)
        v = jnp.einsum("npc,chv->nhpv", xf, params["W_v"])  # (n, H, N, d_v)
        gv = jnp.einsum("nhpq,nhqv->nphv", G, v)  # (n, N, H, d_v)
        H, dv = params["W_v"].shape[1], params["W_v"].shape[2]
        y = jnp.einsum("nphv,hvo->npo", gv, params["W_o"])
        y = (self.W_out_std * self.W_value_std / math.sqrt(H * dv * C)) * y
        if "b" in params:
            y = y + self.b_std * params["b"][None, None, :]
        return y.reshape(n, *S, self.width)

    def kernel(self, state: KernelState) -> KernelState:
        if not state.is_spatial:
            raise ValueError("attention needs a representation with positions (n, P, C)")
        n1, n2 = state.nngp.shape[:2]
        N = state.n_positions
        qk = self.W_query_std * self.W_key_std
        ov2 = (self.W_out_std * self.W_value_std) ** 2
        b2 = self.b_std**2
        c1 = state.cov1.reshape(n1, N, N)
        c2 = state.cov2.reshape(n2, N, N)
        G1 = self._mech(qk * c1)
        G2 = G1 if state.sym else self._mech(qk * c2)
        hp = jax.lax.Precision.HIGHEST

        def mix(Ga, K, Gb):
            return jnp.einsum("aik,abkl,bjl->abij", Ga, K, Gb, precision=hp)

        def mix_self(Ga, K):
            return jnp.einsum("aik,akl,ajl->aij", Ga, K, Ga, precision=hp)

        shape = state.nngp.shape
        nngp = ov2 * mix(G1, state.nngp.reshape(n1, n2, N, N), G2) + b2
        ntk = ov2 * mix(G1, state.ntk.reshape(n1, n2, N, N), G2)
        if state.trainable:
            ntk = ntk + b2 + 2 * (nngp - b2)
        cov1 = ov2 * mix_self(G1, c1) + b2
        cov2 = cov1 if state.sym else ov2 * mix_self(G2, c2) + b2
        return state.replace(nngp=nngp.reshape(shape), ntk=ntk.reshape(shape),
                             cov1=cov1.reshape(state.cov1.shape),
                             cov2=cov2.reshape(state.cov2.shape),
                             channels=self.width, is_gaussian=True)


class AttentionModule(nnx.Module):
    """Parameters: ``W_qk (C, H, d_k)`` (tied query/key), ``W_v (C, H, d_v)``,
    ``W_o (H, d_v, width)``, ``b (width,)``."""

    def __init__(self, layer: GlobalSelfAttention, C: int, *, rngs: nnx.Rngs, dtype=None):
        dtype = dtype or jnp.float32
        H, dk, dv = layer.n_heads, layer.d_k, layer.d_v
        self.W_qk = nnx.Param(jax.random.normal(rngs.params(), (C, H, dk), dtype))
        self.W_v = nnx.Param(jax.random.normal(rngs.params(), (C, H, dv), dtype))
        self.W_o = nnx.Param(jax.random.normal(rngs.params(), (H, dv, layer.width), dtype))
        if layer.b_std > 0:
            self.b = nnx.Param(jax.random.normal(rngs.params(), (layer.width,), dtype))


@register_layer("attention")
def _attention(width: int | None = None, out: int | None = None, n_heads: int = 4,
               n_chan_key: int | None = None, n_chan_val: int | None = None,
               W_key_std: float = 1.0,
               W_query_std: float = 1.0, W_value_std: float = 1.0, W_out_std: float = 1.0,
               b_std: float = 0.0, mechanism: str = "SOFTMAX"):
    """``{attention: {width: 64, n_heads: 4, ...}}`` (``out`` is a synonym of ``width``);
    ``n_chan_key`` / ``n_chan_val`` left out follow the (swept) width."""
    w = out if out is not None else width
    if w is None:
        raise ValueError("attention needs 'width' (or a model width)")
    return GlobalSelfAttention(w, n_heads, n_chan_key, n_chan_val, W_key_std, W_query_std,
                               W_value_std, W_out_std, b_std, mechanism)
