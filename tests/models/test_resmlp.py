"""Residual MLP and its analytic residual NTK (Huang et al. 2020)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import needs_x64, rel_err
from ntkexp.empirical import empirical_ntk
from ntkexp.models.analytic import analytic_kernel
from ntkexp.models.mlp import MLPSpec
from ntkexp.models.registry import ARCHITECTURES
from ntkexp.models.resmlp import ResMLP, ResMLPApply, ResMLPSpec, init_resmlp_params, resmlp_kernel


def _x(key, n, d, dtype):
    return jax.random.normal(key, (n, d), dtype)


@pytest.mark.parametrize(("depth", "alpha"), [(0, 1.0), (3, 0.0)])
def test_reduces_to_one_hidden_layer_mlp(depth, alpha, dtype, tol):
    """No blocks, or alpha = 0 (branches inert, their gradients zero): the MLP of depth 1."""
    x1, x2 = _x(jax.random.key(0), 5, 3, dtype), _x(jax.random.key(1), 4, 3, dtype)
    k = resmlp_kernel(ResMLPSpec(depth=depth, width=1, alpha=alpha, W_std=1.3, b_std=0.2), x1, x2)
    km = analytic_kernel(MLPSpec(depth=1, width=1, W_std=1.3, b_std=0.2), x1, x2)
    assert k.ntk.shape == (5, 4) and k.ntk.dtype == dtype
    assert rel_err(k.ntk, km.ntk) < tol["exact"]
    assert rel_err(k.nngp, km.nngp) < tol["exact"]


def test_symmetry_blocks_and_edges(dtype, tol):
    x = _x(jax.random.key(2), 5, 3, dtype)
    x = x.at[1].set(0.0).at[2].set(-x[0]).at[3].set(1e-3 * x[4])
    spec = ResMLPSpec(depth=2, width=1, alpha=0.5, W_std=1.4, b_std=0.1)
    k = resmlp_kernel(spec, x)
    for m in k:
        m = np.asarray(m)
        assert np.all(np.isfinite(m))
        np.testing.assert_array_equal(m, m.T)
    assert rel_err(resmlp_kernel(spec, x[:2], x[2:]).ntk, k.ntk[:2, 2:]) < tol["agree"] * 10
    assert np.linalg.eigvalsh(np.asarray(k.ntk, np.float64)).min() > -1e-5 * np.abs(k.ntk).max()


@needs_x64
def test_variance_grows_as_predicted():
    """relu, W_std^2 = 2, no bias: each block multiplies q(x, x) by (1 + alpha^2) exactly."""
    x = _x(jax.random.key(3), 3, 4, jnp.float64)
    q0 = 2 * np.sum(np.asarray(x) ** 2, axis=1) / 4
    for depth in (0, 1, 3):
        k = resmlp_kernel(ResMLPSpec(depth=depth, width=1, alpha=0.5, W_std=2**0.5), x)
        # readout: nngp = 2 T(q, q, q) = q for relu
        np.testing.assert_allclose(np.diag(k.nngp), q0 * 1.25**depth, rtol=1e-12)


def test_module_and_registry(dtype, tol):
    spec = ResMLPSpec(depth=2, width=8, alpha=0.5, b_std=0.3, out_dim=2)
    model = ResMLP(spec, 3, rngs=nnx.Rngs(0), dtype=dtype)
    x = _x(jax.random.key(4), 4, 3, dtype)
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = model(x)
    assert out.shape == (4, 2) and out.dtype == dtype
    # by hand: the documented forward pass
    def dense(q, a):
        return 1.0 / np.sqrt(q["W"].shape[0]) * a @ np.asarray(q["W"]) + 0.3 * np.asarray(q["b"])
    h = dense(p["inp"], np.asarray(x))
    for b in range(2):
        h = h + 0.5 * dense(p["blocks"][b]["l2"],
                            np.maximum(dense(p["blocks"][b]["l1"], np.maximum(h, 0)), 0))
    assert rel_err(out, dense(p["out"], np.maximum(h, 0))) < tol["exact"]
    arch = ARCHITECTURES.get("resmlp")
    apply_fn, params = arch.build(arch.make_spec(depth=1, width=4), 3, jax.random.key(0))
    assert apply_fn(params, x).shape == (4, 1)
    assert arch.analytic(arch.make_spec(depth=1, width=4), x).ntk.shape == (4, 4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="alpha"):
        ResMLPSpec(depth=1, width=4, alpha=-1.0)
    with pytest.raises(ValueError, match="depth"):
        ResMLPSpec(depth=-1, width=4)
    spec = ResMLPSpec(depth=1, width=4)
    with pytest.raises(ValueError, match="shape"):
        resmlp_kernel(spec, jnp.ones((3, 2, 2)))
    with pytest.raises(ValueError, match="features"):
        resmlp_kernel(spec, jnp.ones((3, 2)), jnp.ones((3, 4)))
    params = init_resmlp_params(spec, 3, jax.random.key(0))
    with pytest.raises(ValueError, match="shape"):
        ResMLPApply(spec)(params, jnp.ones((2, 5)))


SPEC = ResMLPSpec(depth=2, width=1, alpha=0.7, W_std=1.4, b_std=0.2)


@needs_x64
def test_ntk_monte_carlo():
    """Mean empirical NTK over 32 inits at width 256 vs the analytic one: within 5%."""
    x = _x(jax.random.key(5), 4, 3, jnp.float64)
    s = SPEC.replace(width=256)

    def one(k):
        return empirical_ntk(ResMLPApply(s), init_resmlp_params(s, 3, k, jnp.float64), x,
                             method="jacobian")

    K = jnp.mean(jax.lax.map(one, jax.random.split(jax.random.key(0), 32)), axis=0)
    assert rel_err(K, resmlp_kernel(s, x).ntk) < 0.05


@needs_x64
def test_nngp_monte_carlo():
    """Output covariance over 2000 inits at width 32 vs the analytic NNGP within 10%."""
    x = _x(jax.random.key(6), 4, 3, jnp.float64)
    s = SPEC.replace(width=32)

    def out(k):
        return ResMLPApply(s)(init_resmlp_params(s, 3, k, jnp.float64), x)[:, 0]

    f = np.asarray(jax.lax.map(out, jax.random.split(jax.random.key(1), 2000), batch_size=1000))
    assert rel_err(f.T @ f / len(f), resmlp_kernel(s, x).nngp) < 0.1


def _errors(widths, seeds):
    x = _x(jax.random.key(7), 4, 3, jnp.float64)
    k = resmlp_kernel(SPEC, x).ntk
    out = []
    for w in widths:
        s = SPEC.replace(width=w)
        out.append(np.mean([
            rel_err(empirical_ntk(ResMLPApply(s), init_resmlp_params(s, 3, jax.random.key(i),
                                                                     jnp.float64), x), k)
            for i in range(seeds)]))
    return np.array(out)


def test_empirical_converges_fast():
    """Fast check: error falls from width 16 to 256 by more than 2x (1/sqrt(n) predicts 4x)."""
    e = _errors([16, 256], 4)
    assert e[1] < e[0] / 2 and e[1] < 0.35


@pytest.mark.slow
def test_empirical_convergence_rate():
    """Relative Frobenius error vs width: fitted log-log slope in [-0.65, -0.35]."""
    widths = [64, 128, 256, 512, 1024]
    e = _errors(widths, 8)
    slope = np.polyfit(np.log(widths), np.log(e), 1)[0]
    assert -0.65 <= slope <= -0.35, (slope, e)


@needs_x64
@pytest.mark.parametrize("b_std", [0.0, 0.1])
def test_gradients_finite_at_edges(b_std):
    """d(kernel)/dx has no NaN with a zero input and cos = 1 on the diagonal (arccos edge)."""
    x = _x(jax.random.key(8), 3, 4, jnp.float64).at[1].set(0.0)
    spec = ResMLPSpec(depth=2, width=1, alpha=0.5, W_std=1.4, b_std=b_std)
    g = jax.grad(lambda z: jnp.sum(resmlp_kernel(spec, z).ntk))(x)
    assert np.all(np.isfinite(np.asarray(g)))
