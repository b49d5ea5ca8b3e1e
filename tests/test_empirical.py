"""Empirical NTK / NNGP (ntkexp.empirical): exactness, tiling, vmap, limits, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from conftest import needs_x64, rel_err
from ntkexp.empirical import (
    empirical_nngp,
    empirical_ntk,
    generic_costs,
    monte_carlo_kernel,
    structured_flops,
)
from ntkexp.kernels import Kernel
from ntkexp.models.analytic import analytic_kernel
from ntkexp.models.mlp import MLPApply, MLPSpec, functional, init_params

METHODS = ("structured", "jvp", "jacobian", "auto")


def reference_ntk(apply_fn, params, x1, x2, full):
    """Independent truth: full-batch Jacobian of the flattened parameters, in float64."""
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    flat, unravel = ravel_pytree(params)
    x1 = jnp.asarray(x1, jnp.float64)
    x2 = x1 if x2 is None else jnp.asarray(x2, jnp.float64)

    def jac(x):
        j = jax.jacrev(lambda w: apply_fn(unravel(w), x))(flat)  # (n, out, P)
        return np.asarray(j)

    j1, j2 = jac(x1), jac(x2)
    k = np.einsum("iap,jbp->ijab", j1, j2)
    return k if full else np.einsum("ijaa->ij", k)


def _mlp(dtype, key=0, in_dim=3, **kw):
    spec = MLPSpec(**{"depth": 2, "width": 12, **kw})
    params = init_params(spec, in_dim, jax.random.key(key), dtype)
    return MLPApply(spec), params


def _x(n, d, dtype, key=1):
    return jax.random.normal(jax.random.key(key), (n, d), dtype)


MLP_CASES = [
    dict(depth=0, activation="relu", b_std=0.5),
    dict(depth=1, activation="erf", b_std=0.0, out_dim=3),
    dict(depth=2, activation="relu", b_std=0.1, parameterization="standard", W_std=1.4),
    dict(depth=3, activation="tanh", b_std=0.3, out_dim=2),
    dict(depth=2, activation="gelu", b_std=0.0, parameterization="standard", out_dim=2),
    dict(depth=2, activation="leaky_relu", activation_params={"slope": 0.2}, b_std=1.0),
]


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: f"d{c['depth']}-{c['activation']}")
@pytest.mark.parametrize("sym,full", [(True, False), (False, True)],
                         ids=["sym-traced", "x1x2-full"])
def test_methods_agree_with_jacobian_truth_on_mlps(case, full, sym, dtype, tol):
    f, p = _mlp(dtype, **case)
    x1 = _x(6, 3, dtype)
    x2 = None if sym else _x(4, 3, dtype, key=2)
    truth = reference_ntk(f, p, x1, x2, full)
    for m in METHODS:
        k = empirical_ntk(f, p, x1, x2, method=m, trace_outputs=not full)
        assert k.dtype == dtype
        assert k.shape == truth.shape
        assert rel_err(k, truth) <= tol["agree"], m


def test_zero_norm_input_and_large_weights_stay_finite(dtype, tol):
    f, p = _mlp(dtype, depth=2, activation="relu", b_std=0.0, W_std=30.0)
    x = _x(5, 3, dtype).at[2].set(0.0)
    truth = reference_ntk(f, p, x, None, False)
    for m in METHODS:
        k = empirical_ntk(f, p, x, method=m)
        assert np.all(np.isfinite(np.asarray(k)))
        assert rel_err(k, truth) <= tol["agree"]
    g = jax.grad(lambda p: jnp.sum(empirical_ntk(f, p, x, method="structured")))(p)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(g))


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_linear_model_ntk_and_nngp_are_closed_form(parameterization, dtype, tol):
    """depth 0: f = w x.W + beta b is linear in theta, Theta = w^2 x.x' + beta^2 exactly."""
    spec = MLPSpec(depth=0, width=1, W_std=1.3, b_std=0.4, parameterization=parameterization)
    p = init_params(spec, 4, jax.random.key(0), dtype)
    x1, x2 = _x(5, 4, dtype), _x(3, 4, dtype, key=3)
    xx = np.asarray(x1, np.float64) @ np.asarray(x2, np.float64).T
    if parameterization == "ntk":
        ntk = 1.3**2 * xx / 4 + 0.4**2
    else:
        ntk = xx + 1.0
    nngp = 1.3**2 * xx / 4 + 0.4**2
    for m in METHODS:
        assert rel_err(empirical_ntk(MLPApply(spec), p, x1, x2, method=m), ntk) <= tol["exact"]
    assert rel_err(empirical_nngp(MLPApply(spec), p, x1, x2), nngp) <= tol["exact"]
    np.testing.assert_allclose(empirical_nngp(MLPApply(spec), p, x1, x2),
                               analytic_kernel(spec, x1, x2).nngp, rtol=tol["exact"])


class SmallCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(2, 4, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 3, kernel_size=(3, 3), rngs=rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.conv1(x))
        h = jax.nn.relu(self.conv2(h))
        return self.head(jnp.mean(h, axis=(1, 2)))


@pytest.mark.parametrize("full", [False, True], ids=["traced", "full"])
def test_generic_methods_on_flax_cnn(full, dtype, tol):
    model = SmallCNN(nnx.Rngs(0))
    f, p = functional(model)
    p = jax.tree_util.tree_map(lambda a: a.astype(dtype), p)
    x1 = jax.random.normal(jax.random.key(1), (4, 5, 5, 2), dtype)
    x2 = jax.random.normal(jax.random.key(2), (3, 5, 5, 2), dtype)
    for xb in (None, x2):
        truth = reference_ntk(f, p, x1, xb, full)
        for m in ("jvp", "jacobian", "auto"):
            k = empirical_ntk(f, p, x1, xb, method=m, trace_outputs=not full, block_size=3)
            assert rel_err(k, truth) <= tol["agree"], m
    with pytest.raises(ValueError, match="'jvp', 'jacobian'"):
        empirical_ntk(f, p, x1, method="structured")


@pytest.mark.parametrize("method", ["structured", "jvp", "jacobian"])
@pytest.mark.parametrize("full", [False, True], ids=["traced", "full"])
def test_blocked_equals_unblocked_and_symmetry_is_exact(method, full, dtype, tol):
    f, p = _mlp(dtype, depth=2, activation="tanh", b_std=0.2, out_dim=2)
    x1, x2 = _x(7, 3, dtype), _x(5, 3, dtype, key=4)
    for xb in (None, x2):
        ref = empirical_ntk(f, p, x1, xb, method=method, trace_outputs=not full)
        for bs in (3,):
            k = empirical_ntk(f, p, x1, xb, method=method, block_size=bs, trace_outputs=not full)
            assert rel_err(k, ref) <= tol["agree"], bs
            if xb is None:
                kt = np.asarray(k).swapaxes(0, 1)
                if full:
                    kt = kt.swapaxes(2, 3)
                assert np.array_equal(np.asarray(k), kt), bs


@pytest.mark.parametrize("method", ["structured", "jvp", "jacobian"])
def test_vmap_over_parameter_stack_under_jit(method, dtype, tol):
    spec = MLPSpec(depth=2, width=10, activation="relu", b_std=0.1, out_dim=2)
    keys = jax.random.split(jax.random.key(0), 3)
    stack = jax.vmap(lambda k: init_params(spec, 3, k, dtype))(keys)
    x = _x(5, 3, dtype)
    f = MLPApply(spec)
    ks = jax.jit(jax.vmap(lambda p: empirical_ntk(f, p, x, method=method, block_size=2,
                                                           outputs="trace")))(stack)
    assert ks.shape == (3, 5, 5)
    for i in range(3):
        p = jax.tree_util.tree_map(lambda a, i=i: a[i], stack)
        assert rel_err(ks[i], reference_ntk(f, p, x, None, False)) <= tol["agree"]


def test_auto_cost_model_and_flop_count():
    # MLP-like (F = 2P): traced -> Jacobian contraction; full with many outputs -> jvp.
    P = 1e6
    c = generic_costs(2 * P, P, 100, 100, 1, full=False, sym=True)
    assert c["jacobian"] < c["jvp"]
    c = generic_costs(2 * P, P, 100, 100, 10, full=True, sym=True)
    assert c["jvp"] < c["jacobian"]
    # FLOP count against a hand count: depth 1, width 4, d 2, out 1, n 3, x2 of 5.
    spec = MLPSpec(depth=1, width=4)
    fwd = 2 * 8 * (2 * 4 + 4 * 1)
    bwd = 2 * 8 * 4
    gram = 2 * 3 * 5 * (2 + 4) + 2 * 3 * 5 * 4
    assert structured_flops(spec, 2, 3, 5) == fwd + bwd + gram


def test_bad_inputs_give_one_clear_error(dtype):
    f, p = _mlp(dtype, in_dim=3)
    x = _x(4, 3, dtype)
    with pytest.raises(ValueError, match="cannot be applied"):
        empirical_ntk(f, p, _x(4, 5, dtype))
    _, p_other = _mlp(dtype, in_dim=3, depth=3)
    with pytest.raises(ValueError, match="cannot be applied"):
        empirical_ntk(f, p_other, x)
    p_bad = jax.tree_util.tree_map(lambda a: a, p)
    p_bad["layers"][1]["W"] = p_bad["layers"][1]["W"][:, :5]
    with pytest.raises(ValueError, match="cannot be applied"):
        empirical_ntk(f, p_bad, x, method="jvp")
    with pytest.raises(ValueError, match="same input shape"):
        empirical_ntk(f, p, x, _x(4, 2, dtype))
    with pytest.raises(ValueError, match="unknown method"):
        empirical_ntk(f, p, x, method="fast")
    with pytest.raises(ValueError, match="block_size"):
        empirical_ntk(f, p, x, block_size=0)
    with pytest.raises(ValueError, match="'jvp', 'jacobian'"):
        empirical_ntk(lambda q, xx: f(q, xx), p, x, method="structured")
    with pytest.raises(ValueError, match="last hidden layer"):
        empirical_nngp(lambda q, xx: f(q, xx), p, x)
    with pytest.raises(TypeError, match="floating point"):
        empirical_ntk(f, jax.tree_util.tree_map(lambda a: a.astype(jnp.int32), p), x)


@needs_x64
def test_relu_ntk_converges_like_inverse_sqrt_width():
    """Jacot et al. 2018, Thm. 1: fluctuations of the NTK at init are O(width^-1/2).

    float32 only: a statistical rate, not an exactness check.
    """
    spec = MLPSpec(depth=2, width=1, activation="relu", b_std=0.1)
    x = jax.random.normal(jax.random.key(7), (6, 4), jnp.float32)
    truth = np.asarray(analytic_kernel(spec, jnp.asarray(x, jnp.float64)).ntk)
    widths = [64, 256, 1024, 4096]
    seeds = {64: 16, 256: 16, 1024: 8, 4096: 4}
    errs = []
    for w in widths:
        s = spec.replace(width=w)
        f = MLPApply(s)
        stack = jax.vmap(lambda k, s=s: init_params(s, 4, k, jnp.float32))(
            jax.random.split(jax.random.key(w), seeds[w]))
        ks = jax.vmap(lambda p, f=f: empirical_ntk(f, p, x, method="structured"))(stack)
        del stack
        errs.append(np.mean([rel_err(k, truth) for k in np.asarray(ks)]))
    slope = np.polyfit(np.log(widths), np.log(errs), 1)[0]
    assert -0.65 <= slope <= -0.35, (slope, errs)
    assert errs[-1] < 0.05, errs


@needs_x64
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_monte_carlo_kernel_matches_analytic(parameterization):
    """Mean over K inits of the empirical NNGP/NTK -> analytic (per output)."""
    spec = MLPSpec(depth=2, width=1, activation="relu", b_std=0.2, out_dim=2,
                   parameterization=parameterization)
    x = jax.random.normal(jax.random.key(3), (5, 3), jnp.float64)
    mc = monte_carlo_kernel(spec, x, key=jax.random.key(0), n_samples=32, width=256)
    assert isinstance(mc, Kernel) and mc.ntk.shape == (5, 5)
    an = analytic_kernel(spec.replace(width=256), x)
    assert rel_err(mc.nngp, an.nngp) < 0.05
    if parameterization == "ntk":
        assert rel_err(mc.ntk, an.ntk) < 0.05
    else:  # standard param: Theta scales with width (Lee et al. 2020, sec. 2); it is still PSD
        assert np.all(np.linalg.eigvalsh(np.asarray(mc.ntk)) > 0)
    assert np.array_equal(np.asarray(mc.ntk), np.asarray(mc.ntk).T)


@needs_x64
def test_monte_carlo_kernel_with_builder_for_a_generic_model():
    """A builder (key, width) -> (apply_fn, params) without structure: output covariance NNGP."""
    spec = MLPSpec(depth=1, width=1, activation="relu", b_std=0.0)

    def builder(key, width):
        s = spec.replace(width=width)
        f = MLPApply(s)
        return (lambda p, x, f=f: f(p, x)), init_params(s, 2, key, jnp.float64)

    builder_fn = {}

    def stable_builder(key, width):  # same apply_fn object for every key
        f, p = builder(key, width)
        return builder_fn.setdefault(width, f), p

    x = jax.random.normal(jax.random.key(5), (4, 2), jnp.float64)
    mc = monte_carlo_kernel(stable_builder, x, key=jax.random.key(1), n_samples=256, width=256,
                            batch_size=64)
    an = analytic_kernel(spec, x)
    assert rel_err(mc.ntk, an.ntk) < 0.05
    assert rel_err(mc.nngp, an.nngp) < 0.2  # output covariance: O(1/sqrt(K)) noise
