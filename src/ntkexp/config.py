"""YAML configs parsed into frozen, typed records at load time.

A config file looks like::

    experiment: jacot_fig1          # an experiment kind (`ntkexp list`)
    seed: 0
    dtype: float32                  # float32 | float64 (float64 enables jax x64)
    device: auto                    # auto | cpu | gpu
    plugins: [my_module]            # imported first; may register new names
    model: {arch: mlp, depth: 3, width: [500, 10000], activation: relu,
            W_std: 1.0, b_std: 0.1, parameterization: ntk}
    data: {name: gaussian, n_train: 100, dim: 2, target: product}
    train: {optimizer: gd, learning_rate: 1.0, steps: 200, inits: 10}
    params: {...}                   # the experiment's own section (its Params class)
    presets:
      cpu: {model.width: [500, 2000]}   # dotted overrides, applied by --preset cpu

A list where a field allows one (``model.width``, ``train.learning_rate``) is a
sweep. Unknown keys, wrong types and impossible values raise
:class:`ConfigError`, one line naming the file and the key path, with a
did-you-mean for misspelt keys. The schema layer (:func:`from_dict`) is generic
over dataclasses: field types come from the annotations, bounds from
``field(metadata={"min": ..., "max": ..., "min_exclusive": ...})``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import importlib
import inspect
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Union

import yaml

from ntkexp.activations import ACTIVATIONS
from ntkexp.data import DATASETS, TARGETS, default_dim
from ntkexp.kernels.tiling import parse_bytes
from ntkexp.layers.registry import LayerSpecError
from ntkexp.models import ARCHITECTURES
from ntkexp.optim import OPTIMIZERS
from ntkexp.registry import Registry, RegistryError


class ConfigError(ValueError):
    """A user error in a config: one readable line naming the file and key path."""


class SectionSchema(NamedTuple):
    """What an experiment kind tells the config loader about itself.

    Attributes:
      params: frozen dataclass of the config's ``params:`` section.
      check: optional ``RunConfig -> None`` raising :class:`ConfigError` for
        settings the experiment cannot handle.
    """

    params: type
    check: Callable[[Any], None] | None = None


#: The ``params:`` schema of each experiment kind, keyed by its YAML name. The config
#: loader knows no experiment: each one registers its schema here when it registers
#: itself (``ntkexp.experiments.register_experiment``), and :func:`resolve` looks the
#: config's ``experiment:`` up in it (or in the ``schemas`` it is handed).
SECTION_SCHEMAS: Registry[SectionSchema] = Registry("experiment")


def register_section_schema(name: str, params: type, check=None) -> SectionSchema:
    """Register (or replace) the ``params:`` schema of the experiment kind ``name``."""
    return SECTION_SCHEMAS.register(name, SectionSchema(params, check), overwrite=True)


# --------------------------------------------------------------------------
# Generic typed-schema layer over dataclasses
# --------------------------------------------------------------------------


def _where(source: str, path: str) -> str:
    loc = f"{source}: " if source else ""
    return f"{loc}{path}" if path else f"{loc}(top level)"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _check_bounds(value, meta: Mapping, where: str) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if "min" in meta and v < meta["min"]:
            raise ConfigError(f"{where}: must be >= {meta['min']}, got {v!r}")
        if "min_exclusive" in meta and v <= meta["min_exclusive"]:
            raise ConfigError(f"{where}: must be > {meta['min_exclusive']}, got {v!r}")
        if "max" in meta and v > meta["max"]:
            raise ConfigError(f"{where}: must be <= {meta['max']}, got {v!r}")
    if meta.get("nonempty") and isinstance(value, tuple) and not value:
        raise ConfigError(f"{where}: must not be an empty list")


def _convert(value, tp, where: str):
    """Check ``value`` against the annotation ``tp``; return the frozen value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _freeze(value)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, where)
    if origin is Literal:
        return _convert_literal(value, tp, where)
    if tp in (tuple, list) or origin in (tuple, list):
        return _convert_list(value, tp, where)
    if origin in (dict, Mapping) or tp is dict:
        return _convert_mapping(value, tp, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path=where.split(": ", 1)[-1] if ": " in where else where,
                         source=where.split(": ", 1)[0] if ": " in where else "")
    if tp in _SCALARS:
        return _SCALARS[tp](value, where)
    raise TypeError(f"config schema: unsupported annotation {tp!r} at {where}")


def _convert_union(value, tp, where: str):
    """The first alternative of ``tp`` that accepts ``value``; the non-list alternatives
    are tried first so that "5" stays a scalar."""
    for a in sorted(typing.get_args(tp), key=lambda a: typing.get_origin(a) in (tuple, list)):
        try:
            return _convert(value, a, where)
        except ConfigError:
            pass
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _convert_literal(value, tp, where: str):
    allowed = typing.get_args(tp)
    if value in allowed and not isinstance(value, bool):
        return value
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{where}: must be one of {', '.join(map(repr, allowed))}, "
                      f"got {value!r}{hint}")


def _convert_list(value, tp, where: str):
    """A bare ``tuple`` / ``list`` keeps its items as given; ``tuple[T, ...]`` converts each."""
    if tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return _freeze(value)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    item = args[0] if args else Any
    return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))


def _convert_mapping(value, tp, where: str):
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    args = typing.get_args(tp)
    vt = args[1] if len(args) == 2 else Any
    return types.MappingProxyType(
        {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()})


def _convert_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _convert_int(value, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return int(value)
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _convert_float(value, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _convert_str(value, where: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected a string, got {value!r}")


_SCALARS = {bool: _convert_bool, int: _convert_int, float: _convert_float, str: _convert_str}


def _freeze(value):
    if isinstance(value, Mapping):
        return types.MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def from_dict(cls, data, *, path: str = "", source: str = ""):
    """Build the frozen dataclass ``cls`` from a plain mapping, checking everything.

    Args:
      cls: a (frozen) dataclass whose field annotations give the schema.
      data: the mapping read from YAML (None means empty).
      path: dotted key path of ``data`` inside the file (for messages).
      source: the file name (for messages).

    Raises:
      ConfigError: unknown or missing keys, wrong types, values out of bounds.
    """
    where = _where(source, path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(fields)
            raise ConfigError(f"{_where(source, _join(path, key))}: unknown key{hint}; "
                              f"known keys: {known}")
    kwargs = {}
    for name, f in fields.items():
        sub = _join(path, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _where(source, sub))
            _check_bounds(kwargs[name], f.metadata, _where(source, sub))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_where(source, sub)}: missing required key")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(f"{_where(source, _join(path, msg.split(':', 1)[0]))}:"
                              f"{msg.split(':', 1)[1]}") from None
    return obj


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def to_dict(obj) -> Any:
    """Plain (YAML-safe) data from a config record, inverse of :func:`from_dict`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _bad(key: str, msg: str) -> ConfigError:
    """An error raised by a ``check()`` method: ``key: message`` (path added by caller)."""
    return ConfigError(f"{key}: {msg}")


def _pos(**extra):
    return dataclasses.field(metadata=dict(extra))


# --------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Network section. ``width`` may be a list: a sweep over widths.

    The keys are those of the architecture's spec (``make_spec`` of
    ``ntkexp.models.ARCHITECTURES[arch]``, e.g. ``MLPSpec``, ``TwoLayerSpec``,
    ``CNNSpec``): the common ones below are typed fields; every other field of
    the spec (``kappa`` of ``two_layer_relu``, ``readout`` of ``cnn``, ``alpha``
    of ``resmlp``, a plugin's own keys) lands in ``extra`` and reads as an
    attribute (``cfg.model.kappa``). A key the architecture's spec does not take
    is an error naming it; a common key left out takes the spec's own default.
    Build the config with :func:`model_from_dict` (``resolve`` does).

    Attributes:
      extra: the architecture-specific keys given in the config.
      given: the keys written in the config (internal; not saved).
    """

    arch: str = "mlp"
    depth: int = dataclasses.field(default=3, metadata={"min": 0})
    width: int | tuple[int, ...] = dataclasses.field(default=512,
                                                     metadata={"min": 1, "nonempty": True})
    activation: str = "relu"
    activation_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    W_std: float = dataclasses.field(default=1.0, metadata={"min": 0})
    b_std: float = dataclasses.field(default=0.0, metadata={"min": 0})
    parameterization: Literal["ntk", "standard", "mup", "mean_field"] = "ntk"
    out_dim: int = dataclasses.field(default=1, metadata={"min": 1})
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    given: tuple[str, ...] = ()

    def __getattr__(self, name):
        extra = self.__dict__.get("extra") or {}
        if name in extra:
            return extra[name]
        raise AttributeError(f"model config has no key {name!r}")

    def check(self):
        try:
            ARCHITECTURES.get(self.arch)
        except RegistryError as e:
            raise _bad("arch", str(e)) from None

    @property
    def widths(self) -> tuple[int, ...]:
        """The swept widths (a 1-tuple when ``width`` is one number)."""
        return self.width if isinstance(self.width, tuple) else (self.width,)

    def to_dict(self) -> dict:
        """The section as plain data, flat: ``arch``, ``width``, the common keys the
        architecture takes (or that were given) and the ``extra`` keys."""
        try:
            accepted, _, open_kw = spec_fields(ARCHITECTURES.get(self.arch).make_spec)
        except RegistryError:  # a plugin not imported: keep every key
            accepted, open_kw = {}, True
        d = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)
             if f.name not in ("extra", "given")
             and (f.name in ("arch", "width") or f.name in accepted
                  or (open_kw and f.name in self.given))}
        d.update({k: to_dict(v) for k, v in self.extra.items()})
        return d

    def spec(self, width: int):
        """The architecture's frozen spec (e.g. ``MLPSpec``) at one ``width``."""
        arch = ARCHITECTURES.get(self.arch)
        accepted, _, open_kw = spec_fields(arch.make_spec)
        kw = {}
        for name in _COMMON_MODEL_KEYS:
            if name == "width":
                continue
            if open_kw and name not in self.given and name not in accepted:
                continue
            if open_kw or name in accepted:
                v = getattr(self, name)
                kw[name] = dict(v) if isinstance(v, Mapping) else v
        kw.update({k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.extra.items()})
        kw["width"] = int(width)
        return arch.make_spec(**kw)


_COMMON_MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                           if f.name not in ("arch", "extra", "given"))


def spec_fields(make_spec) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """What an architecture's ``make_spec`` accepts.

    Returns:
      ``(annotations, defaults, open)``: ``annotations`` maps each keyword it
      takes to its type (``Any`` where unknown), ``defaults`` the keywords with a
      default to that default, and ``open`` is True when it takes ``**kwargs``.
    """
    if dataclasses.is_dataclass(make_spec) and isinstance(make_spec, type):
        try:
            hints = typing.get_type_hints(make_spec)
        except Exception:  # noqa: BLE001 - unresolvable annotations: no type check
            hints = {}
        ann, defaults = {}, {}
        for f in dataclasses.fields(make_spec):
            if not f.init:
                continue
            ann[f.name] = hints.get(f.name, Any)
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        return ann, defaults, False
    try:
        params = inspect.signature(make_spec).parameters
    except (TypeError, ValueError):
        return {}, {}, True
    ann = {n: Any for n, p in params.items()
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    defaults = {n: p.default for n, p in params.items()
                if n in ann and p.default is not inspect.Parameter.empty}
    open_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    return ann, defaults, open_kw


def model_from_dict(data, *, path: str = "model", source: str = "") -> ModelConfig:
    """Build a :class:`ModelConfig`, checking every key against the architecture.

    The architecture ``data["arch"]`` (default ``mlp``) must be registered; each
    other key must be a field of its spec (``make_spec``), and is type-checked
    against that field's annotation; the spec is then built at the first width,
    so values it rejects are reported here, naming the file and ``model``.

    Raises:
      ConfigError: unknown architecture, a key the architecture does not take,
        a wrong type, or a value its spec rejects.
    """
    where = _where(source, path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    name, arch = _model_arch(data, path, source)
    accepted, defaults, open_kw = spec_fields(arch.make_spec)
    if not open_kw and "width" not in accepted:
        raise ConfigError(f"{where}: architecture {name!r} has a spec without a 'width' "
                          "field, which every architecture needs (the runner sweeps it)")
    _check_model_keys(data, name, accepted, open_kw, path, source)
    base = _model_common_keys(data, defaults)
    cfg = from_dict(ModelConfig, base, path=path, source=source)
    extra = _model_extra_keys(data, base, accepted, path, source)
    cfg = dataclasses.replace(cfg, extra=types.MappingProxyType(extra),
                              given=tuple(str(k) for k in data))
    _check_model_values(cfg, name, accepted, open_kw, path, source)
    return cfg


def _model_arch(data: Mapping, path: str, source: str):
    """``(name, registered architecture)`` of ``data["arch"]`` (default ``mlp``)."""
    name = data.get("arch", "mlp")
    if not isinstance(name, str):
        raise ConfigError(f"{_where(source, _join(path, 'arch'))}: expected a string, got "
                          f"{name!r}")
    try:
        return name, ARCHITECTURES.get(name)
    except RegistryError as e:
        raise ConfigError(f"{_where(source, _join(path, 'arch'))}: {e}") from None


def _check_model_keys(data: Mapping, name: str, accepted: Mapping, open_kw: bool,
                      path: str, source: str) -> None:
    """Every key of ``data`` is one the architecture's spec takes (any, for a spec with
    ``**kwargs``, except ``extra`` / ``given``)."""
    known = ["arch"] + [k for k in accepted if k != "arch"]
    for key in data:
        if key == "arch" or open_kw and key not in ("extra", "given"):
            continue
        if key not in accepted:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{_where(source, _join(path, key))}: unknown key for "
                              f"architecture {name!r}{hint}; its keys: {', '.join(known)}")


def _model_common_keys(data: Mapping, defaults: Mapping) -> dict:
    """The keys of ``data`` that are :class:`ModelConfig` fields (and ``arch``); a common
    key left out takes the spec's own default, unless that does not fit the field."""
    base = {k: v for k, v in data.items() if k in _COMMON_MODEL_KEYS or k == "arch"}
    hints = typing.get_type_hints(ModelConfig)
    for k in _COMMON_MODEL_KEYS:
        if k not in base and k in defaults and k != "width":
            with contextlib.suppress(ConfigError, TypeError):
                base[k] = _convert(defaults[k], hints[k], k)
    return base


def _model_extra_keys(data: Mapping, base: Mapping, accepted: Mapping, path: str,
                      source: str) -> dict:
    """The architecture's own keys, each checked against its spec field's annotation
    (kept as given where the schema layer does not know the annotation)."""
    extra = {}
    for k, v in data.items():
        if k in base:
            continue
        w = _where(source, _join(path, k))
        try:
            extra[k] = _convert(v, accepted.get(k, Any), w)
        except TypeError:
            extra[k] = _freeze(v)
    return extra


def _check_model_values(cfg: ModelConfig, name: str, accepted: Mapping, open_kw: bool,
                        path: str, source: str) -> None:
    """The activation is registered and the spec builds at the first width."""
    if open_kw or "activation" in accepted:
        try:
            ACTIVATIONS.get(cfg.activation)
        except RegistryError as e:
            raise ConfigError(f"{_where(source, _join(path, 'activation'))}: {e}") from None
    try:
        cfg.spec(cfg.widths[0])
    except LayerSpecError as e:  # a bad entry of a layer list: name its key path
        raise ConfigError(f"{_where(source, _join(path, e.path))}: {e.msg}") from None
    except (TypeError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{_where(source, path)}: architecture {name!r} rejects these "
                          f"settings: {msg}") from None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset section; ``name`` is a key of ``ntkexp.data.DATASETS``.

    ``seed`` None means "derive from the top-level seed". ``angles`` (radians)
    places points on the unit circle for the ``circle`` dataset. ``path`` is the
    ``.npz`` file of the ``npz`` dataset; a relative path is read from the
    config file's folder (:func:`resolve` makes it absolute). ``dim`` left out
    follows the data set (:func:`ntkexp.data.default_dim`: digits 64, mnist1d
    40, an ``npz`` file's feature count, else 2).
    """

    name: str = "gaussian"
    n_train: int = dataclasses.field(default=100, metadata={"min": 1})
    n_test: int = dataclasses.field(default=0, metadata={"min": 0})
    dim: int | None = dataclasses.field(default=None, metadata={"min": 1})
    target: str = "product"
    noise: float = dataclasses.field(default=0.0, metadata={"min": 0})
    seed: int | None = None
    angles: tuple[float, ...] | None = None
    path: str | None = None
    classes: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.dim is None:
            object.__setattr__(self, "dim", default_dim(self.name, self.path))

    def check(self):
        for key, reg, name in (("name", DATASETS, self.name), ("target", TARGETS, self.target)):
            try:
                reg.get(name)
            except RegistryError as e:
                raise _bad(key, str(e)) from None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training section. ``learning_rate`` may be a list (a sweep); ``inits`` is
    the number of independent initialisations (seeds) per width. ``lazy_alpha``
    trains ``alpha (f(w) - f(w0))`` on the loss over ``alpha^2`` (Chizat et al.
    2019, :mod:`ntkexp.lazy`); null: the plain model."""

    optimizer: str = "gd"
    optimizer_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    learning_rate: float | tuple[float, ...] = dataclasses.field(
        default=1.0, metadata={"min_exclusive": 0.0, "nonempty": True})
    steps: int = dataclasses.field(default=100, metadata={"min": 0})
    inits: int = dataclasses.field(default=1, metadata={"min": 1})
    batch_size: int | None = dataclasses.field(default=None, metadata={"min": 1})
    loss_reduction: Literal["mean", "sum"] = "mean"
    lazy_alpha: float | None = dataclasses.field(default=None, metadata={"min_exclusive": 0.0})

    @property
    def learning_rates(self) -> tuple[float, ...]:
        lr = self.learning_rate
        return lr if isinstance(lr, tuple) else (lr,)

    def check(self):
        try:
            build = OPTIMIZERS.get(self.optimizer)
        except RegistryError as e:
            raise _bad("optimizer", str(e)) from None
        if self.optimizer == "gd" and self.batch_size is not None:
            raise _bad("batch_size", f"optimizer 'gd' is full-batch gradient descent, but "
                       f"batch_size is {self.batch_size}; use optimizer: sgd for mini-batches "
                       "or drop batch_size")
        _check_optimizer_options(build, self.optimizer, self.optimizer_options,
                                 self.learning_rates[0])


def _check_optimizer_options(build, name: str, options: Mapping, learning_rate: float) -> None:
    """``optimizer_options`` against the optimizer's signature, then by building it once
    (cheap: an optax transformation is two closures). Raises ``_bad`` errors."""
    factory = getattr(build, "factory", build)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    named = [n for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and n not in ("learning_rate", "lr", "apply_fn")]  # apply_fn: train passes it
    open_kw = not params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    for key in options:
        if key in ("learning_rate", "lr"):
            raise _bad(f"optimizer_options.{key}", "the learning rate is set by "
                       "train.learning_rate, not here")
        if not open_kw and key not in named:
            close = difflib.get_close_matches(str(key), named, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _bad(f"optimizer_options.{key}", f"unknown option of optimizer {name!r}"
                       f"{hint}; its options: {', '.join(named) or '(none)'}")
    try:
        build(learning_rate=learning_rate, **{k: _thaw(v) for k, v in options.items()})
    except (TypeError, ValueError) as e:
        raise _bad("optimizer_options", f"optimizer {name!r} rejects them: "
                   f"{' '.join(str(e).split())}") from None


def _thaw(v):
    if isinstance(v, Mapping):
        return {k: _thaw(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """``distributed:`` section: a multi-host run through ``jax.distributed.initialize``
    (see :func:`ntkexp.sharding.maybe_init_distributed`). Absent or ``enabled: false``:
    a single-host run. Fields left null are auto-detected by JAX (SLURM, TPU pods)."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = dataclasses.field(default=None, metadata={"min": 1})
    process_id: int | None = dataclasses.field(default=None, metadata={"min": 0})
    local_device_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class KernelsSection:
    """``kernels:`` section: how infinite-width kernels are computed in tiles
    (:mod:`ntkexp.kernels.tiling`).

    Attributes:
      memory_budget: bytes or a size (``"2GiB"``, ``"512MB"``) for the result held
        in memory plus the working memory of the running tiles.
      cache_dir: stream kernels to ``.npy`` files in this folder (resumable after
        an interruption; a file of another config/inputs is an error), or null.
      devices: ``default`` (one device) or ``all`` (one tile per local device).
    """

    memory_budget: str | int = "2GiB"
    cache_dir: str | None = None
    devices: Literal["default", "all"] = "default"

    def check(self):
        try:
            parse_bytes(self.memory_budget)
        except ValueError as e:
            raise _bad("memory_budget", str(e)) from None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole, resolved config (presets and overrides already applied).

    Attributes:
      experiment: name of an experiment kind (its schema in :data:`SECTION_SCHEMAS`).
      params: the experiment's own section, an instance of its ``Params`` class.
      source: the file it came from (not part of the config proper).
      preset: the preset that was applied, or None.
    """

    experiment: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    params: Any
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    plugins: tuple[str, ...] = ()
    description: str = ""
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    kernels: KernelsSection = dataclasses.field(default_factory=KernelsSection)
    source: str = ""
    preset: str | None = None

    def to_dict(self) -> dict:
        """The resolved config as plain data (what ``config.yaml`` of a run holds)."""
        d = to_dict(self)
        d["model"] = self.model.to_dict()
        for k in ("presets", "source", "preset"):
            d.pop(k)
        return d


_TOP_KEYS = ("experiment", "seed", "dtype", "device", "plugins", "description", "model",
             "data", "train", "params", "presets", "distributed", "kernels")


# --------------------------------------------------------------------------
# Loading, presets, overrides
# --------------------------------------------------------------------------


def read_yaml(path: str) -> dict:
    """Read a YAML mapping; missing file / malformed YAML -> :class:`ConfigError`."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such config file")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a folder, not a config file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{line}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got "
                          f"{type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.width=1024"`` -> ``("model.width", 1024)``; values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. model.width=1024")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: cannot parse value {raw!r} as YAML") from None
    return key, value


def apply_override(data: dict, key: str, value, *, origin: str = "--set") -> None:
    """Set the dotted ``key`` in the nested dict ``data`` (in place)."""
    parts = key.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{origin} {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def import_plugins(names: Sequence[str], source: str = "") -> None:
    """Import the user's plugin modules (they register names in the registries).

    A module already imported is not imported again. Any failure while importing
    one (not found, a syntax error, an exception in its code, a name it
    registers that is already taken) is one :class:`ConfigError` line naming
    the plugin and the config key.
    """
    for i, name in enumerate(names):
        where = _where(source, f"plugins[{i}]")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: expected a module name, got {name!r}")
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except RegistryError as e:
            raise ConfigError(f"{where}: plugin {name!r} failed to register: {e}") from None
        except ModuleNotFoundError as e:
            hint = (" (is its folder on PYTHONPATH?)" if e.name == name.split(".")[0] else "")
            raise ConfigError(f"{where}: cannot import plugin {name!r}: {e}{hint}") from None
        except Exception as e:  # noqa: BLE001 - any error in user code is one line
            text = " ".join(str(e).split())
            at = ""
            if isinstance(e, SyntaxError) and e.lineno:
                at = f" (line {e.lineno})"
            raise ConfigError(f"{where}: cannot import plugin {name!r}: {type(e).__name__}"
                              f"{at}: {text}") from None


def resolve(data: Mapping, *, source: str = "", preset: str | None = None,
            overrides: Sequence[str | tuple[str, Any]] = (),
            schemas: Registry[SectionSchema] | None = None) -> RunConfig:
    """Apply ``preset`` then ``overrides`` to raw config ``data`` and validate it.

    Args:
      data: the mapping read from a config file.
      source: the file name, for messages.
      preset: a name in ``data["presets"]`` or None.
      overrides: ``"a.b=value"`` strings (or ``(key, value)`` pairs), applied last.
      schemas: the experiments' ``params:`` schemas by name (default
        :data:`SECTION_SCHEMAS`, filled by ``ntkexp.experiments`` when imported).

    Returns:
      The frozen :class:`RunConfig`.
    """
    data = copy.deepcopy(dict(data))
    _check_top_keys(data, source, list_known=True)
    _apply_preset_and_overrides(data, source, preset, overrides)
    _check_top_keys(data, source)  # an override may have introduced a misspelt key
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list):
        raise ConfigError(f"{_where(source, 'plugins')}: expected a list of module names")
    import_plugins(plugins, source)
    name, exp = _experiment_schema(data, source, schemas)
    _resolve_data_path(data, source)
    cfg = _build_run_config(data, name, exp, source, preset)
    _check_run_config(cfg, exp, source)
    return cfg


def _check_top_keys(data: Mapping, source: str, *, list_known: bool = False) -> None:
    for key in data:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), _TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = f"; known keys: {', '.join(_TOP_KEYS)}" if list_known else ""
            raise ConfigError(f"{_where(source, str(key))}: unknown key{hint}{known}")


def _apply_preset_and_overrides(data: dict, source: str, preset: str | None,
                                overrides: Sequence[str | tuple[str, Any]]) -> None:
    """Apply ``data["presets"][preset]`` then ``overrides`` to ``data`` in place."""
    presets = data.get("presets") or {}
    if not isinstance(presets, dict) or any(not isinstance(v, dict) for v in presets.values()):
        raise ConfigError(f"{_where(source, 'presets')}: expected a mapping of preset name "
                          "to {dotted.key: value}")
    if preset is not None:
        if preset not in presets:
            close = difflib.get_close_matches(preset, list(presets), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(presets) or "(none)"
            raise ConfigError(f"{source or 'config'}: unknown preset {preset!r}{hint}; "
                              f"known: {known}")
        for k, v in presets[preset].items():
            apply_override(data, str(k), copy.deepcopy(v), origin=f"preset {preset}:")
    for ov in overrides:
        k, v = parse_override(ov) if isinstance(ov, str) else ov
        apply_override(data, k, v)


def _experiment_schema(data: Mapping, source: str,
                       schemas: Registry[SectionSchema] | None) -> tuple[str, SectionSchema]:
    """``(name, schema)`` of the config's ``experiment`` key."""
    schemas = SECTION_SCHEMAS if schemas is None else schemas
    if not len(schemas):
        raise ConfigError(f"{_where(source, 'experiment')}: no experiment kinds are "
                          "registered; import ntkexp.experiments (it registers the built-in "
                          "ones) before loading a config, or pass schemas=")
    if "experiment" not in data:
        raise ConfigError(f"{_where(source, 'experiment')}: missing required key (one of: "
                          f"{', '.join(schemas.names())})")
    name = data["experiment"]
    if not isinstance(name, str):
        raise ConfigError(f"{_where(source, 'experiment')}: expected a string, got {name!r}")
    try:
        return name, schemas.get(name)
    except RegistryError as e:
        raise ConfigError(f"{_where(source, 'experiment')}: {e}") from None


def _resolve_data_path(data: Mapping, source: str) -> None:
    """A relative ``data.path`` is read from the config's own folder, not the working one
    (made absolute in place); ``~`` is expanded."""
    dsec = data.get("data")
    if isinstance(dsec, dict) and isinstance(dsec.get("path"), str) and dsec["path"] \
            and not os.path.isabs(os.path.expanduser(dsec["path"])):
        base = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
        dsec["path"] = os.path.normpath(os.path.join(base, dsec["path"]))
    elif isinstance(dsec, dict) and isinstance(dsec.get("path"), str):
        dsec["path"] = os.path.expanduser(dsec["path"])


def _build_run_config(data: Mapping, name: str, exp: SectionSchema, source: str,
                      preset: str | None) -> RunConfig:
    """Every section checked against its schema, frozen into a :class:`RunConfig`."""
    sections = {}
    sections["model"] = model_from_dict(data.get("model"), path="model", source=source)
    for key, cls in (("data", DataConfig), ("train", TrainConfig), ("params", exp.params)):
        sections[key] = from_dict(cls, data.get(key), path=key, source=source)
    sections["distributed"] = from_dict(DistributedSection, data.get("distributed"),
                                        path="distributed", source=source)
    sections["kernels"] = from_dict(KernelsSection, data.get("kernels"), path="kernels",
                                    source=source)
    top = {k: v for k, v in data.items()
           if k not in ("model", "data", "train", "params", "distributed", "kernels")}
    top.pop("experiment")
    # reuse the schema layer for the scalar top-level keys
    scalars = from_dict(_TopLevel, top, source=source)
    return RunConfig(experiment=name, **sections, seed=scalars.seed, dtype=scalars.dtype,
                     device=scalars.device, plugins=scalars.plugins,
                     description=scalars.description, presets=scalars.presets,
                     source=source, preset=preset)


def _check_run_config(cfg: RunConfig, exp: SectionSchema, source: str) -> None:
    """Checks across sections: the batch fits the training set; the experiment's own."""
    bs = cfg.train.batch_size
    if bs is not None and bs > cfg.data.n_train:  # train() would refuse it after set-up
        raise ConfigError(f"{_where(source, 'train.batch_size')}: {bs} is larger than the "
                          f"{cfg.data.n_train} training points (data.n_train)")
    check = getattr(exp, "check", None)
    if check is not None:
        try:
            check(cfg)
        except ConfigError as e:
            raise ConfigError(f"{source + ': ' if source else ''}{e}") from None


@dataclasses.dataclass(frozen=True)
class _TopLevel:
    seed: int = dataclasses.field(default=0, metadata={"min": 0})
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    plugins: tuple[str, ...] = ()
    description: str = ""
    presets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def load(path: str, *, preset: str | None = None,
         overrides: Sequence[str | tuple[str, Any]] = (),
         schemas: Registry[SectionSchema] | None = None) -> RunConfig:
    """Read, merge and validate the config file at ``path`` (see :func:`resolve`)."""
    return resolve(read_yaml(path), source=path, preset=preset, overrides=overrides,
                   schemas=schemas)
