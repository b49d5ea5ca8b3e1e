"""Convolutional networks (1-D and 2-D) in NTK parameterization (Flax NNX).

Architecture (:class:`CNNSpec`), inputs ``x`` of shape ``(n, *image_shape, C_in)``
(channels last; a flat ``(n, prod(image_shape) * C_in)`` is reshaped, channels
last, so flat datasets such as the 8x8 sklearn digits work unchanged). With
``image_shape=None`` the shape comes from the inputs: ``(n, *spatial, C)``
arrays with 1 or 2 spatial axes are taken as they are, and a flat ``(n, d)``
is read as a 1-D signal of length ``d`` with one channel (so ``arch: cnn``
runs on any flat dataset from a config that does not name an image shape):

* ``depth`` convolution layers, each ``width`` channels, filter ``q`` (``q x q``
  in 2-D), stride 1, ``'SAME'`` zero padding (``lax`` convention: ``(q-1)//2``
  zeros before, the rest after), each followed by the activation ``phi``;
* a readout ``Dense(out_dim)`` on either

  - ``"vec"``: the flattened last feature map (CNN-V / CNTK-V of Arora et al.
    2019, the CNN-VEC of Novak et al. 2019), fan-in ``N * C`` with ``N`` the
    number of positions, or
  - ``"gap"``: the global average over positions (CNN-GAP / CNTK-GAP), fan-in ``C``.

NTK parameterization (Jacot et al. 2018; Arora et al. 2019, eq. 7 with
``c_sigma = W_std^2``), all stored parameters ``W, b ~ N(0, 1)``::

    z^h_i = W_std / sqrt(P * C_{h-1}) * sum_{delta, c} W^h_{delta, c, :} a^{h-1}_{i+delta, c}
            + b_std * b^h                         (P = q^k, k = 1 or 2 spatial dims)
    a^h   = phi(z^h),   a^0 = x   (zero outside the image: 'SAME' zero padding)
    f     = W_std / sqrt(F) * r @ W_out + b_std * b_out,
            r = flatten(a^depth)  (F = N * C)  or  mean_i a^depth_i  (F = C).

``b_std = 0`` means no biases. The padded zeros count in the fan-in ``P * C``,
exactly as in Arora et al.'s code (``/9`` for every 3x3 patch).

One source of truth: the network is the layer composition
:meth:`CNNSpec.layers` (:class:`~ntkexp.layers.conv.Conv`, the activation
layer, :class:`~ntkexp.layers.pool.GlobalAvgPool` or flatten,
:class:`~ntkexp.layers.dense.Dense`); the finite forward pass below calls those
layers' ``apply`` (keeping this module's parameter pytree), and the analytic
kernel is the composition's limit (:func:`ntkexp.layers.network.composition_kernel`,
which runs the fused map of :mod:`ntkexp.kernels.cnn` for this stack and the
generic per-layer maps, with the Mehler fallback, for activations without a
closed form).

Parameters as a pytree: ``{"convs": {h: {"W": (q, [q,] C_in, C_out), "b": (C_out,)}},
"readout": {"W": (F, out_dim), "b": (out_dim,)}}`` (``"b"`` absent when
``b_std == 0``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ntkexp.activations import SpecActivationMixin
from ntkexp.kernels.base import Kernel
from ntkexp.kernels.cnn import PIXEL_PAIRS
from ntkexp.layers.activation import Activation
from ntkexp.layers.combinators import serial
from ntkexp.layers.conv import Conv
from ntkexp.layers.dense import Dense
from ntkexp.layers.network import Network, composition_kernel
from ntkexp.layers.pool import GlobalAvgPool
from ntkexp.layers.reshape import Flatten
from ntkexp.models.registry import ARCHITECTURES, register_architecture
from ntkexp.models.validation import check_int as _check_int
from ntkexp.models.validation import check_std as _check_std
from ntkexp.models.validation import norm_activation_params as _norm_activation_params
from ntkexp.models.validation import promote

Array = jax.Array
READOUTS = ("gap", "vec")


@dataclasses.dataclass(frozen=True)
class CNNSpec(SpecActivationMixin):
    """A convolutional network, as the analytic and the finite side both see it.

    Attributes:
      depth: number of convolution layers (>= 0; 0 is a linear readout of x).
      width: channels of every convolution layer (> 0); ``channels`` is an alias.
      image_shape: spatial shape of one input, ``(L,)`` for 1-D or ``(H, W)``
        for 2-D signals (channels are not part of it), or None: taken from the
        inputs (flat ``(n, d)`` inputs are a 1-D signal of length d, 1 channel).
      filter_size: filter size ``q`` per spatial axis (>= 1).
      readout: ``"gap"`` (global average pooling) or ``"vec"`` (flatten).
      activation: registered activation name.
      W_std: weight multiplier sigma_w (>= 0); ``sqrt(2)`` keeps relu variances.
      b_std: bias multiplier sigma_b (>= 0; 0 means no bias).
      out_dim: output dimension (>= 1).
      activation_params: keyword parameters of the activation factory (stored
        as a sorted tuple of pairs, so the spec is hashable).
    """

    depth: int
    width: int
    image_shape: tuple | None = None
    filter_size: int = 3
    readout: str = "gap"
    activation: str = "relu"
    W_std: float = 1.0
    b_std: float = 0.0
    out_dim: int = 1
    activation_params: Any = ()

    def __post_init__(self):
        object.__setattr__(self, "activation_params",
                           _norm_activation_params(self.activation_params))
        _check_int("CNNSpec", "depth", self.depth, minimum=0)
        _check_int("CNNSpec", "width", self.width, minimum=1)
        _check_int("CNNSpec", "filter_size", self.filter_size, minimum=1)
        _check_int("CNNSpec", "out_dim", self.out_dim, minimum=1)
        shape = self.image_shape
        if shape is None:
            shape = ()
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if self.image_shape is not None and (
                not isinstance(shape, (tuple, list)) or len(shape) not in (1, 2)
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)):
            raise ValueError(
                "CNNSpec.image_shape must be a tuple of 1 or 2 positive integers "
                f"(the spatial shape, e.g. (8, 8)), got {self.image_shape!r}"
            )
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", tuple(int(s) for s in shape))
        if self.readout not in READOUTS:
            raise ValueError(f"unknown CNN readout {self.readout!r}; known: {', '.join(READOUTS)}")
        for name in ("W_std", "b_std"):
            object.__setattr__(self, name, _check_std("CNNSpec", name, getattr(self, name)))
        _ = self.act  # validates the activation name and its parameters

    @property
    def channels(self) -> int:
        return self.width

    def resolve(self, in_shape) -> CNNSpec:
        """This spec with ``image_shape`` fixed from an input: an int ``d``
        (flat: 1-D signal of length d) or a shape ``(*spatial, C)``."""
        if self.image_shape is not None:
            return self
        if isinstance(in_shape, (tuple, list)):
            if len(in_shape) == 1:
                return self.replace(image_shape=(int(in_shape[0]),))
            if len(in_shape) not in (2, 3):
                raise ValueError(
                    "CNN inputs need 1 or 2 spatial axes plus channels, "
                    f"got shape {tuple(in_shape)}"
                )
            return self.replace(image_shape=tuple(int(s) for s in in_shape[:-1]))
        _check_int("CNN", "in_dim", in_shape, minimum=1)
        return self.replace(image_shape=(int(in_shape),))

    def _need_shape(self) -> None:
        if self.image_shape is None:
            raise ValueError("this CNNSpec has image_shape=None; call spec.resolve(in_shape) first")

    @property
    def n_spatial(self) -> int:
        """Number of spatial axes k (1 or 2)."""
        self._need_shape()
        return len(self.image_shape)

    @property
    def n_positions(self) -> int:
        """Number of positions N = prod(image_shape)."""
        self._need_shape()
        return math.prod(self.image_shape)

    @property
    def patch_size(self) -> int:
        """P = q^k, the number of positions in one filter window."""
        return self.filter_size ** self.n_spatial

    @property
    def pad(self) -> tuple[int, int]:
        """``(lo, hi)`` zero padding per axis of lax's ``'SAME'`` (stride 1)."""
        lo = (self.filter_size - 1) // 2
        return lo, self.filter_size - 1 - lo

    def in_channels(self, in_dim) -> int:
        """Input channels from ``in_dim``: an int (flat size) or ``(*image_shape, C)``."""
        self = self.resolve(in_dim)
        if isinstance(in_dim, (tuple, list)) and len(in_dim) == 1:
            in_dim = int(in_dim[0])
        if isinstance(in_dim, (tuple, list)):
            if tuple(in_dim[:-1]) != self.image_shape or len(in_dim) != self.n_spatial + 1:
                raise ValueError(
                    f"CNN input shape {tuple(in_dim)} does not match image_shape "
                    f"{self.image_shape} plus a channel axis"
                )
            c = in_dim[-1]
        else:
            _check_int("CNN", "in_dim", in_dim, minimum=1)
            if in_dim % self.n_positions:
                raise ValueError(
                    f"flat input dimension {in_dim} is not a multiple of the "
                    f"{self.n_positions} positions of image_shape {self.image_shape}"
                )
            c = in_dim // self.n_positions
        _check_int("CNN", "input channels", c, minimum=1)
        return int(c)

    def replace(self, **changes) -> CNNSpec:
        return dataclasses.replace(self, **changes)

    def images(self, x, c_in: int | None = None) -> Array:
        """Inputs as images ``(n, *image_shape, C)`` (see :func:`as_images`)."""
        return as_images(self, x, c_in)

    def conv_layer(self):
        """One hidden layer's :class:`~ntkexp.layers.conv.Conv` (stride 1, SAME)."""
        return Conv(self.width, self.filter_size, 1, "SAME", self.W_std, self.b_std, "ntk")

    def layers(self):
        """The network as a layer composition: ``[conv, act] * depth``, pool, ``Dense(out_dim)``."""
        act = Activation(self.activation, self.activation_params)
        body = [lay for _ in range(self.depth) for lay in (self.conv_layer(), act)]
        pool = GlobalAvgPool() if self.readout == "gap" else Flatten()
        return serial(*body, pool, Dense(self.out_dim, self.W_std, self.b_std, "ntk",
                                         readout=True))


def as_images(spec: CNNSpec, x, c_in: int | None = None) -> Array:
    """Reshape inputs to ``(n, *image_shape, C)``; flat ``(n, N*C)`` is channels last.

    Raises:
      ValueError: if ``x`` is neither ``(n, *image_shape, C)`` nor ``(n, N * C)``
        (with ``C == c_in`` when given).
    """
    x = jnp.asarray(x)
    if spec.image_shape is None:
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim not in (3, 4):
            raise ValueError(
                "CNN inputs must be (n, d), (n, L, C) or (n, H, W, C), "
                f"got shape {tuple(x.shape)}"
            )
        spec = spec.resolve(x.shape[1:])
    k = spec.n_spatial
    if x.ndim == k + 2 and tuple(x.shape[1:-1]) == spec.image_shape:
        out = x
    elif x.ndim == 2 and x.shape[1] % spec.n_positions == 0:
        out = x.reshape(x.shape[0], *spec.image_shape, x.shape[1] // spec.n_positions)
    else:
        raise ValueError(
            f"CNN inputs must have shape (n, *{spec.image_shape}, C) or (n, "
            f"{spec.n_positions} * C) for image_shape {spec.image_shape}, got {tuple(x.shape)}"
        )
    if c_in is not None and out.shape[-1] != c_in:
        raise ValueError(
            f"CNN inputs have {out.shape[-1]} channels but the parameters expect {c_in}"
        )
    return out


def conv_dimension_numbers(k: int) -> tuple[str, str, str]:
    """lax dimension numbers for channels-last inputs and ``(q, [q,] I, O)`` filters."""
    sp = "HW"[:k]
    return (f"N{sp}C", f"{sp}IO", f"N{sp}C")


def conv(spec: CNNSpec, a: Array, W: Array) -> Array:
    """``W_std / sqrt(P C_in) * conv(W, a)`` with 'SAME' zero padding, stride 1.

    The :class:`~ntkexp.layers.conv.Conv` layer's forward pass (no bias).

    Args:
      a: ``(n, *image_shape, C_in)``; W: ``(q, [q,] C_in, C_out)``.

    Returns:
      ``(n, *image_shape, C_out)``.
    """
    return spec.conv_layer().apply({"W": W}, a)


@dataclasses.dataclass(frozen=True)
class CNNApply:
    """Pure ``apply_fn(params, x) -> (n, out_dim)`` for a :class:`CNNSpec`.

    Hashable (safe as a static jit argument). ``x`` is ``(n, *image_shape, C)``
    or flat ``(n, N * C)`` (channels last).

    The network is the composition :meth:`CNNSpec.layers`; this record keeps the
    CNN's parameter layout (``convs`` / ``readout``) and maps it onto the
    composition's (:meth:`to_layer_params`) for the model protocol: the
    structured empirical NTK (conv layers from their inputs' patches and
    backward vectors, :meth:`ntkexp.layers.conv.Conv.structured_ntk`) and the
    diagnostics are the composition's.
    """

    spec: CNNSpec

    def to_layer_params(self, params):
        """``{"convs", "readout"}`` -> the composition's ``{i: ...}`` layout (no copy)."""
        out = {}
        for h in range(self.spec.depth):
            out[2 * h] = params["convs"][h]
            out[2 * h + 1] = {}
        out[2 * self.spec.depth] = {}
        out[2 * self.spec.depth + 1] = params["readout"]
        return out

    def _net(self, params, x):
        convs = params["convs"]
        c_in = convs[0]["W"].shape[-2] if self.spec.depth else None
        a = as_images(self.spec, x, c_in).astype(params["readout"]["W"].dtype)
        spec = self.spec.resolve(a.shape[1:])
        return Network(spec.layers(), tuple(a.shape[1:])), self.to_layer_params(params), a

    @property
    def structured_available(self) -> bool:
        return True

    def structure_features(self, params, x: Array):
        net, p, a = self._net(params, x)
        return net.structure_features(p, a)

    def structure_pair(self, f1, f2, *, full: bool):
        (in1, bk1), (in2, bk2) = f1, f2
        layers = [la for la in self.spec.layers().layers if la.has_params]
        K = None
        for la, a1, a2, b1, b2 in zip(layers, in1, in2, bk1, bk2, strict=True):
            term = la.structured_ntk(a1, a2, b1, b2, full=full)
            K = term if K is None else K + term
        return K

    def preactivations(self, params, x: Array):
        net, p, a = self._net(params, x)
        return net.preactivations(p, a)

    def readout_features(self, params, x: Array):
        net, p, a = self._net(params, x)
        return net.readout_features(p, a)

    def __call__(self, params, x: Array) -> Array:
        spec = self.spec
        convs = params["convs"]
        if len(convs) != spec.depth:
            raise ValueError(
                f"params have {len(convs)} conv layers but the spec needs {spec.depth}"
            )
        c_in = convs[0]["W"].shape[-2] if spec.depth else None
        a, params = promote(as_images(spec, x, c_in), params)  # JAX promotion, no downcast
        convs, ro = params["convs"], params["readout"]
        spec = spec.resolve(a.shape[1:])
        act = spec.act
        layer = spec.conv_layer()
        for h in range(spec.depth):
            a = act.fn(layer.apply(convs[h], a))
        n = a.shape[0]
        if spec.readout == "gap":
            r = jnp.mean(a, axis=tuple(range(1, spec.n_spatial + 1)))
        else:
            r = a.reshape(n, -1)
        if r.shape[1] != ro["W"].shape[0]:
            raise ValueError(
                f"readout expects {ro['W'].shape[0]} features but the network gives {r.shape[1]}"
            )
        out = (spec.W_std / math.sqrt(r.shape[1])) * (r @ ro["W"])
        if "b" in ro:
            out = out + spec.b_std * ro["b"][None, :]
        return out


class _Conv(nnx.Module):
    def __init__(self, spec: CNNSpec, c_in: int, c_out: int, *, rngs: nnx.Rngs, dtype):
        shape = (spec.filter_size,) * spec.n_spatial + (c_in, c_out)
        self.W = nnx.Param(jax.random.normal(rngs.params(), shape, dtype))
        if spec.has_bias:
            self.b = nnx.Param(jax.random.normal(rngs.params(), (c_out,), dtype))


class _Readout(nnx.Module):
    def __init__(self, spec: CNNSpec, fan_in: int, *, rngs: nnx.Rngs, dtype):
        self.W = nnx.Param(jax.random.normal(rngs.params(), (fan_in, spec.out_dim), dtype))
        if spec.has_bias:
            self.b = nnx.Param(jax.random.normal(rngs.params(), (spec.out_dim,), dtype))


class CNN(nnx.Module):
    """Flax NNX convolutional network described by a :class:`CNNSpec`.

    Args:
      spec: the architecture.
      in_dim: input channels per position as ``(*image_shape, C)``, or the flat
        input size ``N * C`` (an int).
      rngs: ``nnx.Rngs``; parameters are drawn from ``rngs.params()``.
      dtype: parameter dtype (default float32).

    Calling the module maps ``(n, *image_shape, C)`` (or flat) to ``(n, out_dim)``.
    """

    def __init__(self, spec: CNNSpec, in_dim, *, rngs: nnx.Rngs, dtype=None):
        if not isinstance(spec, CNNSpec):
            raise TypeError(f"CNN needs a CNNSpec, got {type(spec).__name__}")
        dtype = dtype or jnp.float32
        c = spec.in_channels(in_dim)
        self.spec = spec
        spec = spec.resolve(in_dim)
        layers = []
        for _ in range(spec.depth):
            layers.append(_Conv(spec, c, spec.width, rngs=rngs, dtype=dtype))
            c = spec.width
        self.convs = nnx.List(layers)
        fan_in = c * (spec.n_positions if spec.readout == "vec" else 1)
        self.readout = _Readout(spec, fan_in, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return CNNApply(self.spec)(nnx.to_pure_dict(nnx.state(self, nnx.Param)), x)


def init_cnn_params(spec: CNNSpec, in_dim, key: Array, dtype=None):
    """Draw CNN parameters as a pure pytree (same draw as ``CNN(spec, in_dim, rngs)``)."""
    model = CNN(spec, in_dim, rngs=nnx.Rngs(params=key), dtype=dtype)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _build_cnn(spec: CNNSpec, in_dim, key, dtype=None):
    return CNNApply(spec), init_cnn_params(spec, in_dim, key, dtype)


def _cnn_analytic(spec: CNNSpec, x1, x2=None, **options):
    """The limit of :meth:`CNNSpec.layers` (the composition's kernel path)."""
    x1 = as_images(spec, x1)
    spec = spec.resolve(x1.shape[1:])
    x2 = None if x2 is None else as_images(spec, x2, x1.shape[-1])
    return composition_kernel(spec.layers(), x1, x2, **options)


def cnn_kernel(spec: CNNSpec, x1, x2=None, *, pixel_pairs: str = "auto") -> Kernel:
    """Infinite-width NNGP and NTK (CNTK) of the CNN ``spec``, for a scalar output.

    The limit of the composition :meth:`CNNSpec.layers`: for a closed-form or
    relu-family activation the ``conv_stack`` rule of :mod:`ntkexp.layers.fused`
    runs the fused map :func:`ntkexp.kernels.cnn.conv_stack_kernel` (Arora et
    al. 2019, CNTK-GAP / CNTK-V); other activations (tanh, softplus, a user's
    own) go layer by layer with the Mehler fallback.

    Args:
      spec: a :class:`CNNSpec` (its ``width`` is ignored; ``image_shape=None``
        takes the shape from ``x1``); any ``depth >= 0`` and readout.
      x1: inputs ``(n1, *image_shape, C)`` or flat ``(n1, N * C)`` (channels last).
      x2: inputs ``(n2, ...)`` like ``x1``, or None for ``x2 = x1`` (then the
        result is exactly symmetric).
      pixel_pairs: see :func:`~ntkexp.kernels.cnn.conv_stack_kernel`.

    Returns:
      ``Kernel(nngp=(n1, n2), ntk=(n1, n2))`` in the dtype of the inputs.
    """
    for attr in ("images", "layers", "act", "readout"):
        if not hasattr(spec, attr):
            raise TypeError(f"cnn_kernel needs a CNNSpec, got {type(spec).__name__}")
    if pixel_pairs not in PIXEL_PAIRS:
        raise ValueError(f"unknown pixel_pairs {pixel_pairs!r}; known: {', '.join(PIXEL_PAIRS)}")
    if pixel_pairs == "diagonal" and spec.readout == "gap":
        raise ValueError("the GAP readout needs all pixel pairs; use pixel_pairs='auto' or 'all'")
    return _cnn_analytic(spec, x1, x2, pixel_pairs=pixel_pairs)


def _register() -> None:
    if "cnn" not in ARCHITECTURES:
        register_architecture("cnn", make_spec=CNNSpec, analytic=_cnn_analytic)(_build_cnn)


_register()
