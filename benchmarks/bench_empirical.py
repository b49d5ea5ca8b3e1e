"""Empirical NTK speed (matmul units) and blocked peak memory.

Setting of issue 3: depth-4 ReLU MLP, width 1024, d = 16, float32, n = 256
(and n = 4096 for "auto"), x2 = None. neural-tangents 0.6.5 on this kind of
machine: ~1.6 units (structured derivatives), ~90 (NTK-vector products),
~300 (Jacobian contraction). For "auto" the FLOP count of our implementation
(``ntkexp.empirical.structured_flops``) divided by the matmul FLOP rate gives
the ideal time; ``flop_efficiency`` = ideal / measured.

Peak memory: a blocked n = 10000, width 1024, depth 3 computation in a fresh
subprocess, peak RSS from ``resource.getrusage``.

Run: ``python -m benchmarks.run --only empirical`` (or ``python -m
benchmarks.bench_empirical``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks.common import matmul_flop_rate, matmul_unit, time_fn, write_json

_PEAK_SCRIPT = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from ntkexp.models.mlp import MLPSpec, MLPApply, init_params
from ntkexp.empirical import empirical_ntk
n, width, depth, block = 10000, 1024, 3, int(sys.argv[1])
spec = MLPSpec(depth=depth, width=width, activation="relu", b_std=0.1)
params = init_params(spec, 16, jax.random.key(0), jnp.float32)
x = jax.random.normal(jax.random.key(1), (n, 16), jnp.float32)
import time
t0 = time.perf_counter()
K = empirical_ntk(MLPApply(spec), params, x, block_size=block).block_until_ready()
dt = time.perf_counter() - t0
ok = bool(jnp.all(jnp.isfinite(K))) and bool(jnp.all(K == K.T))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss_bytes": peak, "seconds_incl_compile": dt, "finite_and_symmetric": ok}))
"""


def _setup(n, depth=4, width=1024, d=16):
    from ntkexp.models.mlp import MLPApply, MLPSpec, init_params

    spec = MLPSpec(depth=depth, width=width, activation="relu", b_std=0.0)
    params = init_params(spec, d, jax.random.key(0), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (n, d), jnp.float32)
    return spec, MLPApply(spec), params, x


def main(out_dir: str) -> dict:
    from ntkexp.empirical import empirical_ntk, structured_flops

    unit = matmul_unit()
    rate = matmul_flop_rate()
    res: dict = {"matmul_unit_s": unit, "matmul_gflops": rate / 1e9, "note": "shared CPU, noisy"}
    peer = {"structured": 1.6, "jvp": 90.0, "jacobian": 300.0}
    for n in (256, 4096):
        spec, f, params, x = _setup(n)
        t = time_fn(lambda p, x, f=f: empirical_ntk(f, p, x, method="auto"), params, x, repeats=5)
        ideal = structured_flops(spec, 16, n) / rate
        res[f"auto_n{n}"] = {"units": t / unit, "seconds": t,
                             "flops": structured_flops(spec, 16, n),
                             "ideal_units": ideal / unit, "time_over_ideal": t / ideal,
                             "flop_efficiency": ideal / t}
        print(f"auto n={n}: {t / unit:.3f} units ({t:.3f}s), {t / ideal:.2f}x its FLOP time",
              flush=True)
    spec, f, params, x = _setup(256)
    for m in ("jvp", "jacobian"):
        t = time_fn(lambda p, x, m=m: empirical_ntk(f, p, x, method=m), params, x, repeats=1)
        res[f"{m}_n256"] = {"units": t / unit, "seconds": t, "peer_units": peer[m]}
        print(f"{m} n=256: {t / unit:.1f} units (peer {peer[m]})", flush=True)
    block = 1024
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(block)], capture_output=True,
                          text=True, check=True)
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    res["blocked_n10000_w1024_d3"] = {"block_size": block, **peak,
                                      "peak_rss_gib": peak["peak_rss_bytes"] / 2**30}
    print(f"blocked n=10000: peak RSS {peak['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    write_json(out_dir, "empirical", res)
    return res


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
