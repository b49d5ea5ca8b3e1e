"""The registry of layer kinds, keyed by their YAML name, and the YAML layer-list parser.

A config describes an architecture as a list of entries::

    model:
      arch: layers
      width: 64                      # hidden width of entries that do not set one
      layers:
        - {dense: {width: 64}}       # a mapping: kind -> its keys
        - relu                       # a bare name: a kind without keys, or any activation
        - {leaky_relu: {slope: 0.1}} # an activation with parameters
        - {residual: {scale: 0.5, layers: [relu, {dense: {}}]}}
        - {dense: {out: 1}}          # the readout (its width is not swept)

Each kind is a factory ``(**keys) -> Layer`` registered with
:func:`register_layer`; its keyword names are the YAML keys. Keys named
``layers`` (a list of entries) and ``branches`` (a list of lists) are parsed
recursively. Model-level defaults (``width``, ``W_std``, ``b_std``,
``parameterization``) fill the keys of that name that an entry leaves out, for
every factory that takes them. Every registered activation name
(:data:`ntkexp.activations.ACTIVATIONS`, a user's own included) is a layer.

Errors are :class:`LayerSpecError` (a ``ValueError``) with ``path``, the key
path inside the list (``layers[2].dense.widht``), and a one-line message.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ntkexp.activations import ACTIVATIONS
from ntkexp.layers.activation import Activation
from ntkexp.layers.base import Layer
from ntkexp.layers.combinators import frozen, parallel, residual, serial
from ntkexp.layers.dense import Dense
from ntkexp.layers.reshape import Flatten
from ntkexp.registry import Registry, RegistryError

LAYERS: Registry[Callable[..., Layer]] = Registry("layer")
DEFAULT_KEYS = ("width", "W_std", "b_std", "parameterization")


class LayerSpecError(ValueError):
    """A bad entry in a layer list: ``path`` (e.g. ``layers[2].dense.widht``) and a message."""

    def __init__(self, path: str, msg: str):
        super().__init__(f"{path}: {msg}")
        self.path = path
        self.msg = msg


def register_layer(name: str, *, overwrite: bool = False):
    """Decorator: register a layer factory ``(**keys) -> Layer`` under the YAML name ``name``."""
    return LAYERS.register(name, overwrite=overwrite)


def _keys_of(factory) -> tuple[list[str], bool]:
    params = inspect.signature(factory).parameters
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params.values())


def known_kinds() -> list[str]:
    """Every name a layer entry may use (layer kinds and activations)."""
    return sorted(set(LAYERS.names()) | set(ACTIVATIONS.names()))


def _plain(v):
    """Mapping-like / tuple-of-pairs frozen forms back to dicts and lists."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _name_and_keys(entry, path: str) -> tuple[str, dict]:
    """``(kind, keys)`` of a YAML entry: a name, or a one-key mapping ``{kind: {keys}}``."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        name, keys = next(iter(entry.items()))
        if keys is None:
            keys = {}
        if name in ("serial", "frozen") and isinstance(keys, list):
            keys = {"layers": keys}
        if not isinstance(keys, dict):
            raise LayerSpecError(f"{path}.{name}", f"expected a mapping of keys, got {keys!r}")
        return name, keys
    raise LayerSpecError(path, "expected a layer name or a one-key mapping "
                         f"{{kind: {{keys}}}}, got {entry!r}")


def _layer_keywords(name: str, keys: dict, where: str, defaults: dict, names, open_kw) -> dict:
    """The factory's keywords: keys checked, model-level defaults filled in, nested
    layer lists (``layers``, ``branch``, ``branches``) parsed."""
    for k in keys:
        if k not in names and not open_kw:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LayerSpecError(f"{where}.{k}", f"unknown key for layer {name!r}{hint}; "
                                 f"its keys: {', '.join(names) or '(none)'}")
    kw = dict(keys)
    for k in DEFAULT_KEYS:
        if k in names and k not in kw and k in defaults and defaults[k] is not None:
            kw[k] = defaults[k]
    for lk in ("layers", "branch"):
        if lk in kw:
            kw[lk] = parse_layers(kw[lk], f"{where}.{lk}", defaults)
    if "branches" in kw:
        br = kw["branches"]
        if not isinstance(br, list) or not br:
            raise LayerSpecError(f"{where}.branches", "expected a list of layer lists")
        kw["branches"] = [parse_layers(b if isinstance(b, list) else [b],
                                       f"{where}.branches[{i}]", defaults)
                          for i, b in enumerate(br)]
    return kw


def parse_layer(entry, path: str = "layers[0]", defaults: Mapping[str, Any] | None = None) -> Layer:
    """One YAML entry (a name or a one-key mapping) -> a :class:`Layer`."""
    defaults = dict(defaults or {})
    entry = _plain(entry)
    if isinstance(entry, Layer):
        return entry
    name, keys = _name_and_keys(entry, path)
    where = f"{path}.{name}" if keys or not isinstance(entry, str) else path
    try:
        if name in LAYERS:
            factory = LAYERS.get(name)
            return factory(**_layer_keywords(name, keys, where, defaults, *_keys_of(factory)))
        if name in ACTIVATIONS:
            return Activation(name, keys)
    except LayerSpecError:
        raise
    except (TypeError, ValueError) as e:
        raise LayerSpecError(where, " ".join(str(e).split())) from None
    close = difflib.get_close_matches(str(name), known_kinds(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise LayerSpecError(path, f"unknown layer {name!r}{hint}; known: {', '.join(known_kinds())}")


def parse_layers(entries, path: str = "layers",
                 defaults: Mapping[str, Any] | None = None) -> list[Layer]:
    """A YAML list of entries -> a list of layers (``path`` names the list in errors)."""
    entries = _plain(entries)
    if not isinstance(entries, list):
        raise LayerSpecError(path, f"expected a list of layers, got {entries!r}")
    return [parse_layer(e, f"{path}[{i}]", defaults) for i, e in enumerate(entries)]


def build_layers(entries, *, path: str = "layers", **defaults) -> Layer:
    """A YAML list -> ``serial(*layers)``."""
    layers = parse_layers(entries, path, defaults)
    if not layers:
        raise LayerSpecError(path, "the layer list is empty")
    return serial(*layers)


# --------------------------------------------------------------------------
# Built-in kinds (conv/pool kinds register from ntkexp.layers.conv / pool)
# --------------------------------------------------------------------------


@register_layer("dense")
def _dense(width: int | None = None, out: int | None = None, W_std: float = 1.0,
           b_std: float = 0.0, parameterization: str = "ntk"):
    """``{dense: {width: n}}`` (hidden, swept with the model width) or ``{dense: {out: k}}``."""
    if out is not None:
        return Dense(out, W_std, b_std, parameterization, readout=True)
    if width is None:
        raise ValueError("dense needs 'width' (or 'out' for the readout), or a model width")
    return Dense(width, W_std, b_std, parameterization)


@register_layer("activation")
def _activation(name: str, params: Mapping | None = None):
    """``{activation: {name: tanh, params: {...}}}`` (same as the bare name)."""
    return Activation(name, dict(params or {}))


@register_layer("serial")
def _serial(layers: Sequence[Layer] = ()):
    return serial(*layers)


@register_layer("parallel")
def _parallel(branches: Sequence[Sequence[Layer]] = (), scales: Sequence[float] | None = None):
    """``{parallel: {branches: [[...], [...]], scales: [1.0, 0.5]}}``: the scaled sum."""
    return parallel(*(serial(*b) for b in branches), scales=scales)


@register_layer("residual")
def _residual(layers: Sequence[Layer] = (), scale: float = 1.0, branch: Sequence[Layer] = ()):
    """``{residual: {scale: a, layers: [...]}}``: ``x + a * serial(layers)(x)``
    (``branch`` is a synonym of ``layers``)."""
    return residual(*(tuple(layers) + tuple(branch)), scale=scale)


@register_layer("frozen")
def _frozen(layers: Sequence[Layer] = ()):
    """``{frozen: [...]}``: the layers with untrained parameters."""
    return frozen(serial(*layers))


@register_layer("flatten")
def _flatten():
    return Flatten()


__all__ = ["LAYERS", "LayerSpecError", "build_layers", "known_kinds", "parse_layer",
           "parse_layers", "register_layer", "RegistryError"]
