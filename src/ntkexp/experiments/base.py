"""Experiment registry and the config-driven runner ``run(config, workdir)``.

An experiment kind is an :class:`Experiment` record registered under the name
used in YAML (``experiment: jacot_fig1``). Its numerical core is split into
pure functions of the resolved config:

* ``compute_unit(cfg, data, unit, progress) -> {name: array}``: one
  :class:`Unit`, a (width, learning rate) with the initialisations
  ``unit.inits``, trained as one ensemble (``ntkexp.training.train(...,
  ensemble=True)``); every array has a leading axis ``len(unit.inits)``.
  Results are cached per initialisation in ``RUN_DIR/units/`` (one atomic
  ``.npz`` each, keyed by :func:`unit_hash`: the config parts that affect it
  and the code, see :mod:`ntkexp.experiments.provenance`), so a rerun reuses
  finished initialisations and a partly finished unit resumes.
* ``reference(cfg, data) -> {name: array}``: the infinite-width side
  (analytic kernels, limiting Gaussian), computed once per run.
* ``summarize(cfg, results) -> (summary, metrics_rows)``: headline numbers.
* ``plot(run_dir_contents) -> [figure paths]``: drawn from saved files only.

Random numbers come from the named streams of :mod:`ntkexp.experiments.streams`.
Shared pieces of the experiments live in :mod:`ntkexp.experiments.common`;
no experiment imports another.

:func:`run` writes, atomically file by file (``ntkexp.io``): ``units/*.npz``,
``results.npz``, ``metrics.jsonl``, ``summary.json``, ``config.yaml`` (the
resolved config), ``figures/*.png|pdf`` and finally ``meta.json`` (package
versions, device, dtype, git commit, code fingerprint, processes and the units
each computed, wall time), which marks the run complete. A rerun first removes
``meta.json`` and ``summary.json`` so a folder never pairs old headline numbers
with a new config. Multi-process runs: :mod:`ntkexp.experiments.distributed`.
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
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from ntkexp import config, io
from ntkexp.config import ConfigError
from ntkexp.data import DataError
from ntkexp.experiments import checks, distributed, provenance, streams
from ntkexp.models import ARCHITECTURES
from ntkexp.registry import Registry, RegistryError
from ntkexp.sharding import maybe_init_distributed


class UserError(ValueError):
    """An error the user can fix (bad config, missing file, no GPU): one line, exit 2."""


class Unit(NamedTuple):
    """One independent piece of work: the networks at ``width`` trained with
    ``learning_rate`` from the initialisations ``inits`` (0-based numbers), as one
    ensemble; ``w_index``/``lr_index`` locate it in the sweep. The runner passes
    only the initialisations still to compute (a partly finished unit resumes)."""

    width: int
    learning_rate: float
    w_index: int
    lr_index: int
    inits: tuple[int, ...]


class Member(NamedTuple):
    """One initialisation of a unit: what a ``per_init`` experiment's
    ``compute_unit`` receives (the runner's unit before ensembles)."""

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
      compute_unit: ``(cfg, data, unit, progress) -> dict[str, array]``: every
        array has a leading axis ``len(unit.inits)``, entry ``i`` the result
        of initialisation ``unit.inits[i]``, which must not depend on which
        other initialisations are in the call (so a unit can resume and be
        split); every unit returns the same keys and shapes. ``progress(n)``
        advances the progress bar by ``n`` member-steps. With
        ``per_init=True`` it is called once per initialisation with a
        :class:`Member` and returns arrays without that axis.
      reference: ``(cfg, data) -> dict[str, array]`` (stored as ``limit_<name>``).
      summarize: ``(cfg, results) -> (summary dict, list of metric rows)``.
      plot: ``(results, summary, cfg_dict, fig_dir) -> list of paths``.
      unit_work: ``cfg -> int``, progress steps per initialisation (default
        train.steps).
      check: optional ``cfg -> None`` raising ``ConfigError`` for settings the
        experiment cannot handle.
      main_figure: file stem of the figure printed at the end of a run.
      per_init: ``compute_unit`` takes one initialisation at a time (the
        older interface; no ensemble speed-up).
      readout_from_targets: the experiment sizes the network's output itself
        from the targets (one output per class), so the check pass does not
        compare the config's ``model.out_dim`` with the target columns.
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
    per_init: bool = False
    readout_from_targets: bool = False


class _ExperimentRegistry(Registry):
    """The experiment registry; it keeps the config loader's schema registry
    (:data:`ntkexp.config.SECTION_SCHEMAS`) in step, so config knows no experiment."""

    def register(self, name, obj=None, *, overwrite=False):
        def _add(o):
            self._base_register(name, o, overwrite=overwrite)
            config.register_section_schema(name, o.params, o.check)
            return o

        return _add if obj is None else _add(obj)

    def _base_register(self, name, obj, *, overwrite):
        return super().register(name, obj, overwrite=overwrite)

    def unregister(self, name):
        super().unregister(name)
        config.SECTION_SCHEMAS.unregister(name)


EXPERIMENTS: Registry[Experiment] = _ExperimentRegistry("experiment")


def register_experiment(exp: Experiment, *, overwrite: bool = False) -> Experiment:
    """Register ``exp`` under ``exp.name`` (plugins call this from their own module);
    its ``params`` schema and ``check`` go to the config loader."""
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


def enable_compile_cache() -> str | None:
    """Keep compiled programs on disk across runs (JAX's persistent compilation cache).

    Opt-in: set ``$NTKEXP_COMPILE_CACHE`` to a folder, or to ``1``/``on`` for
    ``~/.cache/ntkexp/jax`` (unset, ``0`` or ``off``: no cache). A cache folder the
    user already gave JAX (``jax_compilation_cache_dir``) is kept. A rerun, another
    preset of the same shapes, or a second process of a multi-process run then skips
    XLA compilation (cold, a Jacot Fig. 2 run compiles for about 10-20 s on 2 CPU
    cores). Entries are keyed by JAX on the program, the compile options, the backend
    and the jaxlib version, so a stale entry cannot be used. Returns the folder (None:
    off).
    """
    path = os.environ.get("NTKEXP_COMPILE_CACHE", "")
    if path.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if path.strip().lower() in ("1", "on", "true", "yes"):
        path = os.path.join(os.path.expanduser("~"), ".cache", "ntkexp", "jax")
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    try:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except (OSError, AttributeError, ValueError):  # read-only home or an old JAX: no cache
        return None
    return path


def setup_runtime(cfg) -> tuple[Any, Any]:
    """Apply ``cfg.dtype`` / ``cfg.device``; return ``(jax dtype, jax device)``.

    ``float64`` turns on ``jax_enable_x64`` (it is never turned off again, since
    other code in the process may rely on it). ``device: gpu`` without a GPU is a
    :class:`UserError`. Also switches on JAX's persistent compilation cache
    (:func:`enable_compile_cache`).
    """
    enable_compile_cache()
    if cfg.distributed.enabled:
        maybe_init_distributed(dataclasses.asdict(cfg.distributed))
    if cfg.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    if cfg.device == "auto":
        return dtype, jax.local_devices()[0]  # this process's own (multi-process runs)
    kind = cfg.device
    try:
        devs = jax.local_devices(backend=kind)
    except RuntimeError:
        devs = []
    if not devs:
        backends = ", ".join(sorted({d.platform for d in jax.devices()}))
        raise UserError(f"device: {kind} was asked for but JAX sees no {kind.upper()} "
                        f"(available: {backends}); use device: auto or cpu")
    return dtype, devs[0]


def data_key(cfg):
    """PRNG key of the dataset (``data.seed`` if set, else ``seed``): stream ``data``."""
    return streams.data_key(cfg)


def init_key(cfg, unit) -> Any:
    """PRNG key of one initialisation (a :class:`Member`, or an int): stream ``init``.
    Depends on ``seed`` and the initialisation number only, so init k of every width
    is drawn from the same key."""
    return streams.init_key(cfg, unit if isinstance(unit, int) else unit.init)


def make_units(cfg) -> list[Unit]:
    """One unit per (width, learning rate), with every initialisation."""
    inits = tuple(range(cfg.train.inits))
    return [Unit(int(w), float(lr), wi, li, inits)
            for wi, w in enumerate(cfg.model.widths)
            for li, lr in enumerate(cfg.train.learning_rates)]


def members(unit: Unit) -> list[Member]:
    return [Member(unit.width, unit.learning_rate, k, unit.w_index, unit.lr_index)
            for k in unit.inits]


def unit_hash(cfg, unit, init: int | None = None, code: Mapping | None = None) -> str:
    """Hash of everything that determines one initialisation's result.

    In it: the config (not device, distributed, description, the sweep lists or
    the number of inits, so that adding inits or widths reuses old units; not
    the ``params`` keys ``limit`` and ``mc_*``, which only configure the
    limit), the width, learning rate and initialisation number, and the code
    (``code``, default :func:`ntkexp.experiments.provenance.code_fingerprint`:
    ntkexp version, git commit and dirty flag, ntkexp's source hash, each
    plug-in module's source hash). For ``data.name: npz`` the file's SHA-256 is
    part of it, so a file changed at the same path is not mistaken for the old one.

    Args:
      unit: a :class:`Unit` (``init`` defaults to its first) or a :class:`Member`.
    """
    if init is None:
        init = unit.init if isinstance(unit, Member) else unit.inits[0]
    d = cfg.to_dict()
    d.pop("device", None)
    d.pop("distributed", None)
    d.pop("kernels", None)  # how the limit's kernels are tiled never changes a unit
    d.pop("description", None)
    plugins = tuple(d.pop("plugins", None) or ())
    d["model"]["width"] = unit.width
    d["train"]["learning_rate"] = unit.learning_rate
    d["train"].pop("inits", None)
    d["unit_init"] = int(init)
    # params that configure only the reference (the limit), never a unit
    d["params"] = {k: v for k, v in (d.get("params") or {}).items()
                   if k != "limit" and not k.startswith("mc_")}
    if d.get("data", {}).get("name") == "npz" and d["data"].get("path"):
        # a changed file at the same path must not reuse units of the old one
        d["data"]["sha256"] = file_sha256(d["data"]["path"])
    d["code"] = dict(code) if code is not None else provenance.code_fingerprint(plugins)
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


def unit_path(run_dir: str, cfg, unit, init: int | None = None,
              code: Mapping | None = None) -> str:
    """Cache file of one initialisation of ``unit``: ``units/w<W>[_lr<i>]_s<k>_<hash>.npz``."""
    if init is None:
        init = unit.init if isinstance(unit, Member) else unit.inits[0]
    lr = f"_lr{unit.lr_index}" if len(cfg.train.learning_rates) > 1 else ""
    return os.path.join(run_dir, "units",
                        f"w{unit.width}{lr}_s{init}_{unit_hash(cfg, unit, init, code)}.npz")


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


def stack_units(cfg, units: list[Unit], outs: Mapping[tuple[int, int, int], Mapping[str, Any]]
                ) -> dict[str, np.ndarray]:
    """Stack per-initialisation outputs ``{(w_index, lr_index, init): {name: array}}`` to
    arrays of shape ``(n_widths, n_lrs, inits, ...)``."""
    W, L, K = len(cfg.model.widths), len(cfg.train.learning_rates), cfg.train.inits
    first_out = next(iter(outs.values()))
    res = {}
    for k in first_out:
        first = np.asarray(first_out[k])
        arr = np.zeros((W, L, K) + first.shape, first.dtype)
        for (wi, li, i), o in outs.items():
            arr[wi, li, i] = np.asarray(o[k])
        res[k] = arr
    res["widths"] = np.asarray(cfg.model.widths)
    res["learning_rates"] = np.asarray(cfg.train.learning_rates)
    return res


#: Parameters of one ensemble chunk (bytes): a unit whose members together hold
#: more is trained in several chunks, so memory stays that of about this many bytes.
ENSEMBLE_BYTES = 1 << 30


def member_bytes(cfg, width: int, in_dim: int, dtype) -> int:
    """Bytes of one network's parameters at ``width`` (abstract build: nothing runs);
    0 if the builder cannot be traced."""
    arch = ARCHITECTURES.get(cfg.model.arch)
    try:
        shapes = jax.eval_shape(lambda k: arch.build(cfg.model.spec(width), in_dim, k,
                                                     dtype)[1], jax.random.key(0))
    except Exception:  # noqa: BLE001 - untraceable plug-in builder: no chunking
        return 0
    return int(sum(np.prod(l.shape) * np.dtype(l.dtype).itemsize
                   for l in jax.tree_util.tree_leaves(shapes)))


def chunk_inits(inits: tuple[int, ...], nbytes: int, budget: int | None = None
                ) -> list[tuple[int, ...]]:
    """Split ``inits`` into equal-as-possible chunks of at most ``budget // nbytes`` members."""
    budget = ENSEMBLE_BYTES if budget is None else budget
    size = len(inits) if nbytes <= 0 else max(1, min(len(inits), budget // nbytes))
    n = -(-len(inits) // size)
    size = -(-len(inits) // n)
    return [inits[i:i + size] for i in range(0, len(inits), size)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    return (UserError, ConfigError, DataError, RegistryError)


def run(cfg, workdir: str, *, force: bool = False, quiet: bool = False,
        after_chunk: Callable[[Unit], Any] | None = None) -> RunResult:
    """Run the experiment of the resolved config ``cfg`` into ``workdir``.

    Units (one per width and learning rate) are trained as ensembles of their
    initialisations (in chunks of about :data:`ENSEMBLE_BYTES` of parameters)
    and cached per initialisation, so a run that stopped part-way resumes with
    only what was not finished. With ``distributed.enabled`` the units are split
    over the processes and only process 0 writes ``workdir``
    (:mod:`ntkexp.experiments.distributed`).

    Args:
      cfg: a :class:`ntkexp.config.RunConfig`.
      workdir: the run folder (created; finished units in it are reused).
      force: recompute every unit even if a cached one exists, and run into a
        folder that holds another config's results
        (:func:`ntkexp.experiments.checks.check_run_folder`).
      quiet: no progress bar.
      after_chunk: called with the :class:`Unit` of each computed chunk after
        its files are written (a hook for tests and drivers; may raise to stop).

    Returns:
      A :class:`RunResult` with the run folder, the figure paths and the summary
      (on processes other than 0: no figures and an empty summary).

    Raises:
      UserError: the device is missing, the dataset cannot be built or a
        plug-in architecture's builder is unusable (raised before anything is
        written), or the experiment hit a user error while computing (then a
        run folder this call created, with no finished unit in it, is removed),
        so no half-made run folder is left.
    """
    t0 = time.time()
    exp = EXPERIMENTS.get(cfg.experiment)
    checks.check_device(cfg)
    dtype, device = setup_runtime(cfg)
    src = f"{cfg.source}: " if cfg.source else ""
    with jax.default_device(device):
        # every check before any work (the same pass as `ntkexp validate`)
        data = checks.preflight(cfg, exp, dtype).data

    cluster = distributed.current()
    checks.check_run_folder(cfg, workdir, force)
    created = not os.path.exists(workdir)
    written: list[str] = []
    try:
        return _run_in(cfg, exp, data, workdir, dtype, device, force=force, quiet=quiet,
                       written=written, t0=t0, cluster=cluster, after_chunk=after_chunk)
    except _user_errors() as e:
        if created and not written and cluster.is_main:
            shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(e, UserError):
            raise
        msg = str(e)
        raise UserError(msg if cfg.source and msg.startswith(cfg.source) else f"{src}{msg}") \
            from None


_RUNS = [0]


def _unit_label(cfg, u: Unit) -> str:
    lr = f" lr {u.learning_rate:g}" if len(cfg.train.learning_rates) > 1 else ""
    return f"width {u.width}{lr}"


def _compute_chunk(cfg, exp, data, u: Unit, progress) -> list[dict[str, np.ndarray]]:
    """Per-initialisation outputs of ``u.inits`` (ensemble call, or one by one)."""
    if exp.per_init:
        return [{k: np.asarray(v) for k, v in exp.compute_unit(cfg, data, m, progress).items()}
                for m in members(u)]
    out = {k: np.asarray(v) for k, v in exp.compute_unit(cfg, data, u, progress).items()}
    K = len(u.inits)
    for k, v in out.items():
        if v.ndim == 0 or v.shape[0] != K:
            raise ValueError(f"experiment {exp.name!r}: compute_unit must return arrays with a "
                             f"leading axis of {K} (one entry per initialisation), got "
                             f"{k!r} of shape {v.shape}")
    return [{k: v[i] for k, v in out.items()} for i in range(K)]


def _run_in(cfg, exp, data, workdir, dtype, device, *, force, quiet, written, t0, cluster,
            after_chunk) -> RunResult:
    """The body of :func:`run` once the inputs are checked; appends each unit file
    process 0 writes to ``written``."""

    _RUNS[0] += 1
    key = f"ntkexp/run{_RUNS[0]}"
    try:
        return _run_body(cfg, exp, data, workdir, dtype, device, force=force, quiet=quiet,
                         written=written, t0=t0, cluster=cluster, after_chunk=after_chunk,
                         key=key)
    except BaseException as e:
        if cluster.count > 1:  # the other processes stop instead of waiting
            distributed.send_failure(cluster, key, _first_line(e))
        raise


def _run_body(cfg, exp, data, workdir, dtype, device, *, force, quiet, written, t0, cluster,
              after_chunk, key) -> RunResult:
    main = cluster.is_main
    code = provenance.code_fingerprint(tuple(cfg.plugins))
    units = make_units(cfg)
    paths = {(u.w_index, u.lr_index, k): unit_path(workdir, cfg, u, k, code)
             for u in units for k in u.inits}
    with jax.default_device(device):
        if main:
            _prepare_run_folder(workdir, cfg)
        # process 0 reads the cache and tells the others what is left
        outs, todo_keys = _cached_units(paths, force) if main else ({}, None)
        todo_keys = {tuple(t) for t in distributed.broadcast(cluster, f"{key}/todo", todo_keys)}
        chunks, owner = _plan_chunks(cfg, units, todo_keys, data.x_train.shape[1], dtype,
                                     cluster.count)
        mine = [c for c, o in zip(chunks, owner, strict=True) if o == cluster.index]
        progress = _Progress(sum(len(c.inits) for c in mine) * exp.unit_work(cfg),
                             quiet or not main)
        try:
            sent = _compute_units(cfg, exp, data, mine, paths, outs, progress, main=main,
                                  written=written, after_chunk=after_chunk)
        finally:
            progress.close()
        by_process = {str(p): [f"{_unit_label(cfg, c)} inits {list(c.inits)}"
                               for c, o in zip(chunks, owner, strict=True) if o == p]
                      for p in range(cluster.count)}
        if not main:
            distributed.send(cluster, key, sent)
            distributed.wait_for_main(cluster, key)
            return RunResult(workdir, (), "", {}, sum(len(c.inits) for c in mine), 0)
        if cluster.count > 1:
            _receive_units(cluster, key, paths, outs, written)
        results = stack_units(cfg, units, outs)
        for k, v in exp.reference(cfg, data).items():
            results[f"limit_{k}"] = np.asarray(v)
        summary, metrics = exp.summarize(cfg, results)

    figures, main_fig = _write_results(workdir, cfg, exp, results, summary, metrics)
    n_todo = len(todo_keys)
    meta = _run_meta(cfg, device, code, n_units=len(paths), n_ensembles=len(units),
                     n_todo=n_todo, cluster=cluster, by_process=by_process, t0=t0)
    io.write_json(os.path.join(workdir, "meta.json"), meta)
    distributed.finish(cluster, key)
    return RunResult(workdir, tuple(figures), main_fig, summary, n_todo, len(paths) - n_todo)


def _prepare_run_folder(workdir: str, cfg) -> None:
    """Create the folder; drop a finished run's markers and stale temporaries; write the
    config at once (which config this folder's units belong to, from the start: a rerun of
    another config is refused unless --force, :func:`checks.check_run_folder`)."""
    os.makedirs(workdir, exist_ok=True)
    for stale in ("meta.json", "summary.json"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(workdir, stale))
    _remove_temporaries(workdir)
    io.write_yaml(os.path.join(workdir, "config.yaml"), cfg.to_dict())


def _cached_units(paths: Mapping, force: bool) -> tuple[dict, list[list[int]]]:
    """``(outs, todo)``: the readable cached unit outputs by ident (none with ``force``)
    and the idents left to compute, as lists (to broadcast)."""
    outs: dict[tuple[int, int, int], Any] = {}
    for ident, p in paths.items():
        if force or not os.path.exists(p):
            continue
        try:
            outs[ident] = io.read_npz(p)
        except Exception:  # noqa: BLE001 - unreadable cache: recompute it
            pass
    return outs, [list(ident) for ident in paths if ident not in outs]


def _plan_chunks(cfg, units, todo_keys, in_dim: int, dtype, n_processes: int):
    """``(chunks, owner)``: the units' inits left to do, in chunks that fit the memory
    budget (:func:`chunk_inits`), and the process that computes each."""
    todo = [u._replace(inits=tuple(k for k in u.inits
                                   if (u.w_index, u.lr_index, k) in todo_keys))
            for u in units]
    todo = [u for u in todo if u.inits]
    chunks = [c for u in todo for c in
              (u._replace(inits=ks) for ks in
               chunk_inits(u.inits, member_bytes(cfg, u.width, in_dim, dtype)))]
    return chunks, distributed.assign([c.width * len(c.inits) for c in chunks], n_processes)


def _compute_units(cfg, exp, data, mine, paths, outs, progress, *, main, written,
                   after_chunk) -> dict[str, dict]:
    """Compute this process's chunks into ``outs``; process 0 writes each unit's file,
    the others return theirs by file name (to send to process 0)."""
    sent: dict[str, dict] = {}
    for c in mine:
        progress.describe(f"{_unit_label(cfg, c)} inits "
                          f"{c.inits[0] + 1}-{c.inits[-1] + 1}/{cfg.train.inits}")
        for k, o in zip(c.inits, _compute_chunk(cfg, exp, data, c, progress), strict=True):
            ident = (c.w_index, c.lr_index, k)
            outs[ident] = o
            if main:
                io.write_npz(paths[ident], o)
                written.append(paths[ident])
            else:
                sent[os.path.basename(paths[ident])] = o
        if after_chunk is not None:
            after_chunk(c)
    return sent


def _receive_units(cluster, key, paths, outs, written) -> None:
    """Process 0: write the units the other processes computed, add them to ``outs``."""
    by_name = {os.path.basename(p): ident for ident, p in paths.items()}
    for got in distributed.receive(cluster, key).values():
        for name, o in got.items():
            ident = by_name[name]
            io.write_npz(paths[ident], o)
            written.append(paths[ident])
            outs[ident] = o


def _write_results(workdir, cfg, exp, results, summary, metrics) -> tuple[list[str], str]:
    """Write the run's results, metrics, summary and config, draw its figures; return
    ``(figures, main figure)``."""
    io.write_npz(os.path.join(workdir, "results.npz"), results)
    io.write_jsonl(os.path.join(workdir, "metrics.jsonl"), metrics)
    io.write_json(os.path.join(workdir, "summary.json"), summary)
    io.write_yaml(os.path.join(workdir, "config.yaml"), cfg.to_dict())
    figures = plot_run(workdir, require_complete=False)
    main_fig = next((f for f in figures if os.path.basename(f) == f"{exp.main_figure}.png"),
                    figures[0] if figures else "")
    return figures, main_fig


def _run_meta(cfg, device, code, *, n_units, n_ensembles, n_todo, cluster, by_process,
              t0) -> dict:
    """The ``meta.json`` of a finished run (written last: it marks the run complete)."""
    return {
        "experiment": cfg.experiment,
        "config_source": os.path.abspath(cfg.source) if cfg.source else None,
        "preset": cfg.preset,
        "dtype": cfg.dtype,
        "device": str(device),
        "device_kind": getattr(device, "device_kind", None),
        "backend": jax.default_backend(),
        "versions": _versions(),
        "git_commit": code["git_commit"],
        "git_dirty": code["git_dirty"],
        "code": code,
        "units": n_units,
        "ensembles": n_ensembles,
        "units_computed": n_todo,
        "units_reused": n_units - n_todo,
        "processes": cluster.count,
        "units_by_process": by_process,
        "wall_time_s": round(time.time() - t0, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": True,
    }


def plot_run(run_dir: str, *, require_complete: bool = True) -> list[str]:
    """Redraw every figure of the run in ``run_dir`` from its saved files.

    Args:
      run_dir: a folder written by ``ntkexp run``.
      require_complete: also require ``meta.json`` (written last by a finished run).

    Returns:
      The paths of the figure files written under ``run_dir/figures``.

    Raises:
      UserError: the folder is missing or holds no finished run.
    """
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run folder")
    need = ["config.yaml", "results.npz", "summary.json"]
    if require_complete:
        need.append("meta.json")
    missing = [f for f in need if not os.path.exists(os.path.join(run_dir, f))]
    if missing:
        raise UserError(f"{run_dir}: not a finished run (missing {', '.join(missing)}); "
                        "run `ntkexp run` again to complete it")
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        summary = io.read_json(os.path.join(run_dir, "summary.json"))
        results = io.read_npz(os.path.join(run_dir, "results.npz"))
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-facing problem
        raise UserError(f"{run_dir}: cannot read the saved results ({e})") from None
    config.import_plugins(cfg.get("plugins") or [], os.path.join(run_dir, "config.yaml"))
    try:
        exp = EXPERIMENTS.get(cfg["experiment"])
    except RegistryError as e:
        raise UserError(f"{run_dir}: {e}") from None
    return list(exp.plot(results, summary, cfg, os.path.join(run_dir, "figures")))
