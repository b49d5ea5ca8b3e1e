"""Shared benchmark helpers: timing in matmul units (see docs/conventions.md, "Speed").

A time in *matmul units* is the measured time divided by the time of one
2048 x 2048 x 2048 float32 matmul measured in the same process, so numbers stay
comparable on a shared, noisy machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

MATMUL_N = 2048
MATMUL_FLOPS = 2 * MATMUL_N**3


def block(x):
    return jax.tree_util.tree_map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x
    )


def time_fn(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (seconds) of ``fn(*args)`` after ``warmup`` calls."""
    for _ in range(warmup):
        block(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


_UNIT: float | None = None


def matmul_unit(repeats: int = 7) -> float:
    """Seconds for one 2048^3 float32 matmul in this process (cached)."""
    global _UNIT
    if _UNIT is None:
        k1, k2 = jax.random.split(jax.random.key(0))
        a = jax.random.normal(k1, (MATMUL_N, MATMUL_N), jnp.float32)
        b = jax.random.normal(k2, (MATMUL_N, MATMUL_N), jnp.float32)
        mm = jax.jit(lambda a, b: a @ b)
        _UNIT = time_fn(mm, a, b, repeats=repeats, warmup=2)
    return _UNIT


def matmul_flop_rate() -> float:
    """FLOP/s of the reference matmul in this process."""
    return MATMUL_FLOPS / matmul_unit()


def env_info() -> dict:
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "matmul_unit_s": matmul_unit(),
    }


def write_json(out_dir: str, name: str, payload: dict) -> str:
    """Write ``payload`` (plus environment info) atomically to ``out_dir/name.json``."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"benchmark": name, "env": env_info(), **payload}, f, indent=2)
    os.replace(tmp, path)
    return path
