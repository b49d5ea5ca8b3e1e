"""The two-layer ReLU network of Du et al. (2019), Arora et al. (2019) and Zhang et al. (2019).

    f(x) = (1 / sqrt(m)) * sum_r a_r relu(w_r . x),

with ``w_r ~ N(0, kappa^2 I_d)`` and ``a_r`` uniform on ``{-1, +1}``. Only the
first layer ``W = [w_1 .. w_m]`` is trained; the output layer ``a`` is fixed.

Parameters as a pytree: ``{"W": (d, m), "a": (m,)}``. ``a`` lives in the
pytree (so that it varies with the seed and ``jax.vmap`` over initialisations
works), but the forward pass reads it through ``jax.lax.stop_gradient``: its
gradient is exactly zero, so every optimizer leaves it unchanged and the
empirical NTK of ``(apply_fn, params)`` is the first-layer Gram matrix

    H_ij(W) = (x_i . x_j / m) sum_r 1{w_r . x_i > 0} 1{w_r . x_j > 0}

whose infinite-width limit (Du et al. 2019, eq. 3.1; Arora et al. 2019, eq. 4)
is ``H^inf_ij = x_i . x_j (pi - arccos(cos_ij)) / (2 pi)`` for any ``kappa``
(the indicator is scale invariant). ``TwoLayerApply.trainable_mask`` also marks
``a`` as frozen, which ``ntkexp.training.train`` uses by default.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ntkexp.kernels.base import Kernel
from ntkexp.kernels.special import two_layer_relu_kernel
from ntkexp.layers.activation import Activation
from ntkexp.layers.combinators import frozen, serial
from ntkexp.layers.dense import Dense
from ntkexp.models.registry import register_architecture
from ntkexp.models.validation import promote

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TwoLayerSpec:
    """Two-layer ReLU net with a fixed +-1 output layer (hashable record).

    Attributes:
      width: number of hidden units m (> 0).
      kappa: standard deviation of the first-layer weights (> 0; Arora et al.
        use a small kappa, Du et al. kappa = 1).
    """

    width: int
    kappa: float = 1.0

    def __post_init__(self):
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"TwoLayerSpec.width must be an integer >= 1, got {self.width!r}")
        k = self.kappa
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
            raise ValueError(f"TwoLayerSpec.kappa must be a finite number > 0, got {k!r}")
        object.__setattr__(self, "kappa", float(k))

    def layers(self, in_dim: int):
        """The net as a layer composition for inputs of dimension ``in_dim``::

            serial(dense(m, W_std=kappa sqrt(d), standard), relu, frozen(dense(1)))

        (standard parameterization: ``w_r ~ N(0, kappa^2 I)`` is the trained
        parameter itself; the readout ``a / sqrt(m)`` is frozen. The finite
        :class:`TwoLayerApply` draws ``a`` uniform on ``{-1, +1}``; the limit
        is the same.)
        """
        return serial(Dense(self.width, W_std=self.kappa * math.sqrt(in_dim),
                            parameterization="standard"),
                      Activation("relu"), frozen(Dense(1, readout=True)))


@dataclasses.dataclass(frozen=True)
class TwoLayerApply:
    """Pure ``apply_fn(params, x) -> (n, 1)`` for the two-layer ReLU net; hashable."""

    spec: TwoLayerSpec

    def __call__(self, params, x: Array) -> Array:
        return self.forward(params, x)[0]

    def preactivations(self, params, x: Array) -> list[Array]:
        """Hidden pre-activations ``[x @ W]``: one ``(n, m)`` array."""
        W = params["W"]
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != W.shape[0]:
            raise ValueError(f"inputs must have shape (n, {W.shape[0]}), got {tuple(x.shape)}")
        x, W = promote(x, W)  # JAX promotion: no silent downcast
        return [x @ W]

    def forward(self, params, x: Array):
        """``(output (n, 1), [pre-activations (n, m)])``."""
        (z,) = self.preactivations(params, x)
        a = jax.lax.stop_gradient(params["a"]).astype(z.dtype)
        m = z.shape[1]
        out = (jax.nn.relu(z) @ a) / jnp.sqrt(jnp.asarray(m, z.dtype))
        return out[:, None], [z]

    def hidden_weights(self, params) -> Array:
        """Incoming weight vectors of the hidden units, ``(m, d)`` (rows are ``w_r``)."""
        return params["W"].T

    @staticmethod
    def trainable_mask(params):
        """``{"W": True, "a": False}``: only the first layer is trained."""
        return {"W": True, "a": False}


def init_two_layer(spec: TwoLayerSpec, in_dim: int, key: Array, dtype=None):
    """Draw ``{"W": kappa * N(0, 1) (d, m), "a": +-1 (m,)}`` from ``key``; vmappable over keys."""
    if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"in_dim must be an integer >= 1, got {in_dim!r}")
    dtype = dtype or jnp.float32
    kw, ka = jax.random.split(key)
    W = spec.kappa * jax.random.normal(kw, (in_dim, spec.width), dtype)
    a = jnp.where(jax.random.bernoulli(ka, 0.5, (spec.width,)), 1.0, -1.0).astype(dtype)
    return {"W": W, "a": a}


def two_layer_kernel(spec: TwoLayerSpec, x1, x2=None) -> Kernel:
    """Infinite-width ``Kernel(nngp, ntk)`` of the two-layer net (first layer trained).

    ``ntk = x.x' (pi - theta) / (2 pi)`` (Du et al. 2019, H^inf; the one copy is
    :func:`ntkexp.kernels.special.two_layer_relu_kernel`) and
    ``nngp = E[f(x) f(x')] = kappa^2 |x||x'| (sin theta + (pi - theta) cos theta) / (2 pi)``
    (Cho & Saul 2009, arc-cosine kernel of degree 1), ``theta`` the angle
    between ``x`` and ``x'``. Zero-norm inputs give zero rows (no NaN). Equal
    to the limit of the composition :meth:`TwoLayerSpec.layers`.
    """
    return two_layer_relu_kernel(x1, x2, kappa=spec.kappa)


def empirical_gram(W, x):
    """Finite-width Gram matrix of the two-layer net (Du et al. 2019, eq. 3.2; Arora et al. 2019).

    ``H(W)_ij = (x_i . x_j / m) sum_r 1{w_r . x_i > 0} 1{w_r . x_j > 0}``: the
    empirical NTK of the first layer, formed in ``O(n^2 m)`` without the
    ``(n, d m)`` Jacobian; exactly symmetric. Its limit is
    :func:`ntkexp.kernels.special.du_gram` (H^inf).

    Args:
      W: ``(d, m)`` first-layer weights (columns are ``w_r``).
      x: ``(n, d)`` inputs.

    Returns:
      ``(n, n)``.
    """
    act = (x @ W > 0).astype(x.dtype)
    H = (x @ x.T) * (act @ act.T) / W.shape[1]
    return 0.5 * (H + H.T)


def _build_two_layer(spec: TwoLayerSpec, in_dim: int, key, dtype=None):
    return TwoLayerApply(spec), init_two_layer(spec, in_dim, key, dtype)


register_architecture("two_layer_relu", make_spec=TwoLayerSpec, analytic=two_layer_kernel)(
    _build_two_layer
)
