"""Benchmark: analytic NTK of MLPs (issue 2's speed target), in matmul units.

* depth-4 ReLU MLP with bias, n = 4000, d = 16, float32 (neural-tangents 0.6.5
  needs ~22 units on this kind of machine; target <= 4);
* a tanh case (numerical Mehler duals), n = 1000, depth 2.

Memory: the tiled scan keeps ``O(block^2)`` work space besides the two outputs;
reported as the process peak RSS increase.
"""

from __future__ import annotations

import resource
import sys

import jax
import jax.numpy as jnp

from benchmarks.common import matmul_unit, time_fn, write_json
from ntkexp.models.analytic import analytic_kernel
from ntkexp.models.mlp import MLPSpec


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(out_dir: str = "bench_results") -> dict:
    unit = matmul_unit()
    res = {}
    x = jax.random.normal(jax.random.key(0), (4000, 16), jnp.float32)
    spec = MLPSpec(depth=4, width=1, activation="relu", W_std=1.4, b_std=0.1)
    rss0 = _rss_mb()
    t = time_fn(lambda a: analytic_kernel(spec, a), x, repeats=3)
    res["relu_depth4_n4000_d16_f32"] = {
        "seconds": t, "matmul_units": t / unit,
        "peak_rss_increase_mb": _rss_mb() - rss0,
        "output_mb": 2 * 4000 * 4000 * 4 / 2**20,
    }
    xt = jax.random.normal(jax.random.key(1), (1000, 16), jnp.float32)
    spec_t = MLPSpec(depth=2, width=1, activation="tanh", W_std=1.5, b_std=0.1)
    t = time_fn(lambda a: analytic_kernel(spec_t, a), xt, repeats=2)
    res["tanh_depth2_n1000_d16_f32"] = {"seconds": t, "matmul_units": t / unit}
    write_json(out_dir, "analytic", res)
    return res


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "bench_results"))
