"""End-to-end runner speed (issue 13): ``ntkexp run CONFIG --preset P --force --quiet``
timed for an old and a new ``ntkexp`` executable, interleaved, same machine.

Cases: the Jacot et al. Fig. 2 paper preset and every ``cpu`` preset of a config
with >= 4 initialisations (``jacot_fig1``, ``jacot_fig2``, ``kernel_convergence``;
Fig. 2's cpu preset is its paper preset). Target: new >= 2x faster.

Each repeat runs, for each case, the old executable and then the new one with
``NTKEXP_LEGACY_STREAMS=1`` (the old random keys, see
``ntkexp.experiments.streams``), each into a fresh temporary folder, and times
the whole command from outside. The two summaries are compared leaf by leaf:
``max_rel_diff`` is the largest relative difference of a numeric summary entry
(float32 rounding only if the runs compute the same numbers). With
``--streams`` the new executable is also run once with the named streams, and
the summary's difference from the old is reported (expected: other random
draws, so sampling-size differences).

Each repeat runs the new executable twice per case: cold (a fresh, empty
persistent compilation cache, ``ntkexp.experiments.base.enable_compile_cache``:
everything compiles, as a first run does; ``new_s``, ``new_cold_median_s``,
``speedup_cold``) and
then warm (the same cache, now holding that run's programs, as any rerun of the
same shapes; ``new_warm_s``, ``new_warm_median_s``, ``speedup_warm``). Speedups
are ratios of medians.

Each case also gets ``bound``: a lower bound on its training time alone
(:func:`training_bound`: per GD step ``6 n W`` flops and ``3 W`` float32 weight
reads/writes per dense layer, at the matmul rate and weight-read rate measured on this
machine by :func:`machine_rates`: the fastest of many calls, over a 2048^3 matmul and
every case's own dense layers), and ``max_speedup_if_all_but_training_were_free``
= old wall / that bound: when it is under 2, no implementation of the same training
runs the case 2x faster than the old code.

One command (idle machine; about 12 min for three repeats)::

    python -m benchmarks.bench_runner --old OLD_CHECKOUT/.venv/bin/ntkexp --repeats 3

(``--new`` defaults to the ``ntkexp`` beside this Python; ``--only jacot_fig2``
picks cases; results go to ``benchmarks/results/runner.json``). Through
``python -m benchmarks.run --only runner`` it reads ``NTKEXP_BENCH_OLD`` (old
executable: the ``ntkexp`` of a checkout of the code to compare with) and
``NTKEXP_BENCH_REPEATS`` (default 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = {
    "jacot_fig2": ("configs/jacot_fig2.yaml", "paper"),
    "jacot_fig1": ("configs/jacot_fig1.yaml", "cpu"),
    "kernel_convergence": ("configs/kernel_convergence.yaml", "cpu"),
}
DEFAULT_OLD = None  # the old executable must be named (--old or NTKEXP_BENCH_OLD)


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), obj


def compare_summaries(a: dict, b: dict) -> dict:
    """Largest relative differences of numeric leaves (top 5), keys present in only one."""
    fa, fb = dict(_flat(a)), dict(_flat(b))
    diffs = []
    for k in fa.keys() & fb.keys():
        x, y = fa[k], fb[k]
        if isinstance(x, bool) or isinstance(y, bool) or not (
                isinstance(x, (int, float)) and isinstance(y, (int, float))):
            continue
        if math.isnan(x) and math.isnan(y):
            continue
        diffs.append((abs(x - y) / max(abs(x), abs(y), 1e-12), k, x, y))
    diffs.sort(reverse=True)
    return {"max_rel_diff": diffs[0][0] if diffs else 0.0,
            "largest": [{"key": k, "rel": d, "old": x, "new": y} for d, k, x, y in diffs[:5]],
            "only_old": sorted(fa.keys() - fb.keys())[:10],
            "only_new": sorted(fb.keys() - fa.keys())[:10]}


def run_once(exe: str, config: str, preset: str, env_extra=None) -> tuple[float, dict]:
    """Wall seconds of one ``exe run`` into a fresh folder, and its summary."""
    env = dict(os.environ, **(env_extra or {}))
    with tempfile.TemporaryDirectory(prefix="bench_runner_") as d:
        out = os.path.join(d, "run")
        cmd = [exe, "run", str(ROOT / config), "--preset", preset, "--force", "--quiet",
               "--out", out]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}"
                               f"{proc.stderr[-2000:]}")
        with open(os.path.join(out, "summary.json")) as f:
            return wall, json.load(f)


def machine_rates(shapes=()) -> dict:
    """Measured float32 matmul rate and weight-read rate (the fastest of many calls).

    The matmul rate is the highest over a 2048^3 product and each ``(rows, fan_in,
    fan_out)`` of ``shapes`` (the cases' dense layers: the rate depends on the shape,
    and a lower bound on time needs the highest rate reached). The weight-read rate is
    that of a width-1000 matrix times 4 columns (8 MB of weights fit the L3 cache: the
    Jacot Fig. 2 step); wider members stream from memory, slower, so the memory bound
    stays a lower bound.
    """
    import jax
    import jax.numpy as jnp

    # the fastest of many calls, not benchmarks.common's median matmul unit: a lower
    # bound on time needs the highest rate the machine reaches
    def best(f, *a, reps=20):
        f(*a).block_until_ready()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(*a).block_until_ready()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    mm = jax.jit(lambda a, b: a @ b)
    rates = {}
    for n, k, m in [(2048, 2048, 2048), *sorted(set(shapes))]:
        a, b = jnp.ones((n, k), jnp.float32), jnp.ones((k, m), jnp.float32)
        rates[f"{n}x{k}x{m}"] = 2 * n * k * m / best(mm, a, b, reps=50)
    W, h = jnp.ones((1000, 1000), jnp.float32), jnp.ones((1000, 4), jnp.float32)
    bw = W.nbytes / best(mm, W, h, reps=200)
    return {"matmul_flops_per_s": max(rates.values()), "matmul_flops_per_s_by_shape": rates,
            "weight_bytes_per_s": bw}


def matmul_shapes(config: str, preset: str) -> list[tuple[int, int, int]]:
    """``(rows, fan_in, fan_out)`` of the largest dense layer of each width of a case
    with at least 16 rows per step (fewer rows are bound by memory, not flops)."""
    from ntkexp.config import load

    cfg = load(str(ROOT / config), preset=preset)
    d, rows = int(cfg.data.dim), int(cfg.train.batch_size or cfg.data.n_train)
    if rows < 16:
        return []
    return [(rows, *max(cfg.model.spec(int(w)).layer_dims(d), key=lambda ab: ab[0] * ab[1]))
            for w in cfg.model.widths]


def training_bound(config: str, preset: str, rates: dict) -> dict:
    """A lower bound on the training time of a run: sum over widths and inits of
    ``steps * max(flops / matmul rate, bytes / weight-read rate)`` per step.

    Per step of full-batch GD on ``n`` rows, each dense layer of ``W = fan_in x fan_out``
    weights costs ``6 n W`` flops (forward, input gradient, weight gradient) and at least
    ``3 W`` float32 reads/writes (read forward, read backward, write the update). This is
    the work of the algorithm, not of an implementation: no code that trains these nets
    by exact GD steps does less.
    """
    from ntkexp.config import load

    cfg = load(str(ROOT / config), preset=preset)
    m, t = cfg.model, cfg.train
    d, rows = int(cfg.data.dim), int(t.batch_size or cfg.data.n_train)
    total, per_width = 0.0, {}
    for w in m.widths:
        w = int(w)
        sizes = [a * b for a, b in m.spec(w).layer_dims(d)]
        flops = 6 * rows * sum(sizes)
        byts = 3 * 4 * sum(sizes)
        step = max(flops / rates["matmul_flops_per_s"], byts / rates["weight_bytes_per_s"])
        sec = step * int(t.steps) * int(t.inits) * len(t.learning_rates)
        per_width[str(w)] = {"flops_per_step": flops, "bytes_per_step": byts,
                             "bound": "flops" if flops / rates["matmul_flops_per_s"]
                             >= byts / rates["weight_bytes_per_s"] else "memory",
                             "training_lower_bound_s": round(sec, 2)}
        total += sec
    return {"per_width": per_width, "training_lower_bound_s": round(total, 2)}


def bench(old: str | None, new: str, repeats: int = 1, only=None, streams: bool = False,
          log=print) -> dict:
    cases = {k: v for k, v in CASES.items() if not only or k in only}
    res = {"host": platform.node(), "cores": os.cpu_count(), "old": old, "new": new,
           "repeats": repeats, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "note": "wall seconds of `ntkexp run CONFIG --preset P --force --quiet`, old and "
                   "new interleaved; new runs use NTKEXP_LEGACY_STREAMS=1 so their summaries "
                   "can be compared with the old", "cases": {}}
    for name, (config, preset) in cases.items():
        res["cases"][name] = {"config": config, "preset": preset, "old_s": [], "new_s": [],
                              "new_warm_s": []}
    res["compile_cache"] = ("each repeat runs the new code cold (a fresh, empty persistent "
                            "compilation cache) then warm (the same cache, primed)")
    for r in range(repeats):
        for name, (config, preset) in cases.items():
            c = res["cases"][name]
            s_old = None
            if old:
                t, s_old = run_once(old, config, preset)
                c["old_s"].append(round(t, 2))
                log(f"[{r + 1}/{repeats}] {name} --preset {preset}: old {t:.1f} s")
            with tempfile.TemporaryDirectory(prefix="bench_runner_xla_") as cache:
                env = {"NTKEXP_LEGACY_STREAMS": "1", "NTKEXP_COMPILE_CACHE": cache}
                t, s_new = run_once(new, config, preset, env)
                c["new_s"].append(round(t, 2))
                t2, _ = run_once(new, config, preset, env)
                c["new_warm_s"].append(round(t2, 2))
            log(f"[{r + 1}/{repeats}] {name} --preset {preset}: new cold {t:.1f} s, "
                f"warm {t2:.1f} s")
            if s_old is not None:
                c["summary_vs_old"] = compare_summaries(s_old, s_new)
                if streams and r == 0:
                    t3, s_named = run_once(new, config, preset)
                    c["named_streams_s"] = round(t3, 2)
                    c["named_streams_vs_old"] = compare_summaries(s_old, s_named)
    shapes = [s for config, preset in cases.values() for s in matmul_shapes(config, preset)]
    res["machine"] = rates = machine_rates(shapes)
    for c in res["cases"].values():
        c["bound"] = training_bound(c["config"], c["preset"], rates)
        if c["old_s"]:
            # the most any implementation of the same training could gain end to end
            c["max_speedup_if_all_but_training_were_free"] = round(
                statistics.median(c["old_s"]) / c["bound"]["training_lower_bound_s"], 2)
        if c["old_s"] and c["new_s"]:
            c["old_median_s"] = statistics.median(c["old_s"])
            c["new_cold_median_s"] = statistics.median(c["new_s"])
            c["speedup_cold"] = round(c["old_median_s"] / c["new_cold_median_s"], 2)
            c["new_warm_median_s"] = statistics.median(c["new_warm_s"])
            c["speedup_warm"] = round(c["old_median_s"] / c["new_warm_median_s"], 2)
    return res


def _write(res: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "runner.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    return path


def _default_new() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ntkexp")


def main(out_dir: str = "benchmarks/results") -> dict:
    """Entry point of ``benchmarks/run.py`` (old executable from ``NTKEXP_BENCH_OLD``)."""
    old = os.environ.get("NTKEXP_BENCH_OLD") or DEFAULT_OLD
    res = bench(old, _default_new(), int(os.environ.get("NTKEXP_BENCH_REPEATS", "1")))
    print(_write(res, out_dir))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default=DEFAULT_OLD)
    ap.add_argument("--new", default=_default_new())
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", action="append", choices=sorted(CASES))
    ap.add_argument("--streams", action="store_true",
                    help="also run the new code once with the named streams")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    r = bench(a.old, a.new, a.repeats, a.only, a.streams, log=lambda m: print(m, flush=True))
    print(_write(r, a.out))
    for name, c in r["cases"].items():
        print(name, {k: c.get(k) for k in ("old_median_s", "new_cold_median_s", "speedup_cold",
                                           "new_warm_median_s", "speedup_warm")},
              c.get("summary_vs_old", {}).get("max_rel_diff"))
