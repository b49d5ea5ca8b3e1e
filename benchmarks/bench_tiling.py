"""Peak memory of a tiled kernel against its memory budget (``ntkexp.kernels.tiling``).

Each case runs in a fresh subprocess, which records ``ru_maxrss`` (a) after
importing jax and ntkexp and compiling a trivial function (the *baseline*: the
runtime's own constant footprint) and (b) after ``tiled_kernel`` (the *peak*).
The claim checked: ``peak <= budget + constant``, with the constant stated as
``max(peak - budget)`` over the cases; ``peak - baseline <= budget`` says the
budgeted part itself stays within the budget. The result of a streamed case
(``out=``) is not held in memory; an in-memory case counts its result
against the budget. Times are in matmul units (``benchmarks/common.py``).

Cases: the CNN-GAP analytic kernel (depth 3, filter 5, length 40, one channel:
the MNIST-1D network) of 500 inputs, streamed, at budgets 256 MiB .. 1 GiB; the
MLP kernel of 4000 inputs held in memory (256 MB of result) at 512 MiB and
1 GiB. ``untiled_estimate_gib`` is XLA's working memory for the whole kernel in
one call (the measured per-pair cost times ``n^2``), for contrast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CASE = r"""
import json, os, resource, sys, time
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import ntkexp
from ntkexp.kernels.tiling import parse_bytes, plan_tiles, tiled_kernel
from ntkexp.tiles import analytic_tiles
from ntkexp.models import ARCHITECTURES
from benchmarks.common import matmul_unit

case = json.loads(sys.argv[1])
arch = ARCHITECTURES.get(case["arch"])
spec = arch.make_spec(**case["spec"])
x = np.random.RandomState(0).randn(case["n"], 40)
jax.jit(lambda a: a + 1)(jnp.ones(3)).block_until_ready()
unit = matmul_unit()
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
fn = analytic_tiles(spec, case["arch"])
out = os.path.join(case["work"], "k.npy") if case["stream"] else None
plan = plan_tiles(fn, x, memory_budget=case["budget"], stream=case["stream"])
t0 = time.perf_counter()
k = tiled_kernel(fn, x, memory_budget=case["budget"], out=out, quiet=True)
wall = time.perf_counter() - t0
peak = rss()
print("RESULT", json.dumps({"baseline_bytes": base, "peak_bytes": peak,
      "budget_bytes": parse_bytes(case["budget"]), "tile": plan.tile,
      "tiles": len(plan.tiles), "tile_working_bytes": plan.tile_bytes,
      "result_bytes_in_memory": plan.result_bytes, "pair_bytes": plan.pair_bytes,
      "untiled_estimate_gib": plan.pair_bytes * case["n"] ** 2 / 2**30,
      "wall_s": wall, "matmul_units": wall / unit}))
"""

CNN = dict(depth=3, width=1, filter_size=5, activation="relu", W_std=2**0.5, b_std=0.05,
           readout="gap")
MLP = dict(depth=3, width=1, activation="relu", W_std=2**0.5, b_std=0.05)
CASES = (
    [dict(name=f"cnn_gap_n500_stream_{b}", arch="cnn", spec=CNN, n=500, budget=b, stream=True)
     for b in ("256MiB", "512MiB", "1GiB")]
    + [dict(name=f"mlp_n4000_memory_{b}", arch="mlp", spec=MLP, n=4000, budget=b,
            stream=False) for b in ("512MiB", "1GiB")]
)


def run_case(case: dict) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as work:
        payload = json.dumps({**case, "work": work})
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-c", CASE, payload], capture_output=True,
                              text=True, env=env, cwd=root, timeout=3600)
    if proc.returncode != 0:
        return {"name": case["name"], "error": proc.stderr[-2000:]}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    gib = 2**30
    r.update(name=case["name"], n=case["n"], stream=case["stream"],
             peak_gib=r["peak_bytes"] / gib, baseline_gib=r["baseline_bytes"] / gib,
             budget_gib=r["budget_bytes"] / gib,
             peak_minus_budget_gib=(r["peak_bytes"] - r["budget_bytes"]) / gib,
             peak_minus_baseline_over_budget=(r["peak_bytes"] - r["baseline_bytes"])
             / r["budget_bytes"])
    return r


def main(out_dir: str) -> dict:
    from benchmarks.common import write_json

    rows = []
    partial = os.path.join(out_dir, "bench_tiling.partial.jsonl")
    os.makedirs(out_dir, exist_ok=True)
    for case in CASES:
        r = run_case(case)
        rows.append(r)
        with open(partial, "a") as f:  # a cut run keeps the cases it finished
            f.write(json.dumps(r) + "\n")
        if "error" in r:
            print(f"{case['name']}: FAILED\n{r['error']}", flush=True)
            continue
        print(f"{r['name']}: peak {r['peak_gib']:.3f} GiB, baseline {r['baseline_gib']:.3f} "
              f"GiB, budget {r['budget_gib']:.3f} GiB, tile {r['tile']} ({r['tiles']} tiles), "
              f"{r['wall_s']:.1f} s", flush=True)
    ok = [r for r in rows if "error" not in r]
    payload = {
        "cases": rows,
        "constant_overhead_gib": max((r["peak_minus_budget_gib"] for r in ok), default=None),
        "max_budgeted_fraction": max((r["peak_minus_baseline_over_budget"] for r in ok),
                                     default=None),
        "claim": "peak RSS <= memory_budget + constant_overhead_gib (the runtime's baseline "
                 "plus what XLA's memory analysis does not see)",
    }
    path = write_json(out_dir, "bench_tiling", payload)
    print(f"constant overhead (max peak - budget): {payload['constant_overhead_gib']:.3f} GiB; "
          f"max (peak - baseline) / budget: {payload['max_budgeted_fraction']:.3f}; -> {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
