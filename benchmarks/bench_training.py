"""Training speed (issue 4), in matmul units (time / one 2048^3 float32 matmul).

1. Jacot et al. (2018) Figure 2 setting: depth-3 ReLU MLP (b_std = 0.1), 4 points
   on the unit circle, 1000 full-batch GD steps (lr 1, mean loss), 10
   initialisations. ``ntkexp.training.train(ensemble=True)`` (one jit, scan over
   steps, vmap over inits) against a plain Python loop that calls a jitted optax
   step for each initialisation in turn. Widths 50 (target >= 20x faster) and
   1000 (target: no slower). Timed with the default ``threads`` (members split
   over the host's cores) and with ``threads=1`` (one program on one thread).
2. Depth-3 width-2048 MLP, n = 1024, d = 16, 10 initialisations: training
   throughput ``3 x forward FLOPs x steps x inits / time`` as a fraction of the
   matmul FLOP rate measured in the same process (target >= 0.5).
3. One NGD step (n = 256, same MLP, one init) against the empirical NTK plus one
   vjp computed separately (target <= 2x), and against one GD step.
4. NGD through ``train`` (the structured empirical NTK reaches the optimizer) against
   the same jitted ``ngd`` step called directly, per step: depth-2 width-1024 ReLU MLP,
   n = 16 (target <= 1.5x).

Run: ``python -m benchmarks.run --only training`` (``NTKEXP_BENCH_QUICK=1``
shrinks part 2 to two steps and part 3 to n = 128 for a loaded CPU).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import matmul_flop_rate, matmul_unit, time_fn, write_json
from ntkexp.empirical import empirical_ntk
from ntkexp.models.mlp import MLPSpec
from ntkexp.optim import gd, ngd
from ntkexp.training import _host_cores, init_ensemble, train


def _circle_data():
    g = np.array([-2.0, -0.5, 1.0, 2.5])
    x = np.stack([np.cos(g), np.sin(g)], axis=1).astype(np.float32)
    y = np.array([0.3, -0.2, 0.1, -0.3], np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _python_loop_baseline(f, inits, x, y, steps, lr):
    opt = optax.sgd(lr)
    y2 = y[:, None]

    def loss(p):
        r = f(p, x) - y2
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=1))

    @jax.jit
    def step(p, s):
        val, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, val

    def run():
        outs = []
        for p in inits:
            s = opt.init(p)
            losses = []
            for _ in range(steps):
                p, s, val = step(p, s)
                losses.append(val)
            outs.append((p, jnp.stack(losses)))
        return outs

    return run


def bench_jacot_fig2(width: int, steps: int = 1000, inits: int = 10) -> dict:
    spec = MLPSpec(depth=3, width=width, activation="relu", b_std=0.1)
    x, y = _circle_data()
    keys = jax.random.split(jax.random.key(0), inits)
    f, ps = init_ensemble(spec, 2, keys, jnp.float32)
    tx = gd(1.0)

    def ours(threads=None):
        return train(f, ps, x, y, optimizer=tx, steps=steps, ensemble=True, threads=threads).losses

    singles = [jax.tree_util.tree_map(lambda a, i=i: a[i], ps) for i in range(inits)]
    loop = _python_loop_baseline(f, singles, x, y, steps, 1.0)
    rep = 7 if width <= 100 else 1  # noisy ms-scale runs at width 50; ~15 s at width 1000
    t_ours = time_fn(ours, repeats=rep)  # default: members split over the host's cores
    t_one = time_fn(lambda: ours(threads=1), repeats=rep)  # one program, one thread
    t_loop = time_fn(loop, repeats=3 if width <= 100 else 1)
    return {"width": width, "steps": steps, "inits": inits, "host_threads": _host_cores(),
            "ntkexp_units": t_ours / matmul_unit(),
            "ntkexp_one_thread_units": t_one / matmul_unit(),
            "python_loop_units": t_loop / matmul_unit(),
            "speedup": t_loop / t_ours, "speedup_one_thread": t_loop / t_one}


def _mlp_flops(spec: MLPSpec, in_dim: int, n: int) -> float:
    return float(sum(2 * n * a * b for a, b in spec.layer_dims(in_dim)))


def bench_throughput(steps: int, inits: int = 10, n: int = 1024, width: int = 2048) -> dict:
    spec = MLPSpec(depth=3, width=width, activation="relu")
    d = 16
    x = jax.random.normal(jax.random.key(1), (n, d), jnp.float32)
    y = jax.random.normal(jax.random.key(2), (n,), jnp.float32)
    f, ps = init_ensemble(spec, d, jax.random.split(jax.random.key(0), inits), jnp.float32)
    tx = gd(0.1)
    t = time_fn(lambda: train(f, ps, x, y, optimizer=tx, steps=steps, ensemble=True).losses,
                repeats=2)
    flops = 3 * _mlp_flops(spec, d, n) * steps * inits
    rate = flops / t
    return {"n": n, "width": width, "inits": inits, "steps": steps, "time_units": t / matmul_unit(),
            "flops": flops, "flop_rate": rate, "matmul_flop_rate": matmul_flop_rate(),
            "fraction_of_matmul_rate": rate / matmul_flop_rate()}


def bench_ngd_step(n: int, width: int = 2048) -> dict:
    spec = MLPSpec(depth=3, width=width, activation="relu")
    d = 16
    f, ps = init_ensemble(spec, d, jax.random.split(jax.random.key(0), 1), jnp.float32)
    p = jax.tree_util.tree_map(lambda a: a[0], ps)
    x = jax.random.normal(jax.random.key(1), (n, d), jnp.float32)
    r = jax.random.normal(jax.random.key(2), (n, 1), jnp.float32)
    tx = ngd(1.0, damping=1e-3, apply_fn=f)
    st = tx.init(p)
    ngd_step = jax.jit(lambda q: optax.apply_updates(q, tx.update(None, st, q, x=x, residual=r)[0]))
    ntk = jax.jit(lambda q: empirical_ntk(f, q, x))
    vjp = jax.jit(lambda q: jax.vjp(lambda z: f(z, x), q)[1](r)[0])

    def gd_step(q):
        g = jax.grad(lambda z: 0.5 * jnp.sum((f(z, x) - r) ** 2))(q)
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, q, g)

    gd_step = jax.jit(gd_step)
    t_ngd, t_ntk, t_vjp, t_gd = (time_fn(fn, p, repeats=3) for fn in (ngd_step, ntk, vjp, gd_step))
    u = matmul_unit()
    return {"n": n, "width": width, "ngd_step_units": t_ngd / u, "empirical_ntk_units": t_ntk / u,
            "vjp_units": t_vjp / u, "gd_step_units": t_gd / u,
            "ngd_over_ntk_plus_vjp": t_ngd / (t_ntk + t_vjp), "ngd_over_gd": t_ngd / t_gd}


def bench_ngd_through_train(n: int = 16, width: int = 1024, steps: tuple = (20, 120)) -> dict:
    """NGD through ``train`` against the direct jitted ``ngd`` update and against GD
    through ``train``, per step, from the difference of two run lengths (so the fixed
    cost of a call, argument checks, set-up and the final loss, is not counted as
    step time)."""
    spec = MLPSpec(depth=2, width=width, activation="relu")
    d = 16
    f, ps = init_ensemble(spec, d, jax.random.split(jax.random.key(0), 1), jnp.float32)
    p = jax.tree_util.tree_map(lambda a: a[0], ps)
    x = jax.random.normal(jax.random.key(1), (n, d), jnp.float32)
    y = jnp.sin(x[:, :1])
    tx = ngd(0.5, damping=1e-3, ntk_method="structured")

    @jax.jit
    def direct_step(q, st):
        r = f(q, x) - y
        upd, st = tx.update(None, st, q, x=x, residual=r, apply_fn=f)
        return optax.apply_updates(q, upd), st

    def through_train(q, k, opt=tx):
        return train(f, q, x, y, optimizer=opt, steps=k).losses

    def gd_through_train(q, k):
        return through_train(q, k, gd(0.5))

    def direct(q, k):
        st = tx.init(q)
        for _ in range(k):
            q, st = direct_step(q, st)
        return q

    a, b = steps
    t_train = (time_fn(through_train, p, b, repeats=3)
               - time_fn(through_train, p, a, repeats=3)) / (b - a)
    t_direct = (time_fn(direct, p, b, repeats=3) - time_fn(direct, p, a, repeats=3)) / (b - a)
    t_gd = (time_fn(gd_through_train, p, b, repeats=3)
            - time_fn(gd_through_train, p, a, repeats=3)) / (b - a)
    u = matmul_unit()
    return {"n": n, "width": width, "depth": 2, "steps": list(steps), "ntk_method": "structured",
            "train_step_units": t_train / u, "direct_step_units": t_direct / u,
            "gd_train_step_units": t_gd / u,
            "train_over_direct": t_train / t_direct, "ngd_over_gd_in_train": t_train / t_gd,
            "load_average_1min": os.getloadavg()[0]}


def main(out_dir: str) -> dict:
    quick = os.environ.get("NTKEXP_BENCH_QUICK", "") not in ("", "0")
    res = {
        "matmul_unit_s": matmul_unit(),
        "quick": quick,
        "jacot_fig2_width50": bench_jacot_fig2(50),
        "jacot_fig2_width1000": bench_jacot_fig2(1000, steps=200 if quick else 1000),
        "mlp2048_throughput": bench_throughput(steps=2 if quick else 5),
        "ngd_step": bench_ngd_step(128 if quick else 256),
        "ngd_through_train": bench_ngd_through_train(),
    }
    for k, v in res.items():
        print(k, v, flush=True)
    write_json(out_dir, "training", res)
    return res


if __name__ == "__main__":
    main("benchmarks/results")
