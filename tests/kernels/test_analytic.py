"""Properties of analytic_kernel: symmetry, PSD, blocking, homogeneity, Monte Carlo, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import needs_x64
from ntkexp.empirical import empirical_ntk
from ntkexp.models.analytic import analytic_kernel
from ntkexp.models.mlp import MLPApply, MLPSpec, init_params

ACTS = ["relu", "erf", "leaky_relu", "gelu", "abs"]


def _x(seed, n, d, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (n, d), dtype)


@needs_x64
@pytest.mark.slow
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), act=st.sampled_from(ACTS), depth=st.integers(1, 3),
       b=st.sampled_from([0.0, 0.3]), n=st.integers(3, 9))
def test_symmetric_psd_and_slices(seed, act, depth, b, n):
    _check_symmetric_psd_and_slices(seed, act, depth, b, n)


@needs_x64
@pytest.mark.parametrize(("seed", "act", "depth", "b", "n"),
                         [(0, "relu", 2, 0.3, 5), (1, "erf", 1, 0.0, 4)])
def test_symmetric_psd_and_slices_fast(seed, act, depth, b, n):
    """The fast twin of the property test above: two fixed draws."""
    _check_symmetric_psd_and_slices(seed, act, depth, b, n)


def _check_symmetric_psd_and_slices(seed, act, depth, b, n):
    spec = MLPSpec(depth=depth, width=1, activation=act, W_std=1.4, b_std=b)
    x = _x(seed, n, 3)
    k = analytic_kernel(spec, x)
    for m in k:
        m = np.asarray(m)
        assert np.array_equal(m, m.T)
        ev = np.linalg.eigvalsh(m)
        assert ev.min() >= -1e-10 * ev.max()
    # a block of K(x1, x2) is the slice of K on the concatenation
    k12 = analytic_kernel(spec, x[:2], x[2:])
    np.testing.assert_allclose(np.asarray(k12.ntk), np.asarray(k.ntk)[:2, 2:], rtol=1e-12,
                               atol=1e-14)
    # blocked == unblocked (tiles of 2, padding included)
    kb = analytic_kernel(spec, x, block_size=2)
    np.testing.assert_allclose(np.asarray(kb.ntk), np.asarray(k.ntk), rtol=1e-12, atol=1e-14)
    assert np.array_equal(np.asarray(kb.ntk), np.asarray(kb.ntk).T)
    kb12 = analytic_kernel(spec, x[:5], x, block_size=2)
    np.testing.assert_allclose(np.asarray(kb12.nngp), np.asarray(k.nngp)[:5], rtol=1e-12,
                               atol=1e-14)


@needs_x64
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), a=st.floats(0.1, 10.0), b=st.floats(0.1, 10.0),
       depth=st.integers(1, 4))
def test_relu_positive_homogeneity(seed, a, b, depth):
    spec = MLPSpec(depth=depth, width=1, activation="relu", W_std=1.3, b_std=0.0)
    x = _x(seed, 2, 4)
    k = analytic_kernel(spec, x[:1], x[1:])
    ks = analytic_kernel(spec, a * x[:1], b * x[1:])
    for m, ms in zip(k, ks, strict=True):
        np.testing.assert_allclose(float(ms[0, 0]), a * b * float(m[0, 0]), rtol=1e-12)


@needs_x64
def test_monte_carlo_nngp_clt_rate():
    # depth 1: hidden pre-activations are exactly Gaussian, so the mean empirical
    # NNGP is unbiased and its error must shrink like K^(-1/2).
    spec = MLPSpec(depth=1, width=64, activation="erf", W_std=1.5, b_std=0.2)
    x = _x(0, 5, 3)
    ref = np.asarray(analytic_kernel(spec, x).nngp)
    app = MLPApply(spec)

    def emp(key):
        p = init_params(spec, 3, key, jnp.float64)
        a = app.forward(p, x)[1][-1]
        return spec.W_std**2 / spec.width * a @ a.T + spec.b_std**2

    keys = jax.random.split(jax.random.key(7), 4096)
    samples = np.asarray(jax.lax.map(emp, keys))
    errs = {}
    for K in (64, 1024):
        e = [np.linalg.norm(samples[i:i + K].mean(0) - ref) for i in range(0, 4096, K)]
        errs[K] = np.sqrt(np.mean(np.square(e)))
    ratio = errs[64] / errs[1024]  # CLT: sqrt(1024 / 64) = 4
    assert 2.5 < ratio < 6.5, errs


@needs_x64
@pytest.mark.slow
def test_standard_parameterization_ntk_is_expected_empirical_ntk():
    # depth 1: E over initialisations of the empirical NTK is exactly the formula
    # (independent W and v); compare within Monte Carlo standard errors.
    _check_standard_ntk_is_expected_empirical_ntk(width=32, n=4, inits=300)


@needs_x64
def test_standard_parameterization_ntk_is_expected_empirical_ntk_fast():
    """The fast twin: the same property at width 16, 3 points, 64 initialisations."""
    _check_standard_ntk_is_expected_empirical_ntk(width=16, n=3, inits=64)


def _check_standard_ntk_is_expected_empirical_ntk(width, n, inits):
    spec = MLPSpec(depth=1, width=width, activation="relu", W_std=1.2, b_std=0.5,
                   parameterization="standard")
    x = _x(3, n, 3)
    ref = np.asarray(analytic_kernel(spec, x).ntk)
    app = MLPApply(spec)
    keys = jax.random.split(jax.random.key(11), inits)
    params = jax.vmap(lambda k: init_params(spec, 3, k, jnp.float64))(keys)
    ks = np.asarray(jax.vmap(lambda p: empirical_ntk(app, p, x, method="jacobian"))(params))
    mean, se = ks.mean(0), ks.std(0) / np.sqrt(len(ks))
    assert np.all(np.abs(mean - ref) < 5 * se + 1e-9)
    # ... and the NNGP is the NTK-parameterization one
    ntk_spec = spec.replace(parameterization="ntk")
    np.testing.assert_allclose(np.asarray(analytic_kernel(spec, x).nngp),
                               np.asarray(analytic_kernel(ntk_spec, x).nngp), rtol=1e-14)


@pytest.mark.parametrize("act", ["relu", "erf", "tanh", "identity"])
def test_edges_no_nan_values_or_gradients(act, dtype):
    spec = MLPSpec(depth=1, width=1, activation=act, W_std=100.0 if act != "tanh" else 3.0,
                   b_std=0.0)
    v = jnp.asarray([0.3, -1.2, 0.8], dtype)
    x = jnp.stack([v, 2.5 * v, -0.7 * v, jnp.zeros(3, dtype), jnp.asarray([0, 0, 1e-3], dtype)])

    def f(x):
        k = analytic_kernel(spec, x)
        return jnp.sum(k.ntk) + jnp.sum(k.nngp)

    k = analytic_kernel(spec, x)
    assert all(bool(jnp.all(jnp.isfinite(m))) for m in k)
    g = jax.grad(f)(x)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_dtype_follows_inputs(dtype):
    spec = MLPSpec(depth=2, width=1, activation="relu")
    k = analytic_kernel(spec, _x(0, 3, 2, dtype))
    assert k.ntk.dtype == dtype


def test_bad_inputs():
    spec = MLPSpec(depth=2, width=1)
    x = np.ones((3, 2))
    with pytest.raises(ValueError, match="same input dimension"):
        analytic_kernel(spec, x, np.ones((3, 4)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        analytic_kernel(spec, np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        analytic_kernel(spec, np.ones(3))
    with pytest.raises(TypeError, match="MLPSpec"):
        analytic_kernel("relu", x)
    with pytest.raises(ValueError, match="block_size"):
        analytic_kernel(spec, x, block_size=0)
    with pytest.raises(KeyError, match="known:"):
        MLPSpec(depth=1, width=1, activation="rleu")
    with pytest.raises(ValueError, match="depth"):
        MLPSpec(depth=-1, width=1)
    with pytest.raises(ValueError, match="width"):
        MLPSpec(depth=1, width=0)
    with pytest.raises(ValueError, match="parameterization"):
        MLPSpec(depth=1, width=1, parameterization="mu_p")
