"""Benchmark: analytic CNN-GAP kernel (issue 12's speed target), side by side with neural-tangents.

Workload (issue 12): depth-3, filter-5 ReLU 1-D CNN with a global-average-pool
readout (``W_std = sqrt(2)``, ``b_std = 0.1``, NTK parameterization, stride 1,
SAME padding), inputs of length 40 with one channel, ``n = 300``, NNGP and NTK
for ``x2 = None``. The same seeded inputs go to

* ntkexp in this process (:func:`ntkexp.kernels.cnn.conv_stack_kernel`, the
  map ``arch: cnn`` and a conv-stack layer composition run), float32 and
  float64;
* neural-tangents 0.6.5 (``stax.Conv``/``Relu``/``GlobalAvgPool``/``Dense``,
  ``jit(kernel_fn)``) in a subprocess of the interpreter named by the
  environment variable ``NT_PYTHON`` (a virtual environment with
  ``neural-tangents==0.6.5 jax==0.4.23 jaxlib==0.4.23 'numpy<2' 'scipy<1.12'``;
  neural-tangents needs JAX <= 0.4.25, so it cannot share this process).
  Without it the peer is skipped with a note.

Both sides report seconds and matmul units (their own 2048^3 float32 matmul in
their own process; :mod:`benchmarks.common`), after one warm-up call on the
same shapes. The target is ntkexp >= 10x faster in the same run.

Also: the FLOP count of the map (per kernel entry and layer, ``2 (q + 1)`` for
the two patch sums and about 45 for the relu dual; see the module docstring
of :mod:`ntkexp.kernels.cnn`) against the achieved rate, the peak-RSS increase
at ``n = 300`` and for one ``1000 x 500`` tile (which asked for 27 GB before),
and an extrapolation to the full MNIST-1D workload (4000 x 4000 symmetric plus
1000 x 4000 pairs, NNGP and NTK in one pass).

Also the finite side: ``empirical_ntk(method="auto")`` of a width-64 CNN-GAP
(the structured conv path) against the jvp and jacobian methods.

Run: ``python -m benchmarks.run --only cnn`` (registered by file name).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import matmul_flop_rate, matmul_unit, time_fn, write_json
from ntkexp.kernels.cnn import conv_stack_kernel

DEPTH, Q, L, N = 3, 5, 40, 300
W_STD, B_STD = 2.0**0.5, 0.1

# the neural-tangents side, run by NT_PYTHON (it only calls neural-tangents)
_NT_SCRIPT = r"""
import json, sys, time
import numpy as np
import jax
if sys.argv[2] == "float64":
    jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from neural_tangents import stax
x = jnp.asarray(np.load(sys.argv[1]), sys.argv[2])
depth, q, w, b = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
layers = []
for _ in range(depth):
    layers += [stax.Conv(1, (q,), (1,), "SAME", W_std=w, b_std=b,
                         dimension_numbers=("NHC", "HIO", "NHC")), stax.Relu()]
layers += [stax.GlobalAvgPool(), stax.Dense(1, w, b)]
kfn = jax.jit(stax.serial(*layers)[2], static_argnames="get")
def run():
    k = kfn(x, None, get=("nngp", "ntk"))
    return jax.block_until_ready(k)
t0 = time.perf_counter(); run(); first = time.perf_counter() - t0
t0 = time.perf_counter(); k = run(); t = time.perf_counter() - t0
a = jnp.ones((2048, 2048), jnp.float32); mm = jax.jit(lambda a: a @ a)
mm(a).block_until_ready(); ts = []
for _ in range(5):
    t1 = time.perf_counter(); mm(a).block_until_ready(); ts.append(time.perf_counter() - t1)
np.save(sys.argv[7], np.stack([np.asarray(k.nngp, np.float64), np.asarray(k.ntk, np.float64)]))
print(json.dumps({"seconds": t, "first_call_seconds": first, "matmul_unit_s": sorted(ts)[2],
                  "jax": jax.__version__}))
"""


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops(n_pairs: int, n_positions: int, depth: int = DEPTH, q: int = Q) -> float:
    """Arithmetic operations of the map (sqrt and division count 1)."""
    per_entry_layer = 2 * (q + 1) + 45
    return float(n_pairs) * n_positions**2 * depth * per_entry_layer


def _kernel(x, x2=None):
    return conv_stack_kernel(x, x2, depth=DEPTH, filter_size=Q, W_std=W_STD, b_std=B_STD,
                             activation="relu", readout="gap")


def _nt(x: np.ndarray, dtype: str) -> dict:
    py = os.environ.get("NT_PYTHON") or None
    if not py or not os.path.exists(py):
        return {"skipped": "no neural-tangents interpreter (set NT_PYTHON)"}
    with tempfile.TemporaryDirectory() as d:
        xin, kout = os.path.join(d, "x.npy"), os.path.join(d, "k.npy")
        np.save(xin, x)
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
        r = subprocess.run([py, "-c", _NT_SCRIPT, xin, dtype, str(DEPTH), str(Q), str(W_STD),
                            str(B_STD), kout], capture_output=True, text=True, env=env)
        if r.returncode:
            return {"skipped": f"neural-tangents failed: {r.stderr.strip().splitlines()[-1:]}"}
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["kernels"] = np.load(kout)
    out["matmul_units"] = out["seconds"] / out["matmul_unit_s"]
    out["interpreter"] = py
    return out


def _empirical(unit: float) -> dict:
    """``empirical_ntk`` of a finite CNN-GAP (depth 3, width 64, filter 5, length 40, n = 128):
    ``method="auto"`` (structured: conv patches x backward vectors) vs jvp and jacobian."""
    from ntkexp.empirical import empirical_ntk
    from ntkexp.models.cnn import CNNApply, CNNSpec, init_cnn_params

    spec = CNNSpec(depth=DEPTH, width=64, image_shape=(L,), filter_size=Q, W_std=W_STD,
                   b_std=B_STD)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(128, L, 1)), jnp.float32)
    p = init_cnn_params(spec, x.shape[1:], jax.random.key(0), jnp.float32)
    out = {"case": "CNN-GAP depth 3, width 64, filter 5, length 40, n = 128, float32"}
    for m in ("auto", "jvp", "jacobian"):
        t = time_fn(lambda a, m=m: empirical_ntk(CNNApply(spec), p, a, method=m), x, repeats=3)
        out[m] = {"seconds": t, "matmul_units": t / unit}
    out["auto_speedup_vs_best_generic"] = min(out["jvp"]["seconds"],
                                              out["jacobian"]["seconds"]) / out["auto"]["seconds"]
    return out


def main(out_dir: str = "bench_results") -> dict:
    unit = matmul_unit()
    rate = matmul_flop_rate()
    x = np.random.default_rng(0).normal(size=(N, L, 1))
    res = {"workload": f"CNN-GAP relu, depth {DEPTH}, filter {Q}, length {L}, 1 channel, "
                       f"n = {N}, x2 = None, NNGP + NTK"}
    pairs_sym = N * (N + 1) // 2
    for dt in ("float32", "float64"):
        if dt == "float64":
            jax.config.update("jax_enable_x64", True)
        xa = jnp.asarray(x, dt)
        rss0 = _rss_mb()
        t = time_fn(_kernel, xa, repeats=3)
        k = _kernel(xa)
        mine = {"seconds": t, "matmul_units": t / unit,
                "peak_rss_increase_mb": _rss_mb() - rss0,
                "flops": flops(pairs_sym, L), "gflop_per_s": flops(pairs_sym, L) / t / 1e9,
                "fraction_of_matmul_rate": flops(pairs_sym, L) / t / rate}
        peer = _nt(x.astype(dt), dt) if dt == "float32" else {
            "skipped": "float32 only (its default); each neural-tangents run takes minutes"}
        entry = {"ntkexp": mine}
        if "kernels" in peer:
            ref = peer.pop("kernels")
            ours = np.stack([np.asarray(k.nngp, np.float64), np.asarray(k.ntk, np.float64)])
            entry["max_rel_diff_vs_nt"] = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
            entry["speedup_vs_nt"] = peer["matmul_units"] / mine["matmul_units"]
            entry["speedup_vs_nt_seconds"] = peer["seconds"] / t
        entry["neural_tangents"] = peer
        res[f"n{N}_{dt}"] = entry
        print(dt, json.dumps({k_: v for k_, v in entry.items() if k_ != "neural_tangents"},
                             default=float), flush=True)
        print("  nt:", json.dumps(peer, default=float), flush=True)
    # one 1000 x 500 tile (float32), memory and time, and the MNIST-1D extrapolation
    jax.config.update("jax_enable_x64", False)
    xb = jnp.asarray(np.random.default_rng(1).normal(size=(1000, L, 1)), jnp.float32)
    rss0 = _rss_mb()
    t_tile = time_fn(_kernel, xb, xb[:500], repeats=1)
    res["tile_1000x500_float32"] = {
        "seconds": t_tile, "matmul_units": t_tile / unit,
        "peak_rss_increase_mb": _rss_mb() - rss0,
        "gflop_per_s": flops(500_000, L) / t_tile / 1e9}
    per_pair = t_tile / 500_000
    mnist_pairs = 4000 * 4001 // 2 + 1000 * 4000
    res["mnist1d_extrapolated_float32"] = {
        "pairs": mnist_pairs, "seconds": per_pair * mnist_pairs,
        "minutes": per_pair * mnist_pairs / 60,
        "note": "per-pair time of the 1000 x 500 tile times the MNIST-1D pairs "
                "(4000 x 4000 symmetric + 1000 x 4000); the tiling wrapper is built elsewhere"}
    print(json.dumps({k_: res[k_] for k_ in ("tile_1000x500_float32",
                                             "mnist1d_extrapolated_float32")}), flush=True)
    res["empirical_ntk_cnn"] = _empirical(unit)
    print(json.dumps(res["empirical_ntk_cnn"]), flush=True)
    write_json(out_dir, "cnn", res)
    return res


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_results")
