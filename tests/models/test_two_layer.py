"""Two-layer ReLU net (Du et al., Arora et al., Zhang et al.): init, frozen output, limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_x64, rel_err
from ntkexp.empirical import empirical_ntk
from ntkexp.models.registry import ARCHITECTURES
from ntkexp.models.two_layer import (
    TwoLayerApply,
    TwoLayerSpec,
    init_two_layer,
    two_layer_kernel,
)


def _sphere(key, n, d, dtype):
    x = jax.random.normal(key, (n, d), dtype)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def _du_gram(x):
    """H_ij = x_i.x_j (pi - arccos x_i.x_j) / (2 pi) in numpy (Du et al. 2019, eq. 3.1)."""
    x = np.asarray(x, np.float64)
    g = x @ x.T
    return g * (np.pi - np.arccos(np.clip(g, -1, 1))) / (2 * np.pi)


def test_init_distribution_and_vmap(dtype):
    spec = TwoLayerSpec(width=20000, kappa=0.5)
    p = init_two_layer(spec, 3, jax.random.key(0), dtype)
    assert p["W"].shape == (3, 20000) and p["W"].dtype == dtype
    assert set(np.unique(np.asarray(p["a"]))) == {-1.0, 1.0}
    assert abs(float(jnp.std(p["W"])) - 0.5) < 0.01
    assert abs(float(jnp.mean(p["a"]))) < 0.03
    keys = jax.random.split(jax.random.key(1), 4)
    stacked = jax.vmap(lambda k: init_two_layer(TwoLayerSpec(16), 3, k, dtype))(keys)
    for i in range(4):
        single = init_two_layer(TwoLayerSpec(16), 3, keys[i], dtype)
        np.testing.assert_array_equal(stacked["W"][i], single["W"])
        np.testing.assert_array_equal(stacked["a"][i], single["a"])


def test_forward_matches_formula_and_output_layer_is_frozen(dtype, tol):
    spec = TwoLayerSpec(width=50)
    p = init_two_layer(spec, 4, jax.random.key(2), dtype)
    x = jax.random.normal(jax.random.key(3), (6, 4), dtype)
    f = TwoLayerApply(spec)
    out = jax.jit(f)(p, x)
    W, a, xn = (np.asarray(v, np.float64) for v in (p["W"], p["a"], x))
    expect = (np.maximum(xn @ W, 0) @ a / np.sqrt(50))[:, None]
    assert out.shape == (6, 1)
    assert rel_err(out, expect) < tol["exact"]
    g = jax.grad(lambda q: jnp.sum(f(q, x) ** 2))(p)
    assert np.all(np.asarray(g["a"]) == 0)
    assert np.any(np.asarray(g["W"]) != 0)


@needs_x64
def test_empirical_ntk_converges_to_du_gram():
    """Empirical NTK (first layer only) -> H^inf at rate 1/sqrt(m), for any kappa."""
    x = _sphere(jax.random.key(4), 10, 5, jnp.float64)
    H = _du_gram(x)
    errs = []
    for m in (256, 4096, 65536):
        spec = TwoLayerSpec(width=m, kappa=0.3)
        p = init_two_layer(spec, 5, jax.random.key(m), jnp.float64)
        K = empirical_ntk(TwoLayerApply(spec), p, x)
        errs.append(rel_err(K, H))
    assert errs[-1] < 0.02
    slope = np.polyfit(np.log([256, 4096, 65536]), np.log(errs), 1)[0]
    assert -0.75 < slope < -0.3


def test_analytic_kernel_vs_monte_carlo_and_edges():
    spec = TwoLayerSpec(width=1, kappa=1.5)
    x = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [2.0, 0.0, 0.0],
                  [0.0, 0.0, 0.0]])
    k = two_layer_kernel(spec, jnp.asarray(x))
    assert np.all(np.isfinite(k.nngp)) and np.all(np.isfinite(k.ntk))
    norms = np.linalg.norm(x, axis=1)
    unit = x / np.maximum(norms, 1e-300)[:, None]
    np.testing.assert_allclose(k.ntk, _du_gram(unit) * np.outer(norms, norms), atol=1e-12)
    # E[relu(w.x) relu(w.x')], w ~ N(0, kappa^2 I): Monte Carlo with 2^19 draws
    w = 1.5 * np.random.default_rng(0).standard_normal((3, 2**19))
    feats = np.maximum(x @ w, 0)
    mc = feats @ feats.T / w.shape[1]
    assert rel_err(k.nngp, mc) < 5e-3
    grads = jax.grad(lambda z: jnp.sum(two_layer_kernel(spec, z).ntk))(jnp.asarray(x))
    assert np.all(np.isfinite(grads))


def test_registered_and_validated():
    arch = ARCHITECTURES.get("two_layer_relu")
    spec = arch.make_spec(width=8, kappa=2)
    apply_fn, params = arch.build(spec, 3, jax.random.key(0))
    assert apply_fn(params, jnp.ones((2, 3))).shape == (2, 1)
    assert hash(apply_fn) == hash(TwoLayerApply(TwoLayerSpec(8, 2.0)))
    with pytest.raises(ValueError, match="width"):
        TwoLayerSpec(width=0)
    with pytest.raises(ValueError, match="kappa"):
        TwoLayerSpec(width=4, kappa=-1.0)
    with pytest.raises(ValueError, match="inputs must have shape"):
        apply_fn(params, jnp.ones((2, 4)))


def test_analytic_ntk_agrees_with_kernels_du_gram(dtype, tol):
    """Independent implementation (general recursion in ntkexp.kernels) on arbitrary norms."""
    from ntkexp.kernels import du_gram

    x = jax.random.normal(jax.random.key(8), (7, 4), dtype)
    x2 = jax.random.normal(jax.random.key(9), (5, 4), dtype)
    spec = TwoLayerSpec(3)
    assert rel_err(two_layer_kernel(spec, x).ntk, du_gram(x)) < 10 * tol["exact"]
    assert rel_err(two_layer_kernel(spec, x, x2).ntk, du_gram(x, x2)) < 10 * tol["exact"]
