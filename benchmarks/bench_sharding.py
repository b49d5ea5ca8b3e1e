"""Speed-up of sharded kernels and ensembles with the number of (host) devices.

For k = 1, 2, 4 devices (``XLA_FLAGS=--xla_force_host_platform_device_count=k``,
one subprocess each, since the flag must be set before jax is imported) it
times, in matmul units (docs/conventions.md, "Speed"):

* ``cntk_gap``: the analytic CNTK-GAP (8x8 images, depth 3, 32 points, float32)
  through ``ntkexp.sharding.sharded_kernel``;
* ``mlp_kernel``: the analytic MLP kernel on 2048 points (depth 5);
* ``ensemble``: 100 full-batch GD steps of 8 MLP initialisations (width 256,
  256 points), ``jit(vmap)`` over inits placed by ``shard_ensemble``.

On a CPU, forced host devices share the same cores, so the speed-up is bounded
by the number of physical cores (and by what XLA already parallelises within
one device); on a multi-GPU machine each device is a GPU.

Usage: ``python -m benchmarks.run --only sharding``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

DEVICE_COUNTS = (1, 2, 4)


def _worker() -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.common import matmul_unit, time_fn
    from ntkexp.models.analytic import analytic_kernel
    from ntkexp.models.cnn import CNNSpec, cnn_kernel
    from ntkexp.models.mlp import MLPApply, MLPSpec, init_params
    from ntkexp.sharding import shard_ensemble, sharded_kernel

    unit = matmul_unit()
    out = {"devices": len(jax.devices()), "matmul_unit_s": unit}

    cs = CNNSpec(depth=3, width=1, image_shape=(8, 8), readout="gap", W_std=1.4, b_std=0.1)
    xi = jax.random.normal(jax.random.key(0), (32, 8, 8, 1), jnp.float32)
    out["cntk_gap"] = time_fn(lambda: sharded_kernel(lambda a, b: cnn_kernel(cs, a, b), xi),
                              repeats=3) / unit

    ms = MLPSpec(depth=5, width=1, W_std=1.4, b_std=0.1)
    x = jax.random.normal(jax.random.key(1), (2048, 16), jnp.float32)
    out["mlp_kernel"] = time_fn(lambda: sharded_kernel(lambda a, b: analytic_kernel(ms, a, b), x),
                                repeats=3) / unit

    spec = MLPSpec(depth=2, width=256, W_std=1.4, b_std=0.1)
    app = MLPApply(spec)
    xt = jax.random.normal(jax.random.key(2), (256, 16), jnp.float32)
    y = jnp.sin(xt[:, 0])
    stack = jax.vmap(lambda k: init_params(spec, 16, k))(jax.random.split(jax.random.key(3), 8))
    stack = shard_ensemble(stack)

    def train(p):
        def step(p, _):
            g = jax.grad(lambda q: 0.5 * jnp.mean((app(q, xt)[:, 0] - y) ** 2))(p)
            return jax.tree_util.tree_map(lambda a, b: a - 0.5 * b, p, g), None
        return jax.lax.scan(step, p, None, length=100)[0]

    run = jax.jit(jax.vmap(train))
    out["ensemble"] = time_fn(run, stack, repeats=3) / unit
    return out


def main(out_dir: str) -> dict:
    from benchmarks.common import write_json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for k in DEVICE_COUNTS:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={k}",
                   JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        proc = subprocess.run(
            [sys.executable, "-c",
             "import json; from benchmarks.bench_sharding import _worker; "
             "print('RESULT ' + json.dumps(_worker()))"],
            cwd=root, env=env, capture_output=True, text=True, timeout=1800,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"bench_sharding worker with {k} devices failed:\n{proc.stderr[-2000:]}"
            )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"  {k} device(s): " + ", ".join(
            f"{n}={rows[-1][n]:.2f}" for n in ("cntk_gap", "mlp_kernel", "ensemble")), flush=True)
    base = rows[0]
    speedup = {n: [base[n] / r[n] for r in rows] for n in ("cntk_gap", "mlp_kernel", "ensemble")}
    payload = {
        "units": "matmul units (time / one 2048^3 float32 matmul in the same process)",
        "device_counts": list(DEVICE_COUNTS),
        "rows": rows,
        "speedup_vs_1_device": speedup,
        "note": "forced host devices share the machine's CPU cores",
    }
    write_json(out_dir, "sharding", payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
