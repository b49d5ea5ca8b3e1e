"""The check pass run by ``ntkexp validate`` and, before any work, by ``ntkexp run``.

:func:`preflight` takes a resolved config (:func:`ntkexp.config.load` already
checked keys, types, bounds, registry names, the optimizer's options against
its signature and the experiment's own ``check``) and checks what needs the
data and the models, without training or writing anything:

1. **device**: ``device: cpu|gpu`` names a backend JAX sees;
2. **data**: the data set builds (an ``npz`` file exists, holds the four
   arrays with consistent shapes), its arrays are finite;
3. **models**, at every swept width: the architecture's spec builds; its
   network is built abstractly (``jax.eval_shape``: no parameter is drawn, no
   program compiled) and applied to two training inputs; for ``arch: layers``
   each entry's output shape is checked in order, so a shape error names
   ``model.layers[i]`` (and suggests ``model.input_shape`` when the data are
   flat but a layer needs spatial axes); the output must have as many columns
   as the targets (a layer list without a readout fails here);
4. **kernel state**: where the architecture registers an analytic limit, the
   kernel map is traced abstractly, layer by layer for ``arch: layers``, so an
   activation on a non-Gaussian state (relu after relu, relu before layer_norm,
   a residual branch starting with an activation after an activation) names
   its ``model.layers[i]`` (skipped with ``params.limit: monte_carlo``);
5. **activations** (the model's and every activation entry of a layer list):
   on floating inputs they give finite floating outputs, and their derivative
   is not zero everywhere (the NTK is built from ``phi'``: a step function has
   an NTK of zero, an empty figure).

Every failure is a :class:`ntkexp.config.ConfigError`: one line naming the
config file and the key path; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from ntkexp.activations import ACTIVATIONS, get_activation
from ntkexp.config import ConfigError
from ntkexp.data import DataError, load_dataset
from ntkexp.experiments import streams
from ntkexp.layers.activation import Activation as ActivationLayer
from ntkexp.layers.base import input_state
from ntkexp.layers.combinators import Serial
from ntkexp.models import ARCHITECTURES
from ntkexp.models.layered import LayersSpec
from ntkexp.registry import RegistryError

#: Points at which an activation's values and derivative are probed.
_PROBE = np.linspace(-3.0, 3.0, 61)


class Checked(NamedTuple):
    """What :func:`preflight` found: the data set and notes worth printing."""

    data: Any
    notes: tuple[str, ...]


def _at(cfg, path: str) -> str:
    return f"{cfg.source}: {path}" if cfg.source else path


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _typed(e: BaseException) -> str:
    return f"{type(e).__name__}: {_one_line(e)}"


def check_device(cfg) -> None:
    """``device: cpu|gpu`` must be a backend JAX sees (``auto`` always is)."""
    if cfg.device == "auto":
        return
    try:
        devs = jax.local_devices(backend=cfg.device)
    except RuntimeError:
        devs = []
    if not devs:
        seen = ", ".join(sorted({d.platform for d in jax.devices()}))
        raise ConfigError(f"{_at(cfg, 'device')}: {cfg.device} was asked for but JAX sees no "
                          f"{cfg.device.upper()} (available: {seen}); use device: auto or cpu")


def check_data(cfg, dtype):
    """Build the data set; it must load and hold only finite values.

    Returns:
      The :class:`ntkexp.data.Dataset`.
    """
    try:
        data = load_dataset(cfg.data, streams.data_key(cfg), dtype)
    except (DataError, RegistryError) as e:
        msg = _one_line(e)
        src = f"{cfg.source}: " if cfg.source else ""
        raise ConfigError(f"{src}{msg}" if msg.startswith("data.") else
                          f"{src}data: {msg}") from None
    for name, arr in zip(("x_train", "y_train", "x_test", "y_test"), data, strict=True):
        a = np.asarray(arr)
        if a.size and not np.all(np.isfinite(a)):
            bad = int(np.sum(~np.isfinite(a)))
            raise ConfigError(f"{_at(cfg, 'data')}: {name} of data set {cfg.data.name!r} has "
                              f"{bad} NaN or inf value(s)")
    return data


def _activation_names(cfg, spec) -> list[tuple[str, str, Mapping]]:
    """``(key path, activation name, params)`` of every activation the model uses."""
    out = []
    if isinstance(spec, LayersSpec):
        def walk(layer, path):
            if isinstance(layer, ActivationLayer):
                out.append((path, layer.name, dict(layer.params)))
            for child in layer.children():
                walk(child, path)

        top = spec.layer
        entries = top.layers if isinstance(top, Serial) else (top,)
        for i, la in enumerate(entries):
            walk(la, f"model.layers[{i}]")
        return out
    name = getattr(spec, "activation", None)
    if isinstance(name, str) and name in ACTIVATIONS:
        out.append(("model.activation", name, dict(getattr(spec, "activation_params", ()) or {})))
    return out


def check_activation(path: str, name: str, params: Mapping, dtype, where) -> None:
    """An activation must map floats to finite floats and have a nonzero derivative."""
    act = get_activation(name, dict(params))
    z = jnp.asarray(_PROBE, dtype)
    try:
        y = act.fn(z)
        d = act.derivative(z)
    except Exception as e:  # noqa: BLE001 - user code: one line
        raise ConfigError(f"{where(path)}: activation {name!r} fails on floating inputs: "
                          f"{_one_line(e)}") from None
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise ConfigError(f"{where(path)}: activation {name!r} returns {y.dtype} values; an "
                          "activation must return floating-point values (no rounding or casts)")
    if y.shape != z.shape or not bool(jnp.all(jnp.isfinite(y))):
        raise ConfigError(f"{where(path)}: activation {name!r} must be elementwise and finite "
                          f"on [-3, 3], got shape {tuple(y.shape)}")
    d = np.asarray(d)
    if not np.all(np.isfinite(d)) or not np.any(d != 0):
        raise ConfigError(f"{where(path)}: activation {name!r} has a zero (or undefined) "
                          "derivative on [-3, 3]; the NTK is built from the derivative, so it "
                          "would be zero (use a differentiable activation)")


def _shape_hint(x_shape, msg: str) -> str:
    if len(x_shape) == 2 and any(w in msg for w in ("spatial", "(L, C)", "(H, W, C)", "conv")):
        return (f"; the data are flat (n, {x_shape[1]}): set model.input_shape, e.g. "
                f"[{x_shape[1]}, 1] for 1-D signals or [H, W, C] for images")
    return ""


def _check_layers(cfg, spec: LayersSpec, x, where) -> None:
    """Shapes, then the kernel state, entry by entry (names ``model.layers[i]``)."""
    top = spec.layer
    entries = top.layers if isinstance(top, Serial) and len(top.layers) == len(spec.layers) \
        else None
    in_shape = tuple(x.shape[1:])
    shape = in_shape
    if spec.input_shape is not None:
        if int(np.prod(spec.input_shape)) != int(np.prod(in_shape)):
            raise ConfigError(f"{where('model.input_shape')}: {list(spec.input_shape)} holds "
                              f"{int(np.prod(spec.input_shape))} values but each input has "
                              f"{int(np.prod(in_shape))} (data.dim)")
        shape = tuple(spec.input_shape)
    if entries is None:
        return
    for i, la in enumerate(entries):
        try:
            shape = la.out_shape(shape)
        except (ValueError, TypeError) as e:
            msg = _one_line(e)
            raise ConfigError(f"{where(f'model.layers[{i}]')}: {msg} (its input has "
                              f"per-example shape {tuple(shape)}){_shape_hint(x.shape, msg)}") \
                from None
    if len(shape) != 1:
        raise ConfigError(f"{where('model.layers')}: the network's output must be flat "
                          f"(n, out_dim), got per-example shape {shape}; end with flatten or "
                          "global_avg_pool and a dense readout")
    if not _needs_analytic(cfg):
        return
    at = [0]

    def kernel_walk(x1):
        xs = x1 if spec.input_shape is None else x1.reshape(x1.shape[0], *spec.input_shape)
        state = input_state(xs)
        for i, la in enumerate(entries):
            at[0] = i
            state = la.kernel(state)
        return state.ntk

    try:
        jax.eval_shape(kernel_walk, x)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ConfigError(f"{where(f'model.layers[{at[0]}]')}: {_one_line(e)}") from None


def _owner(obj) -> str:
    """The module that defined ``obj`` (to name a plugin in an error)."""
    mod = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None)
    return str(mod) if mod else "an unknown module"


def check_architecture(cfg, data, dtype) -> None:
    """Check that a plug-in architecture's builder gives a usable network.

    Built-in architectures (defined under ``ntkexp.``) are trusted. For a plug-in
    one, build the network at the smallest width and evaluate (abstractly, with
    ``jax.eval_shape``: nothing is compiled) ``apply_fn`` on two training inputs;
    it must return ``(apply_fn, params)`` with floating-point parameter leaves
    and an output of shape ``(2, out_dim)`` (the spec's ``out_dim``, else the
    number of target columns).

    Raises:
      ConfigError: one line naming the architecture and the plug-in module.
    """
    arch = ARCHITECTURES.get(cfg.model.arch)
    owner = _owner(arch.build)
    if owner == "ntkexp" or owner.startswith("ntkexp."):
        return
    who = f"{_at(cfg, 'model.arch')}: architecture {arch.name!r} of plugin {owner!r}"
    width = min(cfg.model.widths)
    x = data.x_train[:2]
    try:
        built = arch.build(cfg.model.spec(width), data.x_train.shape[1], streams.init_key(cfg, 0),
                           dtype)
    except Exception as e:  # noqa: BLE001 - any failure of user code is one line
        raise ConfigError(f"{who}: its builder failed at width {width}: {_typed(e)}") \
            from None
    if not (isinstance(built, tuple) and len(built) == 2 and callable(built[0])):
        raise ConfigError(f"{who}: its builder must return (apply_fn, params), got "
                        f"{type(built).__name__}")
    apply_fn, params = built
    leaves = jax.tree_util.tree_leaves(params)
    bad = [leaf for leaf in leaves
           if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if not leaves or bad:
        raise ConfigError(f"{who}: params must be a pytree of floating-point arrays, got "
                        f"{'no leaves' if not leaves else type(bad[0]).__name__}")
    try:
        out = jax.eval_shape(apply_fn, params, x)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{who}: apply_fn(params, x) fails on inputs of shape "
                        f"{tuple(x.shape)}: {_typed(e)}") from None
    # the spec's out_dim, else the number of target columns
    want = getattr(cfg.model.spec(width), "out_dim", None) or data.y_train.shape[1]
    shape = getattr(out, "shape", None)
    if (not isinstance(out, jax.ShapeDtypeStruct) or len(shape) != 2
            or shape[0] != x.shape[0] or shape[1] != want):
        expected = f"({x.shape[0]}, {want})"
        got = tuple(shape) if shape is not None else type(out).__name__
        raise ConfigError(f"{who}: apply_fn(params, x) must return shape {expected} for "
                        f"inputs of shape {tuple(x.shape)}, got {got}")


def _needs_analytic(cfg) -> bool:
    """False when the config asks for the Monte Carlo limit (``params.limit:
    monte_carlo``): the analytic kernel map is then never evaluated."""
    return getattr(cfg.params, "limit", None) != "monte_carlo"


def check_models(cfg, data, dtype, *, output_size: bool = True) -> None:
    """Every model of the sweep: spec, abstract build and forward pass, output size
    (unless ``output_size`` is False: the experiment sizes the readout itself),
    kernel state (see the module docstring)."""
    check_architecture(cfg, data, dtype)
    arch = ARCHITECTURES.get(cfg.model.arch)
    x = jax.ShapeDtypeStruct((2,) + tuple(data.x_train.shape[1:]), dtype)

    def where(path):
        return _at(cfg, path)

    for i, w in enumerate(cfg.model.widths):
        try:
            spec = cfg.model.spec(w)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where('model.width')}: architecture {cfg.model.arch!r} "
                              f"rejects width {w}: {_one_line(e)}") from None
        if i == 0:
            for path, name, params in _activation_names(cfg, spec):
                check_activation(path, name, params, dtype, where)
        if isinstance(spec, LayersSpec):
            _check_layers(cfg, spec, x, where)
        shape = _built_output_shape(cfg, arch, spec, data, x, dtype, w, where)
        if output_size:
            _check_output_size(cfg, spec, shape, int(data.y_train.shape[1]), where)
        if arch.analytic is not None and i == 0 and _needs_analytic(cfg):
            try:
                jax.eval_shape(lambda a, spec=spec: arch.analytic(spec, a), x)
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"{where('model')}: the infinite-width kernel of "
                                  f"architecture {cfg.model.arch!r} cannot be computed: "
                                  f"{_one_line(e)}") from None


def _built_output_shape(cfg, arch, spec, data, x, dtype, w, where) -> tuple:
    """The output shape ``(2, out)`` of the network at width ``w``, built abstractly."""
    built = {}

    def init(key):
        apply_fn, params = arch.build(spec, data.x_train.shape[1], key, dtype)
        built["apply_fn"] = apply_fn
        return params

    try:
        params = jax.eval_shape(init, jax.random.key(0))
        out = jax.eval_shape(built["apply_fn"], params, x)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure is the config's: one line
        msg = _one_line(e)
        raise ConfigError(f"{where('model')}: the network at width {w} cannot be built "
                          f"for inputs of shape {tuple(x.shape[1:])}: {msg}"
                          f"{_shape_hint(data.x_train.shape, msg)}") from None
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != 2:
        raise ConfigError(f"{where('model')}: the network must return (n, out_dim), got "
                          f"{shape if shape is not None else type(out).__name__}")
    return tuple(shape)


def _check_output_size(cfg, spec, shape: tuple, targets: int, where) -> None:
    """The network's output width equals the number of target columns."""
    if shape[1] == targets:
        return
    layered = isinstance(spec, LayersSpec)
    readout = (f"; end the layer list with a readout {{dense: {{out: {targets}}}}}" if layered
               else f"; set model.out_dim: {targets}")
    key = "model.layers" if layered else "model.out_dim"
    raise ConfigError(f"{where(key)}: the network gives {shape[1]} output(s) but the "
                      f"targets of data set {cfg.data.name!r} have {targets} "
                      f"column(s){readout}")


#: Keys a rerun into the same folder may change: the sweep lists and inits (the
#: units of the rest are reused), and settings that never change a unit.
_RERUN_FREE = (("model", "width"), ("train", "inits"), ("train", "learning_rate"),
               ("device",), ("description",), ("distributed",), ("kernels",))


def _comparable(d: Mapping) -> dict:
    d = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}
    for path in _RERUN_FREE:
        node = d
        for p in path[:-1]:
            node = node.get(p) if isinstance(node.get(p), dict) else {}
        node.pop(path[-1], None)
    params = d.get("params")
    if isinstance(params, dict):  # the limit's own settings never change a unit
        d["params"] = {k: v for k, v in params.items() if k != "limit" and not k.startswith("mc_")}
    return d


def check_run_folder(cfg, workdir: str, force: bool) -> None:
    """A run folder holding another config's results is an error unless ``force``.

    "Another config" is one whose units would not be reused: its resolved
    ``config.yaml`` differs from ``cfg`` in more than the swept widths and
    learning rates, the number of inits, the device, description,
    ``distributed``, ``kernels`` and the limit's ``params`` (``limit``, ``mc_*``).
    """
    path = os.path.join(workdir, "config.yaml")
    if force or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            old = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return  # unreadable: the run rewrites it
    if not isinstance(old, Mapping):
        return
    new = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    a, b = _comparable(old), _comparable(new)
    if a == b:
        return
    keys = sorted({k for k in set(a) | set(b) if a.get(k) != b.get(k)})
    detail = []
    for k in keys:
        if isinstance(a.get(k), Mapping) and isinstance(b.get(k), Mapping):
            sub = sorted({s for s in set(a[k]) | set(b[k]) if a[k].get(s) != b[k].get(s)})
            detail += [f"{k}.{s}" for s in sub]
        else:
            detail.append(k)
    raise ConfigError(f"--out {workdir}: the folder holds the results of another config "
                      f"(it differs in {', '.join(detail[:4])}{', ...' if len(detail) > 4 else ''}"
                      "); pick another --out, or pass --force to replace them")


def notes(cfg) -> tuple[str, ...]:
    """Lines worth saying about a valid config (what an optimizer name means here)."""
    out = []
    if cfg.train.optimizer == "sgd" and cfg.train.batch_size is None:
        out.append("note: train.optimizer sgd without train.batch_size takes full-batch "
                   "steps (plain gradient descent); set batch_size for mini-batches")
    return tuple(out)


def preflight(cfg, experiment, dtype=None) -> Checked:
    """Run every check of the module docstring on the resolved config ``cfg``.

    Args:
      cfg: a :class:`ntkexp.config.RunConfig`.
      experiment: its :class:`~ntkexp.experiments.Experiment` (registry entry).
      dtype: the floating dtype (default from ``cfg.dtype``; float64 needs x64 on).

    Returns:
      :class:`Checked` (the data set, built once, and notes).

    Raises:
      ConfigError: one line naming the file and key path.
    """
    if dtype is None:
        dtype = jnp.float64 if cfg.dtype == "float64" and jax.config.jax_enable_x64 \
            else jnp.float32
    check_device(cfg)
    data = check_data(cfg, dtype)
    check_models(cfg, data, dtype,
                 output_size=not getattr(experiment, "readout_from_targets", False))
    return Checked(data, notes(cfg))


__all__ = ["Checked", "check_activation", "check_architecture", "check_data", "check_device",
           "check_models", "check_run_folder", "notes", "preflight"]
