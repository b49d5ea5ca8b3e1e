"""The ``ntkexp`` command line: ``run``, ``plot``, ``validate``, ``list``.

::

    ntkexp run CONFIG [--set KEY=VALUE ...] [--preset P] [--out DIR] [--quiet] [--force]
    ntkexp plot RUN_DIR
    ntkexp validate CONFIG [--set ...] [--preset P]
    ntkexp list [--config FILE]
    ntkexp gpu-check [--out runs/gpu-check] [--preset paper] [--no-bench]
    ntkexp gallery record RUN_DIR --page PAGE | render | check | run   (ntkexp.gallery)

Errors a user can cause (bad config, missing file, unknown experiment, a GPU
asked for but absent) print one line ``ntkexp: error: ...`` on stderr and exit
with status 2, without a traceback, and write nothing. Any other exception (a
bug, an experiment's ``NotImplementedError``, a divergence) prints one line
``ntkexp: error: <Type>: <message> ...`` and exits with status 1; for ``run``
the line names the run folder, which is left consistent and can be resumed:
finished units are kept, a folder this call created with none in it is removed,
and an unfinished run keeps no ``summary.json`` (headline numbers exist only
beside the ``meta.json`` that marks a run complete). ``NTKEXP_TRACEBACK=1``
re-raises instead, for debugging (docs/conventions.md, "Errors").

``validate`` and ``run`` make the same check pass before any work
(:mod:`ntkexp.experiments.checks`; the list is in docs/conventions.md, "What
validate checks"); ``run`` also refuses a run folder holding another config's
results unless ``--force``. ``list --config FILE`` imports FILE's plug-ins and
says which names they add. ``run`` prints how many units it computed and reused,
then the run folder and the main figure (and, when an
experiment used a Monte Carlo estimate of the infinite-width limit because the
architecture registers no analytic kernel, a ``limit: ...`` line saying so). The
default run folder is
``runs/<config stem>[-<preset>]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ntkexp import config as C
from ntkexp import io
from ntkexp.activations import ACTIVATIONS
from ntkexp.config import ConfigError
from ntkexp.data import DATASETS, TARGETS, DataError
from ntkexp.experiments import EXPERIMENTS, checks, plot_run, run
from ntkexp.experiments.base import UserError
from ntkexp.gallery import cli_main
from ntkexp.layers.registry import LAYERS
from ntkexp.models import ARCHITECTURES
from ntkexp.optim import OPTIMIZERS
from ntkexp.registry import RegistryError

USAGE_ERROR = 2
RUN_ERROR = 1


class _OneLineError(Exception):
    pass


class _RunFailed(Exception):
    """A non-user exception inside ``run``, already tidied up: one line, exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage too: keep it to one line
        raise _OneLineError(f"{message} (see `ntkexp {self.prog.split()[-1]} --help`)"
                            if " " in self.prog else f"{message} (see `ntkexp --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ntkexp", description="Finite networks beside their infinite-width "
                "limits: run paper-figure experiments from YAML configs.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def config_args(sp):
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="dotted override, value parsed as YAML (repeatable), "
                             "e.g. --set model.width=1024 --set 'model.width=[100,1000]'")
        sp.add_argument("--preset", default=None, help="a preset named in the config "
                        "(e.g. cpu, paper, tiny)")

    r = sub.add_parser("run", help="run a config; prints the run folder and main figure")
    config_args(r)
    r.add_argument("--out", default=None, help="run folder (default runs/<stem>[-<preset>])")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--force", action="store_true", help="recompute cached units; run into "
                   "a folder that holds another config's results")

    pl = sub.add_parser("plot", help="redraw a run's figures from its saved results")
    pl.add_argument("run_dir")

    v = sub.add_parser("validate", help="check a config (and preset/overrides) without running")
    config_args(v)

    ls = sub.add_parser("list", help="list experiments, architectures, layer kinds, "
                        "activations, optimizers, datasets, targets")
    ls.add_argument("--config", default=None, help="also import this config's plugins and "
                    "say which names they add")

    g = sub.add_parser("gpu-check", help="on a GPU: run the Jacot figures' paper presets "
                       "with device: gpu and the benchmarks; write their timings")
    g.add_argument("--out", default=os.path.join("runs", "gpu-check"),
                   help="folder for the runs, benchmark JSON and timings.json")
    g.add_argument("--preset", default="paper", help="preset of the Jacot configs")
    g.add_argument("--config", dest="configs", action="append", default=None,
                   help="config to time (repeatable; default the two Jacot figures)")
    g.add_argument("--no-bench", action="store_true", help="skip the benchmarks")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    ga = sub.add_parser("gallery", help="gallery pages from committed records: record a "
                        "run, render/check the pages, re-run every gallery preset")
    gs = ga.add_subparsers(dest="gallery_cmd", required=True, parser_class=_Parser)
    gr = gs.add_parser("record", help="write experiments/<page>/results/<stem>-<preset>.json")
    gr.add_argument("run_dir")
    gr.add_argument("--page", required=True, help="folder name under experiments/")
    gr.add_argument("--no-figure", action="store_true", help="do not copy the main figure")
    for name, hlp in (("render", "write experiments/*/README.md from templates + records"),
                      ("check", "fail when a README.md differs from what its records give"),
                      ("run", "re-run every preset the templates name, record, render")):
        gp = gs.add_parser(name, help=hlp)
        if name != "check":
            gp.add_argument("--page", action="append", default=[], help="only this page")
        if name == "run":
            gp.add_argument("--force", action="store_true", help="re-run recorded ones too")
    for gp in (gr, *gs.choices.values()):
        if not any(a.dest == "root" for a in gp._actions):
            gp.add_argument("--root", default=".", help="repository root")
    return p


def default_run_dir(config_path: str, preset: str | None) -> str:
    stem = os.path.splitext(os.path.basename(config_path))[0]
    return os.path.join("runs", stem + (f"-{preset}" if preset else ""))


def _cmd_run(args) -> int:
    cfg = C.load(args.config, preset=args.preset, overrides=args.overrides)
    out = args.out or default_run_dir(args.config, args.preset)
    existed = os.path.exists(out)
    if not args.quiet:
        for line in checks.notes(cfg):
            print(line)
    try:
        res = run(cfg, out, force=args.force, quiet=args.quiet)
    except _user_error_types():
        raise
    except Exception as e:  # noqa: BLE001 - reported in one line, the folder tidied
        if _traceback_wanted():
            raise
        kept = _tidy_failed_run(out, existed)
        where = (f"run folder {out} can be resumed: {kept} finished unit(s) kept, rerun the "
                 "same command" if os.path.isdir(out) else "nothing was written")
        raise _RunFailed(f"run failed: {_describe(e)} ({where})") from None
    limit = res.summary.get("limit") if isinstance(res.summary, dict) else None
    if isinstance(limit, dict) and limit.get("method") == "monte_carlo":
        print(f"limit: {limit.get('note', 'Monte Carlo estimate')}")
    print(f"units: {res.computed_units} computed, {res.reused_units} reused from "
          f"{os.path.join(res.run_dir, 'units')}")
    print(f"run folder: {res.run_dir}")
    if res.main_figure:  # processes other than 0 of a multi-process run draw nothing
        print(f"figure: {res.main_figure}")
    return 0


def _user_error_types() -> tuple[type[BaseException], ...]:
    return (_OneLineError, ConfigError, UserError, DataError, RegistryError)


def _traceback_wanted() -> bool:
    return os.environ.get("NTKEXP_TRACEBACK", "").strip().lower() in ("1", "true", "yes")


def _describe(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _tidy_failed_run(out: str, existed: bool) -> int:
    """Leave the folder of a failed run consistent; return how many finished units it keeps.

    Finished units (``units/*.npz``) are kept for the rerun. Without a
    ``meta.json`` (the run never completed) a ``summary.json`` is removed, so no
    headline numbers stand beside units or a config they may not describe. A
    folder this call created and in which no unit finished is removed.
    """
    import contextlib
    import glob
    import shutil

    if not os.path.isdir(out):
        return 0
    units = glob.glob(os.path.join(out, "units", "*.npz"))
    if not existed and not units:
        shutil.rmtree(out, ignore_errors=True)
        return 0
    if not os.path.exists(os.path.join(out, "meta.json")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, "summary.json"))
    for tmp in glob.glob(os.path.join(out, "**", ".*.tmp"), recursive=True):
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return len(units)


def _cmd_validate(args) -> int:
    import jax

    cfg = C.load(args.config, preset=args.preset, overrides=args.overrides)
    if cfg.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    found = checks.preflight(cfg, EXPERIMENTS.get(cfg.experiment))
    units = len(cfg.model.widths) * len(cfg.train.learning_rates) * cfg.train.inits
    for line in found.notes:
        print(line)
    print(f"{args.config}: ok (experiment {cfg.experiment}, widths "
          f"{list(cfg.model.widths)}, {cfg.train.inits} init(s), {units} unit(s); data, "
          "models, kernels and device checked)")
    return 0


def _cmd_plot(args) -> int:
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _cmd_gallery(args) -> int:
    return cli_main(args)


def _registries() -> list[tuple[str, list[str]]]:
    return [("experiments", EXPERIMENTS.names()),
            ("architectures", ARCHITECTURES.names()),
            ("layer kinds", LAYERS.names()),
            ("activations (also layer kinds)", ACTIVATIONS.names()),
            ("optimizers", OPTIMIZERS.names()),
            ("datasets", DATASETS.names()),
            ("targets", TARGETS.names())]


def _cmd_list(args) -> int:
    before = dict(_registries())
    if args.config is not None:
        data = C.read_yaml(args.config)
        plugins = data.get("plugins") or []
        if not isinstance(plugins, list):
            raise C.ConfigError(f"{args.config}: plugins: expected a list of module names")
        C.import_plugins(plugins, args.config)
    after = _registries()
    for title, names in after:
        print(f"{title}: {', '.join(names)}")
    if args.config is not None:
        added = [(t, [n for n in names if n not in before[t]]) for t, names in after]
        added = [(t, n) for t, n in added if n]
        mods = ", ".join(C.read_yaml(args.config).get("plugins") or []) or "(none)"
        print(f"plug-ins of {args.config}: {mods}")
        for title, names in added:
            print(f"  {title} from plug-ins: {', '.join(names)}")
        if not added:
            print("  (they add no names, or were already imported)")
    return 0


GPU_CHECK_CONFIGS = (os.path.join("configs", "jacot_fig1.yaml"),
                     os.path.join("configs", "jacot_fig2.yaml"))


def require_gpu() -> list:
    """The GPU devices JAX sees; a :class:`UserError` (one line) when there are none."""
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        seen = ", ".join(sorted({d.platform for d in jax.devices()}))
        raise UserError(f"gpu-check needs a GPU, but JAX sees only: {seen}; on a machine "
                        "with an NVIDIA GPU run pip install -e '.[cuda12]' (see docs/gpu.md)")
    return gpus


def _cmd_gpu_check(args) -> int:
    """Time the paper presets of the Jacot figures on the GPU, then the benchmarks;
    write ``OUT/timings.json`` (and each run's folder, ``OUT/bench/*.json``)."""
    import importlib
    import pathlib
    import platform
    import time

    import jax

    gpus = require_gpu()
    configs = args.configs or list(GPU_CHECK_CONFIGS)
    for path in configs:  # validate everything before the long work starts
        C.load(path, preset=args.preset, overrides=["device=gpu"])
    timings = {"device": str(gpus[0]), "device_kind": getattr(gpus[0], "device_kind", None),
               "n_gpus": len(gpus), "jax": jax.__version__, "host": platform.node(),
               "preset": args.preset, "runs": {}, "benchmarks": {}}
    out = args.out
    tpath = os.path.join(out, "timings.json")
    for path in configs:
        cfg = C.load(path, preset=args.preset, overrides=["device=gpu"])
        stem = os.path.splitext(os.path.basename(path))[0]
        run_dir = os.path.join(out, f"{stem}-{args.preset}")
        print(f"== {stem} --preset {args.preset} (device: gpu)", flush=True)
        t0 = time.perf_counter()
        res = run(cfg, run_dir, force=True, quiet=args.quiet)
        wall = time.perf_counter() - t0
        timings["runs"][stem] = {"config": path, "wall_s": round(wall, 3),
                                 "units": res.computed_units, "run_dir": run_dir,
                                 "widths": list(cfg.model.widths),
                                 "inits": cfg.train.inits, "steps": cfg.train.steps}
        print(f"   {wall:.1f} s, {res.computed_units} units -> {run_dir}", flush=True)
        io.write_json(tpath, timings)
    if not args.no_bench:
        here = pathlib.Path("benchmarks")
        names = sorted(p.stem for p in here.glob("bench_*.py")) if here.is_dir() else []
        if not names:
            timings["benchmarks"] = {"skipped": "no benchmarks/ folder here (run from the "
                                                "repository root)"}
        for name in names:
            print(f"== benchmarks.{name}", flush=True)
            t0 = time.perf_counter()
            try:
                result = importlib.import_module(f"benchmarks.{name}").main(
                    os.path.join(out, "bench"))
                timings["benchmarks"][name] = {"wall_s": round(time.perf_counter() - t0, 3),
                                               "result": result}
            except Exception as e:  # noqa: BLE001 - record it and go on with the others
                timings["benchmarks"][name] = {"error": f"{type(e).__name__}: {e}"}
            io.write_json(tpath, timings)
    io.write_json(tpath, timings)
    print(f"timings: {tpath}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ntkexp`` console script; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        cmd = {"run": _cmd_run, "plot": _cmd_plot, "validate": _cmd_validate,
               "list": _cmd_list, "gpu-check": _cmd_gpu_check,
               "gallery": _cmd_gallery}[args.cmd]
        return cmd(args)
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else USAGE_ERROR
    except (_OneLineError, ConfigError, UserError, DataError, RegistryError) as e:
        msg = " ".join(str(e).split("\n"))
        print(f"ntkexp: error: {msg}", file=sys.stderr)
        return USAGE_ERROR
    except _RunFailed as e:
        print(f"ntkexp: error: {e}", file=sys.stderr)
        return RUN_ERROR
    except KeyboardInterrupt:
        print("ntkexp: interrupted (finished units are kept; rerun to complete)",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - any other command's failure: one line, exit 1
        if _traceback_wanted():
            raise
        print(f"ntkexp: error: {_describe(e)} (NTKEXP_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        return RUN_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
