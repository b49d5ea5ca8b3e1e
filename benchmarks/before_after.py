"""Before / after a change: the analytic MLP, CNN-GAP and empirical-NTK cases, timed
for two source trees one after the other on the same machine (issue 19's check that
the one-house reorder made nothing slower).

Each case runs in a fresh process per tree (``PYTHONPATH=<tree>/src``, the same
venv), through the public API only (``nx.analytic_kernel``, ``nx.cnn_kernel``,
``nx.empirical_ntk``), so the same script times both trees; trees alternate
old, new, old, new for ``--rounds`` rounds and each case keeps its median per tree.
Times are in matmul units (``benchmarks/common.py``) measured in the same process.

Usage: ``python -m benchmarks.before_after --old OLD_TREE [--new .] [--rounds 2]``;
writes ``benchmarks/results/before_after.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_CASE = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp
import ntkexp as nx

def med(fn, *a, repeats):
    jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); jax.block_until_ready(fn(*a)); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

k1, k2 = jax.random.split(jax.random.key(0))
a = jax.random.normal(k1, (2048, 2048), jnp.float32)
b = jax.random.normal(k2, (2048, 2048), jnp.float32)
unit = med(jax.jit(lambda a, b: a @ b), a, b, repeats=7)
case = sys.argv[1]
if case == "analytic_mlp_relu_depth4_n4000":
    x = jax.random.normal(jax.random.key(0), (4000, 16), jnp.float32)
    spec = nx.MLPSpec(depth=4, width=1, activation="relu", W_std=1.4, b_std=0.1)
    t = med(lambda x: nx.analytic_kernel(spec, x), x, repeats=3)
elif case == "cnn_gap_depth3_q5_L40_n300":
    x = jax.random.normal(jax.random.key(0), (300, 40, 1), jnp.float32)
    spec = nx.CNNSpec(depth=3, width=1, image_shape=(40,), filter_size=5, readout="gap",
                      activation="relu", W_std=2.0**0.5, b_std=0.1)
    t = med(lambda x: nx.cnn_kernel(spec, x), x, repeats=3)
elif case == "empirical_ntk_auto_depth4_w1024_n256":
    from flax import nnx
    spec = nx.MLPSpec(depth=4, width=1024, activation="relu", b_std=0.0)
    f, p = nx.functional(nx.MLP(spec, in_dim=16, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (256, 16), jnp.float32)
    t = med(lambda p, x: nx.empirical_ntk(f, p, x, method="auto"), p, x, repeats=5)
print(json.dumps({"seconds": t, "matmul_unit_s": unit, "units": t / unit}))
"""

CASES = ("analytic_mlp_relu_depth4_n4000", "cnn_gap_depth3_q5_L40_n300",
         "empirical_ntk_auto_depth4_w1024_n256")


def _git(tree: str, *args: str) -> str:
    return subprocess.run(["git", "-C", tree, *args], capture_output=True, text=True,
                          check=False).stdout.strip()


def _one(tree: str, case: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"),
               JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    out = subprocess.run([sys.executable, "-c", _CASE, case], env=env, capture_output=True,
                         text=True, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=".")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    trees = {"before": args.old, "after": args.new}
    res: dict = {"benchmark": "before_after", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "trees": {k: {"path": v, "commit": _git(v, "rev-parse", "HEAD"),
                               "dirty": bool(_git(v, "status", "--porcelain"))}
                           for k, v in trees.items()},
                 "load_average_1min_start": os.getloadavg()[0], "cases": {}}
    for case in CASES:
        runs: dict = {"before": [], "after": []}
        for _ in range(args.rounds):
            for k in ("before", "after"):
                runs[k].append(_one(trees[k], case)["units"])
        b, a = statistics.median(runs["before"]), statistics.median(runs["after"])
        res["cases"][case] = {"before_units": b, "after_units": a, "after_over_before": a / b,
                              "runs_units": runs}
        print(f"{case}: before {b:.3f} units, after {a:.3f} units ({a / b:.2f}x)", flush=True)
    res["load_average_1min_end"] = os.getloadavg()[0]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "before_after.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(path + ".tmp", path)
    return res


if __name__ == "__main__":
    main()
