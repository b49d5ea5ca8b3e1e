"""Experiment registry and the config-driven runner ``run(config, workdir)``.

An experiment kind is an :class:`Experiment` record registered under the name
used in YAML (``experiment: jacot_fig1``). Its numerical core is split into
pure functions of the resolved config:

* ``compute_unit(cfg, data, unit, progress) -> {name: array}``: one (width,
  learning rate, initialisation) unit. Units are cached in
  ``RUN_DIR/units/`` (one atomic ``.npz`` each, keyed by a hash of the config
  parts that affect it), so a rerun reuses finished units.
* ``reference(cfg, data) -> {name: array}``: the infinite-width side
  (analytic kernels, limiting Gaussian), computed once per run.
* ``summarize(cfg, results) -> (summary, metrics_rows)``: headline numbers.
* ``plot(run_dir_contents) -> [figure paths]``: drawn from saved files only.

:func:`run` writes, atomically file by file (``ntkexp.io``): ``units/*.npz``,
``results.npz``, ``metrics.jsonl``, ``summary.json``, ``config.yaml`` (the
resolved config), ``figures/*.png|pdf`` and finally ``meta.json`` (package
versions, device, dtype, git commit, wall time), which marks the run complete.
A rerun first removes ``meta.json`` and ``summary.json`` so a folder never
pairs old headline numbers with a new config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp import io
from ntkexp.registry import Registry


class UserError(ValueError):
    """An error the user can fix (bad config, missing file, no GPU): one line, exit 2."""


class Unit(NamedTuple):
    """One independent piece of work: a network at ``width`` trained with ``learning_rate``
    from initialisation number ``init`` (0-based); ``w_index``/``lr_index`` locate it
    in the sweep."""

    width: int
    learning_rate: float
    init: int
    w_index: int
    lr_index: int


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A registered experiment kind.

    Attributes:
      name: registry name.
      params: frozen dataclass of the config's ``params:`` section.
      compute_unit: ``(cfg, data, unit, progress) -> dict[str, array]``; every
        unit returns the same keys and shapes. ``progress(n)`` advances the
        progress bar by ``n`` steps.
      reference: ``(cfg, data) -> dict[str, array]`` (stored as ``limit_<name>``).
      summarize: ``(cfg, results) -> (summary dict, list of metric rows)``.
      plot: ``(results, summary, cfg_dict, fig_dir) -> list of paths``.
      unit_work: ``cfg -> int``, progress steps per unit (default train.steps).
      check: optional ``cfg -> None`` raising ``ConfigError`` for settings the
        experiment cannot handle.
      main_figure: file stem of the figure printed at the end of a run.
    """

    name: str
    params: type
    compute_unit: Callable[..., Mapping[str, Any]]
    reference: Callable[..., Mapping[str, Any]]
    summarize: Callable[..., tuple[dict, list]]
    plot: Callable[..., list[str]]
    unit_work: Callable[[Any], int] = lambda cfg: max(cfg.train.steps, 1)
    check: Callable[[Any], None] | None = None
    main_figure: str = "figure"


EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def register_experiment(exp: Experiment, *, overwrite: bool = False) -> Experiment:
    """Register ``exp`` under ``exp.name`` (plugins call this from their own module)."""
    return EXPERIMENTS.register(exp.name, exp, overwrite=overwrite)


class RunResult(NamedTuple):
    """What :func:`run` returns."""

    run_dir: str
    figures: tuple[str, ...]
    main_figure: str
    summary: dict
    computed_units: int
    reused_units: int


# --------------------------------------------------------------------------
# Runtime: dtype and device
# --------------------------------------------------------------------------


def setup_runtime(cfg) -> tuple[Any, Any]:
    """Apply ``cfg.dtype`` / ``cfg.device``; return ``(jax dtype, jax device)``.

    ``float64`` turns on ``jax_enable_x64`` (it is never turned off again, since
    other code in the process may rely on it). ``device: gpu`` without a GPU is a
    :class:`UserError`.
    """
    if cfg.distributed.enabled:
        from ntkexp.sharding import maybe_init_distributed

        maybe_init_distributed(dataclasses.asdict(cfg.distributed))
    if cfg.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    if cfg.device == "auto":
        return dtype, jax.devices()[0]
    kind = cfg.device
    try:
        devs = jax.devices(kind)
    except RuntimeError:
        devs = []
    if not devs:
        backends = ", ".join(sorted({d.platform for d in jax.devices()}))
        raise UserError(f"device: {kind} was asked for but JAX sees no {kind.upper()} "
                        f"(available: {backends}); use device: auto or cpu")
    return dtype, devs[0]


def data_key(cfg):
    """PRNG key of the dataset (``data.seed`` if set, else derived from ``seed``)."""
    s = cfg.data.seed if cfg.data.seed is not None else cfg.seed
    return jax.random.fold_in(jax.random.key(s), 0x0DA7A)


def init_key(cfg, unit: Unit):
    """PRNG key of one initialisation: depends on ``seed`` and ``unit.init`` only, so
    init k of every width is drawn from the same key."""
    return jax.random.fold_in(jax.random.key(cfg.seed), 1000 + unit.init)


def make_units(cfg) -> list[Unit]:
    return [Unit(int(w), float(lr), k, wi, li)
            for wi, w in enumerate(cfg.model.widths)
            for li, lr in enumerate(cfg.train.learning_rates)
            for k in range(cfg.train.inits)]


def unit_hash(cfg, unit: Unit) -> str:
    """Hash of everything that determines a unit's result (not device, sweep lists
    or the number of inits, so that adding inits or widths reuses old units; not
    the ``params`` keys ``limit`` and ``mc_*``, which only configure the limit).
    For ``data.name: npz`` the file's SHA-256 is part of it, so a file changed
    at the same path is not mistaken for the old one."""
    d = cfg.to_dict()
    d.pop("device", None)
    d.pop("distributed", None)
    d.pop("kernels", None)  # how the limit's kernels are tiled never changes a unit
    d.pop("description", None)
    d.pop("plugins", None)
    d["model"]["width"] = unit.width
    d["train"]["learning_rate"] = unit.learning_rate
    d["train"].pop("inits", None)
    d["unit_init"] = unit.init
    # params that configure only the reference (the limit), never a unit
    d["params"] = {k: v for k, v in (d.get("params") or {}).items()
                   if k != "limit" and not k.startswith("mc_")}
    if d.get("data", {}).get("name") == "npz" and d["data"].get("path"):
        # a changed file at the same path must not reuse units of the old one
        d["data"]["sha256"] = file_sha256(d["data"]["path"])
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str) -> str | None:
    """SHA-256 of the file at ``path`` (None if it cannot be read); cached on the
    file's path, size and modification time so a sweep hashes it once."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _sha256_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def unit_path(run_dir: str, cfg, unit: Unit) -> str:
    lr = f"_lr{unit.lr_index}" if len(cfg.train.learning_rates) > 1 else ""
    return os.path.join(run_dir, "units",
                        f"w{unit.width}{lr}_s{unit.init}_{unit_hash(cfg, unit)}.npz")


# --------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------


class _Progress:
    """A tqdm bar over all steps of the units to compute (which width, init, step,
    time left); silent when ``quiet``."""

    def __init__(self, total: int, quiet: bool):
        self.bar = None
        if not quiet and total > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True,
                            leave=True, mininterval=0.5)

    def describe(self, text: str):
        if self.bar is not None:
            self.bar.set_description(text, refresh=True)

    def __call__(self, n: int):
        if self.bar is not None and n > 0:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------
# Meta
# --------------------------------------------------------------------------


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("ntkexp", "jax", "jaxlib", "flax", "optax", "numpy", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# --------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------


def _remove_temporaries(workdir: str) -> None:
    """Delete temporary files an interrupted run may have left (``.<name>.<rand>.tmp``)."""
    for folder in (workdir, os.path.join(workdir, "units"), os.path.join(workdir, "figures")):
        if not os.path.isdir(folder):
            continue
        for f in os.listdir(folder):
            if f.startswith(".") and f.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, f))


def stack_units(cfg, units: list[Unit], outs: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stack unit outputs to arrays of shape ``(n_widths, n_lrs, inits, ...)``."""
    W, L, K = len(cfg.model.widths), len(cfg.train.learning_rates), cfg.train.inits
    keys = list(outs[0])
    res = {}
    for k in keys:
        first = np.asarray(outs[0][k])
        arr = np.zeros((W, L, K) + first.shape, first.dtype)
        for u, o in zip(units, outs, strict=True):
            arr[u.w_index, u.lr_index, u.init] = np.asarray(o[k])
        res[k] = arr
    res["widths"] = np.asarray(cfg.model.widths)
    res["learning_rates"] = np.asarray(cfg.train.learning_rates)
    return res


def _owner(obj) -> str:
    """The module that defined ``obj`` (to name a plugin in an error)."""
    mod = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None)
    return str(mod) if mod else "an unknown module"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def check_architecture(cfg, data, dtype) -> None:
    """Check that a plug-in architecture's builder gives a usable network.

    Built-in architectures (defined under ``ntkexp.``) are trusted. For a plug-in
    one, build the network at the smallest width and evaluate (abstractly, with
    ``jax.eval_shape``: nothing is compiled) ``apply_fn`` on two training inputs;
    it must return ``(apply_fn, params)`` with floating-point parameter leaves
    and an output of shape ``(2, out_dim)`` (the spec's ``out_dim``, else the
    number of target columns).

    Raises:
      UserError: one line naming the architecture and the plug-in module.
    """
    from ntkexp.models import ARCHITECTURES

    arch = ARCHITECTURES.get(cfg.model.arch)
    owner = _owner(arch.build)
    if owner == "ntkexp" or owner.startswith("ntkexp."):
        return
    who = f"architecture {arch.name!r} of plugin {owner!r}"
    width = min(cfg.model.widths)
    x = data.x_train[:2]
    try:
        built = arch.build(cfg.model.spec(width), data.x_train.shape[1], init_key(
            cfg, Unit(width, cfg.train.learning_rates[0], 0, 0, 0)), dtype)
    except Exception as e:  # noqa: BLE001 - any failure of user code is one line
        raise UserError(f"{who}: its builder failed at width {width}: {_first_line(e)}") \
            from None
    if not (isinstance(built, tuple) and len(built) == 2 and callable(built[0])):
        raise UserError(f"{who}: its builder must return (apply_fn, params), got "
                        f"{type(built).__name__}")
    apply_fn, params = built
    leaves = jax.tree_util.tree_leaves(params)
    bad = [leaf for leaf in leaves
           if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if not leaves or bad:
        raise UserError(f"{who}: params must be a pytree of floating-point arrays, got "
                        f"{'no leaves' if not leaves else type(bad[0]).__name__}")
    try:
        out = jax.eval_shape(apply_fn, params, x)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{who}: apply_fn(params, x) fails on inputs of shape "
                        f"{tuple(x.shape)}: {_first_line(e)}") from None
    # the spec's out_dim, else the number of target columns
    want = getattr(cfg.model.spec(width), "out_dim", None) or data.y_train.shape[1]
    shape = getattr(out, "shape", None)
    if (not isinstance(out, jax.ShapeDtypeStruct) or len(shape) != 2
            or shape[0] != x.shape[0] or shape[1] != want):
        expected = f"({x.shape[0]}, {want})"
        got = tuple(shape) if shape is not None else type(out).__name__
        raise UserError(f"{who}: apply_fn(params, x) must return shape {expected} for "
                        f"inputs of shape {tuple(x.shape)}, got {got}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from ntkexp.config import ConfigError
    from ntkexp.data import DataError
    from ntkexp.registry import RegistryError

    return (UserError, ConfigError, DataError, RegistryError)


def run(cfg, workdir: str, *, force: bool = False, quiet: bool = False) -> RunResult:
    """Run the experiment of the resolved config ``cfg`` into ``workdir``.

    Args:
      cfg: a :class:`ntkexp.config.RunConfig`.
      workdir: the run folder (created; finished units in it are reused).
      force: recompute every unit even if a cached one exists.
      quiet: no progress bar.

    Returns:
      A :class:`RunResult` with the run folder, the figure paths and the summary.

    Raises:
      UserError: the device is missing, the dataset cannot be built or a
        plug-in architecture's builder is unusable (raised before anything is
        written), or the experiment hit a user error while computing (then a
        run folder this call created, with no finished unit in it, is removed),
        so no half-made run folder is left.
    """
    from ntkexp.data import DataError, load_dataset

    t0 = time.time()
    exp = EXPERIMENTS.get(cfg.experiment)
    dtype, device = setup_runtime(cfg)
    src = f"{cfg.source}: " if cfg.source else ""
    with jax.default_device(device):
        try:
            data = load_dataset(cfg.data, data_key(cfg), dtype)
        except DataError as e:
            raise UserError(f"{src}{e}") from None
        check_architecture(cfg, data, dtype)

    created = not os.path.exists(workdir)
    written: list[str] = []
    try:
        return _run_in(cfg, exp, data, workdir, dtype, device, force=force, quiet=quiet,
                       written=written, t0=t0)
    except _user_errors() as e:
        if created and not written:
            shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(e, UserError):
            raise
        msg = str(e)
        raise UserError(msg if cfg.source and msg.startswith(cfg.source) else f"{src}{msg}") \
            from None


def _run_in(cfg, exp, data, workdir, dtype, device, *, force, quiet, written,
            t0) -> RunResult:
    """The body of :func:`run` once the inputs are checked; appends each finished
    unit's path to ``written``."""
    from ntkexp.plotting import plot_run

    with jax.default_device(device):
        os.makedirs(workdir, exist_ok=True)
        for stale in ("meta.json", "summary.json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(workdir, stale))
        _remove_temporaries(workdir)

        units = make_units(cfg)
        paths = [unit_path(workdir, cfg, u) for u in units]
        todo = [i for i, p in enumerate(paths) if force or not os.path.exists(p)]
        progress = _Progress(len(todo) * exp.unit_work(cfg), quiet)
        outs: list[Any] = [None] * len(units)
        try:
            for i, (u, p) in enumerate(zip(units, paths, strict=True)):
                if i not in todo:
                    try:
                        outs[i] = io.read_npz(p)
                        continue
                    except Exception:  # noqa: BLE001 - unreadable cache: recompute it
                        pass
                lr = (f" lr {u.learning_rate:g}" if len(cfg.train.learning_rates) > 1 else "")
                progress.describe(f"width {u.width}{lr} init {u.init + 1}/{cfg.train.inits}")
                out = {k: np.asarray(v) for k, v in
                       exp.compute_unit(cfg, data, u, progress).items()}
                io.write_npz(p, out)
                written.append(p)
                outs[i] = out
        finally:
            progress.close()

        results = stack_units(cfg, units, outs)
        for k, v in exp.reference(cfg, data).items():
            results[f"limit_{k}"] = np.asarray(v)
        summary, metrics = exp.summarize(cfg, results)

    io.write_npz(os.path.join(workdir, "results.npz"), results)
    io.write_jsonl(os.path.join(workdir, "metrics.jsonl"), metrics)
    io.write_json(os.path.join(workdir, "summary.json"), summary)
    io.write_yaml(os.path.join(workdir, "config.yaml"), cfg.to_dict())
    figures = plot_run(workdir, require_complete=False)
    main = next((f for f in figures if os.path.basename(f) == f"{exp.main_figure}.png"),
                figures[0] if figures else "")
    meta = {
        "experiment": cfg.experiment,
        "config_source": os.path.abspath(cfg.source) if cfg.source else None,
        "preset": cfg.preset,
        "dtype": cfg.dtype,
        "device": str(device),
        "device_kind": getattr(device, "device_kind", None),
        "backend": jax.default_backend(),
        "versions": _versions(),
        "git_commit": _git_commit(),
        "units": len(units),
        "units_computed": len(todo),
        "units_reused": len(units) - len(todo),
        "wall_time_s": round(time.time() - t0, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": True,
    }
    io.write_json(os.path.join(workdir, "meta.json"), meta)
    return RunResult(workdir, tuple(figures), main, summary, len(todo), len(units) - len(todo))
