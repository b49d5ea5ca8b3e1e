"""The layer protocol: one record per layer holds its finite net and its infinite-width map.

A network is a composition of :class:`Layer` records (``serial``, ``parallel``,
``residual``, ``frozen``; :mod:`ntkexp.layers.combinators`). Each layer carries,
in one file:

1. its **finite computation** (Flax NNX): :meth:`Layer.module` builds an
   ``nnx.Module`` holding the parameters for an input shape, :meth:`Layer.init`
   returns them as a pure pytree, and :meth:`Layer.apply` is the pure forward
   pass ``apply(params, x) -> y`` on a batch;
2. its **infinite-width map** :meth:`Layer.kernel` on a :class:`KernelState`
   (NNGP, NTK and the per-position covariances a convolution needs), in the
   style of neural-tangents' ``stax`` (Novak et al. 2020): a composition's
   limit is the composition of its layers' maps;
3. what the **structured empirical NTK** needs: a layer with parameters whose
   gradient factorises through its input ``a`` and the backward vector
   ``b = df/dy`` at its output implements :meth:`Layer.structured_ntk`
   (e.g. Dense: ``w_mult^2 <a1, a2> <b1, b2> + b_mult^2 <b1, b2>``).

Shapes (batch axis first; spatial axes before the channel axis, channels last)
------------------------------------------------------------------------------
Finite side, ``in_shape`` / ``out_shape`` exclude the batch axis:

* flat inputs ``x (n, d)``: ``in_shape = (d,)``;
* 1-D signals ``x (n, P, C)``: ``in_shape = (P, C)``;
* 2-D images ``x (n, H, W, C)``: ``in_shape = (H, W, C)``.

Kernel side, with ``S`` the spatial shape (``()``, ``(P,)`` or ``(H, W)``) and
``S + S`` its two copies, one per point of the pair (the layout of
:mod:`ntkexp.kernels.cnn`'s all-pixel-pairs kernel):

* ``nngp``, ``ntk``: ``(n1, n2, *S, *S)``; e.g. ``(n1, n2)`` flat,
  ``(n1, n2, P, P)`` for 1-D, ``(n1, n2, H, W, H, W)`` for 2-D. Entry
  ``[a, b, i, j]`` is the per-channel covariance of position ``i`` of ``x1[a]``
  and position ``j`` of ``x2[b]``: ``E[y_c(x1_a)_i y_c(x2_b)_j]`` (one channel
  ``c``; all channels are i.i.d. in the limit) and the NTK of that entry;
* ``cov1``: ``(n1, *S, *S)``, the NNGP of each ``x1`` point with itself at
  every position pair (``nngp(x1, x1)`` restricted to the diagonal ``a = b``);
  ``cov2``: ``(n2, *S, *S)`` likewise for ``x2``. Activations need the
  diagonal ``cov1[a, i, i]`` (the variance at a position); convolutions need the
  whole ``(S, S)`` block because they mix neighbouring positions;
* ``spatial = S`` (a static tuple); ``is_spatial`` is ``len(S) > 0``. Flatten
  and global pooling make it ``()``.

The state's ``nngp`` is normalised per channel, so the input state of raw
inputs is ``nngp[a, b, i, j] = <x1_a[i, :], x2_b[j, :]> / C`` (:func:`input_state`)
and a following Dense/Conv in NTK parameterization gives
``W_std^2 nngp + b_std^2`` (Jacot et al. 2018; Arora et al. 2019, appendix B).

Static fields (metadata of the pytree, hashable, safe under jit):

* ``channels``: the channel count ``C`` of the finite representation at this
  point (the input's last axis, then each layer's width). The standard
  parameterization's NTK needs it (a dense layer's weight gradient contributes
  ``C * nngp_in``; Lee et al. 2020, section 2).
* ``is_gaussian``: whether the entries are (jointly) Gaussian in the limit
  (true after Dense/Conv/pooling of Gaussians, false for raw inputs and after a
  nonlinearity). Activations and LayerNorm map a Gaussian state; applied to a
  non-Gaussian one they raise ``ValueError`` (their limit is not a function of
  the covariance alone).
* ``trainable``: false inside :func:`~ntkexp.layers.combinators.frozen`;
  parameterised layers then add no NTK contribution of their own (their
  parameters are not trained), only propagate it.

Protocol for implementers
-------------------------
Subclass :class:`Layer` as a frozen dataclass (hashable: layers are static jit
arguments), set ``kind`` to the YAML name, and implement ``out_shape``,
``apply``, ``kernel``; a layer with parameters also ``module`` (and, if its
gradient factorises, ``structured_ntk``). Register it with
:func:`ntkexp.layers.registry.register_layer` to make it usable from YAML.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Shape = tuple[int, ...]


# --------------------------------------------------------------------------
# Kernel state
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelState:
    """The infinite-width state of a representation, for a pair of input batches.

    Attributes:
      nngp: ``(n1, n2, *S, *S)`` per-channel NNGP covariance of x1 vs x2.
      ntk: ``(n1, n2, *S, *S)`` NTK (same layout); zeros for raw inputs.
      cov1: ``(n1, *S, *S)`` NNGP of each x1 point with itself.
      cov2: ``(n2, *S, *S)`` NNGP of each x2 point with itself.
      spatial: static spatial shape ``S`` (``()`` when flat).
      channels: static channel count of the finite representation.
      is_gaussian: static; the entries are Gaussian in the limit.
      trainable: static; parameterised layers add their NTK contribution.
      sym: static; ``x2`` is ``x1`` (then ``nngp[a, a] == cov1[a]`` in exact
        arithmetic; :meth:`self_consistent_nngp` restores it bit for bit).
    """

    nngp: Array
    ntk: Array
    cov1: Array
    cov2: Array
    spatial: Shape = ()
    channels: int = 1
    is_gaussian: bool = False
    trainable: bool = True
    sym: bool = False

    def self_consistent_nngp(self) -> Array:
        """``nngp`` with its ``a = b`` entries replaced by ``cov1`` when ``sym``.

        Dual maps evaluate the angle from ``sqrt(q1 q2) - c``, which loses half
        the digits when rounding (FMA contraction, different fusions) makes a
        self-pair's covariance differ from its variance by one ulp; activations
        use this so that self-pairs sit exactly at angle 0.
        """
        if not self.sym:
            return self.nngp
        n = self.nngp.shape[0]
        k = 2 * len(self.spatial)
        eye = jnp.eye(n, dtype=bool).reshape((n, n) + (1,) * k)
        return jnp.where(eye, self.cov1[:, None], self.nngp)

    @property
    def is_spatial(self) -> bool:
        """Whether the representation still has spatial axes."""
        return len(self.spatial) > 0

    @property
    def n_positions(self) -> int:
        """``prod(S)`` (1 when flat)."""
        n = 1
        for s in self.spatial:
            n *= s
        return n

    def replace(self, **changes) -> KernelState:
        return dataclasses.replace(self, **changes)

    def variances(self) -> tuple[Array, Array]:
        """Per-position variances ``(q1 (n1, *S), q2 (n2, *S))``: the diagonal of cov1, cov2."""
        return position_diagonal(self.cov1, len(self.spatial)), position_diagonal(
            self.cov2, len(self.spatial))

    def pair_variances(self) -> tuple[Array, Array]:
        """``q1``, ``q2`` broadcastable against ``nngp`` ``(n1, n2, *S, *S)``.

        ``q1`` has shape ``(n1, 1, *S, 1...)`` and ``q2`` ``(1, n2, 1..., *S)``,
        so elementwise dual maps ``T(q1, nngp, q2)`` apply position pair by pair.
        """
        k = len(self.spatial)
        q1, q2 = self.variances()
        ones = (1,) * k
        return (q1.reshape(q1.shape[0], 1, *self.spatial, *ones),
                q2.reshape(1, q2.shape[0], *ones, *self.spatial))

    def self_variances(self, which: int) -> tuple[Array, Array]:
        """``(qa, qb)`` broadcastable against ``cov{which}`` ``(n, *S, *S)``."""
        k = len(self.spatial)
        q = self.variances()[which - 1]
        ones = (1,) * k
        return (q.reshape(q.shape[0], *self.spatial, *ones),
                q.reshape(q.shape[0], *ones, *self.spatial))


jax.tree_util.register_dataclass(
    KernelState,
    data_fields=["nngp", "ntk", "cov1", "cov2"],
    meta_fields=["spatial", "channels", "is_gaussian", "trainable", "sym"],
)


def position_diagonal(cov: Array, k: int) -> Array:
    """``cov[..., i, i]`` over two copies of ``k`` spatial axes: ``(..., *S, *S) -> (..., *S)``."""
    if k == 0:
        return cov
    lead = cov.shape[: cov.ndim - 2 * k]
    S = cov.shape[cov.ndim - k:]
    N = 1
    for s in S:
        N *= s
    flat = cov.reshape(*lead, N, N)
    return jnp.diagonal(flat, axis1=-2, axis2=-1).reshape(*lead, *S)


def input_state(x1: Array, x2: Array | None = None) -> KernelState:
    """The kernel state of raw inputs (channels last).

    Args:
      x1: ``(n1, d)`` flat, ``(n1, P, C)`` 1-D or ``(n1, H, W, C)`` 2-D inputs.
      x2: like ``x1`` (same trailing shape), or None for ``x2 = x1``.

    Returns:
      ``KernelState`` with ``nngp[a, b, i, j] = <x1_a[i], x2_b[j]> / C``
      (``(n1, n2, *S, *S)``), ``ntk = 0``, ``cov1``/``cov2`` the same for each
      point with itself, ``spatial = x1.shape[1:-1]``, ``channels = C``,
      ``is_gaussian = False``.
    """
    x2 = x1 if x2 is None else x2
    if x1.ndim < 2 or x1.shape[1:] != x2.shape[1:]:
        raise ValueError(
            f"x1 and x2 must have shapes (n, ..., C) with the same trailing shape, got "
            f"{tuple(x1.shape)} and {tuple(x2.shape)}")
    C = x1.shape[-1]
    S = tuple(x1.shape[1:-1])
    k = len(S)
    sp1, sp2 = "abc"[:k], "def"[:k]
    hp = jax.lax.Precision.HIGHEST
    nngp = jnp.einsum(f"n{sp1}z,m{sp2}z->nm{sp1}{sp2}", x1, x2, precision=hp) / C
    if x2 is x1:
        # the diagonal a = b of nngp itself, so that self-pairs see bit-identical
        # variances and covariances (exact angle 0 in the dual maps downstream)
        cov1 = jnp.moveaxis(jnp.diagonal(nngp, axis1=0, axis2=1), -1, 0)
        cov2 = cov1
    else:
        cov1 = jnp.einsum(f"n{sp1}z,n{sp2}z->n{sp1}{sp2}", x1, x1, precision=hp) / C
        cov2 = jnp.einsum(f"n{sp1}z,n{sp2}z->n{sp1}{sp2}", x2, x2, precision=hp) / C
    return KernelState(nngp, jnp.zeros_like(nngp), cov1, cov2, S, int(C), False, True,
                       x2 is x1)


# --------------------------------------------------------------------------
# Layer protocol
# --------------------------------------------------------------------------


class Layer:
    """Base class of every layer and combinator (subclass as a frozen dataclass).

    Class attributes:
      kind: the YAML name (``"dense"``, ``"relu"``, ``"conv"``, ...).
    """

    kind: ClassVar[str] = ""

    # ---- finite side ----------------------------------------------------
    def out_shape(self, in_shape: Shape) -> Shape:
        """Output shape (no batch axis) for an input of shape ``in_shape``.

        Raises ``ValueError`` (one line) if the layer cannot take that shape.
        """
        raise NotImplementedError

    def module(self, in_shape: Shape, *, rngs: nnx.Rngs, dtype=None) -> nnx.Module | None:
        """The ``nnx.Module`` holding this layer's parameters (None: no parameters).

        Parameters are drawn from ``rngs.params()`` in the NTK or standard
        parameterization of the layer (see :mod:`ntkexp.layers.dense`).
        """
        return None

    def init(self, key: Array, in_shape: Shape, dtype=None) -> Any:
        """Parameters as a pure pytree (``{}`` when there are none)."""
        return module_params(self.module(in_shape, rngs=nnx.Rngs(params=key), dtype=dtype))

    def apply(self, params: Any, x: Array) -> Array:
        """Forward pass on a batch ``x (n, *in_shape) -> (n, *out_shape)``."""
        raise NotImplementedError

    # ---- infinite-width side -------------------------------------------
    def kernel(self, state: KernelState) -> KernelState:
        """Map the kernel state of the layer's input to that of its output."""
        raise NotImplementedError

    # ---- structured empirical NTK --------------------------------------
    has_params: ClassVar[bool] = False
    """Whether the layer owns parameters (then it gets a tap for backward vectors)."""

    def structured_ntk(self, a1: Array, a2: Array, b1: Array, b2: Array,
                       *, full: bool) -> Array | None:
        """This layer's parameters' contribution to the empirical NTK, or None.

        Static layer attributes (scales, fan-in from ``a1.shape``) must suffice:
        the structured path does not pass parameters. Implementing it (any
        override) marks the layer as structured for ``method="auto"``.

        Args:
          a1, a2: the layer's inputs ``(n1, *in_shape)``, ``(n2, *in_shape)``.
          b1, b2: backward vectors ``df_o/dy`` at the layer's output,
            ``(n1, out_dim, *out_shape)`` and ``(n2, out_dim, *out_shape)``.
          full: return ``(n1, n2, out_dim, out_dim)`` (all output pairs) instead
            of the trace over outputs ``sum_o`` ``(n1, n2)`` (the convention of
            :func:`ntkexp.empirical.empirical_ntk`).

        Returns:
          ``sum_theta (df(x1)/dtheta)(df(x2)/dtheta)`` over this layer's
          parameters, or None if the layer has no such factorisation (the whole
          network then uses the generic jvp/jacobian path).
        """
        return None

    # ---- diagnostics -----------------------------------------------------
    def children(self) -> Sequence[Layer]:
        """Sub-layers (combinators); leaves return ``()``."""
        return ()

    def apply_tapped(self, params: Any, x: Array, tape) -> Array:
        """Forward pass recording into ``tape`` (:class:`~ntkexp.layers.combinators.Tape`).

        Leaves need not override it (the default applies and records the
        layer); combinators recurse into their children.
        """
        return tape.leaf(self, params, x, self.apply(params, x))


def check_gaussian(layer: str, state: KernelState) -> None:
    """Raise ``ValueError`` unless ``state`` is Gaussian (after a Dense/Conv)."""
    if not state.is_gaussian:
        raise ValueError(
            f"layer {layer!r} needs Gaussian inputs in the infinite-width limit: put a "
            "dense or conv layer before it")


# Combinator signatures (implemented in ntkexp.layers.combinators):
#   serial(*layers) -> Layer                        one after another
#   parallel(*branches, scales=None) -> Layer       y = sum_k scales[k] * branch_k(x)
#   residual(*branch, scale=1.0) -> Layer           y = x + scale * serial(*branch)(x)
#   frozen(layer) -> Layer                          same forward, parameters not trained


class LayerModule(nnx.Module):
    """NNX module of a combinator: its sub-layers' modules in an ``nnx.Dict`` keyed by position."""

    def __init__(self, layer: Layer, in_shape: Shape, *, rngs: nnx.Rngs, dtype=None):
        self.layer = layer
        subs = {}
        s = tuple(in_shape)
        for i, child in enumerate(layer.children()):
            m = child.module(s, rngs=rngs, dtype=dtype)
            subs[i] = m if m is not None else _Empty()
            if layer.kind == "serial":  # a serial chains shapes; branches share the input
                s = child.out_shape(s)
        self.subs = nnx.List([subs[i] for i in range(len(subs))])

    def __call__(self, x: Array) -> Array:
        return self.layer.apply(_pure(self), x)


class _Empty(nnx.Module):
    pass


def _pure(mod: LayerModule) -> Any:
    """Parameters of a combinator's module as ``{i: sub-layer params}`` (recursively)."""
    return {i: module_params(sub) for i, sub in enumerate(mod.subs)}


def module_params(mod) -> Any:
    """Pure parameter pytree of a layer's module (``{}`` for none)."""
    if mod is None or isinstance(mod, _Empty):
        return {}
    if isinstance(mod, LayerModule):
        return _pure(mod)
    return nnx.to_pure_dict(nnx.state(mod, nnx.Param))
