"""Full MNIST-1D NNGP + NTK (train 4000 x 4000, test 1000 x 4000): wall time and peak RSS.

Kernels are computed by :func:`ntkexp.kernels.tiling.tiled_kernel` through the
architecture registry (``cnn`` with the GAP readout: depth 3, filter 5, ReLU;
``mlp``: depth 3, ReLU), streamed to ``.npy`` files under ``--work`` so a run
cut by ``--max-seconds`` resumes where it stopped. When a kernel is cut, its
total time is extrapolated from the steady per-tile time of the tiles computed
in this call (the first tile, which compiles, is timed apart). When both
kernels are complete, the NNGP / NTK kernel-regression test accuracies are
computed too (float64 Cholesky, ridge 1e-6 x mean diagonal, one-hot targets
0.9 / -0.1).

Usage::

    python -m benchmarks.bench_mnist1d_kernels --arch cnn --max-seconds 900 \\
        --work /tmp/mnist1d_kernels --out benchmarks/results

``--diagnose`` reads the finished kernel files of ``--work`` instead and writes
the diagnostics JSON (``benchmarks/results/mnist1d_kernels_cnn_diagnostics.json``
for ``--arch cnn``): per kernel, the test accuracy, the
float64 condition number and how much a float32 solve changes the predictions
(:func:`ntkexp.theory.precision_gap`; Lee et al. 2020, sec. 3.4)::

    python -m benchmarks.bench_mnist1d_kernels --arch cnn --work /tmp/mnist1d_kernels --diagnose

Peak RSS is ``ru_maxrss`` of this process (it includes the Python / JAX runtime):
``peak_rss_gib_kernels`` after the kernels, ``peak_rss_gib`` after the regression too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

SPECS = {
    "cnn": dict(depth=3, width=1, filter_size=5, activation="relu", W_std=2**0.5, b_std=0.05,
                readout="gap"),
    "mlp": dict(depth=3, width=1, activation="relu", W_std=2**0.5, b_std=0.05),
}


class _Cut(Exception):
    pass


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def measure(arch: str, work: str, budget: str, max_seconds: float, dtype: str,
            quiet: bool = True, n_train: int = 4000, n_test: int = 1000) -> dict:
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from ntkexp.data import mnist1d_arrays
    from ntkexp.kernels.tiling import plan_tiles, tiled_kernel
    from ntkexp.models import ARCHITECTURES
    from ntkexp.tiles import analytic_tiles

    arch_rec = ARCHITECTURES.get(arch)
    spec = arch_rec.make_spec(**SPECS[arch])
    d = mnist1d_arrays()
    x, xt = d["x"][:n_train].astype(dtype), d["x_test"][:n_test].astype(dtype)
    d = {"y": d["y"][:n_train], "y_test": d["y_test"][:n_test]}
    fn = analytic_tiles(spec, arch)
    os.makedirs(work, exist_ok=True)
    t_start = time.time()
    report = {"arch": arch, "spec": SPECS[arch], "dtype": dtype, "budget": budget,
              "n_train": n_train, "n_test": n_test, "kernels": {}}
    results = {}
    for name, a, b in (("train", x, None), ("test", xt, x)):
        sub = "" if (n_train, n_test) == (4000, 1000) else f"_{n_train}_{n_test}"
        out = os.path.join(work, f"{arch}_{dtype}_{name}{sub}.npy")
        plan = plan_tiles(fn, a, b, memory_budget=budget, stream=True)
        times, cpu = [], []
        last = [time.time(), time.process_time()]

        def on_tile(done, todo, times=times, cpu=cpu, last=last):
            now, now_cpu = time.time(), time.process_time()
            times.append(now - last[0])
            cpu.append(now_cpu - last[1])
            last[0], last[1] = now, now_cpu
            if now - t_start > max_seconds and done < todo:
                raise _Cut

        t0 = time.time()
        last[0], last[1] = t0, time.process_time()
        try:
            res = tiled_kernel(fn, a, b, memory_budget=budget, out=out, quiet=quiet,
                               on_tile=on_tile, desc=f"{arch} {name}")
            complete = True
        except _Cut:
            res, complete = None, False
        wall = time.time() - t0
        n_tiles = len(plan.tiles)
        with open(out + ".manifest.json") as f:
            finished = len(json.load(f)["done"])
        steady = float(np.median(times[1:])) if len(times) > 1 else (times[0] if times else 0)
        steady_cpu = float(np.median(cpu[1:])) if len(cpu) > 1 else (cpu[0] if cpu else 0)
        entry = {
            "shape": [plan.n1, plan.n2], "tile": plan.tile, "tiles": n_tiles,
            "tiles_finished": finished, "tiles_this_call": len(times),
            "wall_s_this_call": round(wall, 2),
            "first_tile_s": round(times[0], 2) if times else None,
            "steady_tile_s": round(steady, 3),
            "steady_tile_cpu_s": round(steady_cpu, 3),
            # the machine is shared: CPU seconds / cores is the wall time it would take alone
            "estimated_total_cpu_s": round((cpu[0] if cpu else 0)
                                           + steady_cpu * (n_tiles - 1), 1),
            "tile_working_bytes": plan.tile_bytes,
            "complete": complete,
            "estimated_total_s": round((times[0] if times else 0) + steady * (n_tiles - 1), 1),
        }
        report["kernels"][name] = entry
        results[name] = res
        if not complete:
            break
    report["estimated_total_s"] = round(sum(k["estimated_total_s"]
                                            for k in report["kernels"].values()), 1)
    report["estimated_total_cpu_s"] = round(sum(k["estimated_total_cpu_s"]
                                                for k in report["kernels"].values()), 1)
    if len(report["kernels"]) < 2:  # the test kernel not started: same per-pair cost
        tr = report["kernels"]["train"]
        factor = 1 + n_train * n_test / (n_train * (n_train + 1) / 2)
        report["estimated_total_s"] = round(tr["estimated_total_s"] * factor, 1)
        report["estimated_total_cpu_s"] = round(tr["estimated_total_cpu_s"] * factor, 1)
    report["estimated_wall_s_alone_on_cores"] = round(report["estimated_total_cpu_s"]
                                                      / (os.cpu_count() or 1), 1)
    report["peak_rss_gib_kernels"] = round(_rss_gib(), 3)
    if all(r is not None for r in results.values()) and len(results) == 2:
        from ntkexp.theory import kernel_regression

        y, yt = d["y"], d["y_test"]
        onehot = np.full((len(y), 10), -0.1)
        onehot[np.arange(len(y)), y] = 0.9
        acc = {}
        for k in ("nngp", "ntk"):
            K = np.asarray(getattr(results["train"], k), np.float64)
            Kt = np.asarray(getattr(results["test"], k), np.float64)
            ridge = 1e-6 * float(np.mean(np.diag(K)))
            pred = np.asarray(kernel_regression(Kt, K, onehot, ridge=ridge))
            acc[k] = float(np.mean(np.argmax(pred, 1) == yt))
        report["test_accuracy"] = acc
    report["peak_rss_gib"] = round(_rss_gib(), 3)
    report["wall_s"] = round(time.time() - t_start, 1)
    report["cpu_count"] = os.cpu_count()
    return report


def diagnose(arch: str, work: str, dtype: str = "float64") -> dict:
    """Accuracy, condition number and float32 gap from the finished kernel files."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from ntkexp.data import mnist1d_arrays
    from ntkexp.theory import kernel_regression, precision_gap

    d = mnist1d_arrays()
    y, yt = d["y"], d["y_test"]
    K, Kt = (np.load(os.path.join(work, "_".join((arch, dtype, split)) + ".npy"), mmap_mode="r")
             for split in ("train", "test"))
    onehot = np.full((len(y), 10), -0.1)
    onehot[np.arange(len(y)), y] = 0.9
    report = {"arch": arch, "dtype": dtype, "ridge": "1e-6 x mean diagonal", "kernels": {}}
    for i, name in enumerate(("nngp", "ntk")):
        A, B = np.asarray(K[i], np.float64), np.asarray(Kt[i], np.float64)
        ridge = 1e-6 * float(np.mean(np.diag(A)))
        gap = precision_gap(B, A, onehot, ridge=ridge)
        pred = np.asarray(kernel_regression(B, A, onehot, ridge=ridge))
        gap["test_accuracy"] = float(np.mean(np.argmax(pred, 1) == yt))
        gap["exactly_symmetric"] = bool(np.array_equal(A, A.T))
        report["kernels"][name] = {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                                   for k, v in gap.items()}
    return report


def main(out_dir: str, arch: str = "mlp", work: str | None = None, budget: str = "1GiB",
         max_seconds: float = 600.0, dtype: str = "float64", n_train: int = 4000,
         n_test: int = 1000) -> dict:
    import tempfile

    work = work or tempfile.mkdtemp(prefix="mnist1d_kernels_")
    rep = measure(arch, work, budget, max_seconds, dtype, n_train=n_train, n_test=n_test)
    os.makedirs(out_dir, exist_ok=True)
    tag = "" if (n_train, n_test) == (4000, 1000) else f"_n{n_train}"
    with open(os.path.join(out_dir, f"mnist1d_kernels_{arch}{tag}.json"), "w") as f:
        json.dump(rep, f, indent=2)
    print(json.dumps(rep, indent=2))
    return rep


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="cnn", choices=sorted(SPECS))
    ap.add_argument("--work", default=None)
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--diagnose", action="store_true",
                    help="only read the finished kernels of --work (see the module docstring)")
    a = ap.parse_args()
    if a.diagnose:
        if a.work is None:
            ap.error("--diagnose needs --work (the folder of the finished kernels)")
        rep = diagnose(a.arch, a.work, a.dtype)
        os.makedirs(a.out, exist_ok=True)
        name = "_".join(("mnist1d_kernels", a.arch, "diagnostics")) + ".json"
        with open(os.path.join(a.out, name), "w") as f:
            json.dump(rep, f, indent=2)
        print(json.dumps(rep, indent=2))
        raise SystemExit(0)
    main(a.out, a.arch, a.work, a.budget, a.max_seconds, a.dtype, a.n_train, a.n_test)
