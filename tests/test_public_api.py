"""The public API contract (README.md, "Python API"), exercised as a user writes it."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ntkexp as nx


def test_design_contract_snippet(dtype):
    d = 3
    x1 = jax.random.normal(jax.random.key(0), (6, d), dtype)
    x2 = jax.random.normal(jax.random.key(1), (4, d), dtype)
    spec = nx.MLPSpec(depth=3, width=512, activation="relu", W_std=1.0, b_std=0.1,
                      parameterization="ntk", out_dim=1)
    k = nx.analytic_kernel(spec, x1, x2=None)
    assert isinstance(k, nx.Kernel) and k.nngp.shape == k.ntk.shape == (6, 6)
    assert k.ntk.dtype == dtype
    # x2 = None means x2 = x1, exactly symmetric
    np.testing.assert_array_equal(np.asarray(k.ntk), np.asarray(k.ntk).T)
    k12 = nx.analytic_kernel(spec, x1, x2)
    assert k12.ntk.shape == (6, 4)

    model = nx.MLP(spec, in_dim=d, rngs=nnx.Rngs(0), dtype=dtype)
    assert isinstance(model, nnx.Module)
    apply_fn, params = nx.functional(model)
    out = apply_fn(params, x1)
    assert out.shape == (6, 1) and out.dtype == dtype
    np.testing.assert_allclose(np.asarray(model(x1)), np.asarray(out), rtol=1e-6, atol=1e-6)
    K = nx.empirical_ntk(apply_fn, params, x1, x2=None, method="auto")
    assert K.shape == (6, 6)
    np.testing.assert_array_equal(np.asarray(K), np.asarray(K).T)
    # Independent truth: the NTK is the Gram matrix of the flattened parameter gradients.
    flat = [jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(
        jax.grad(lambda p, xi=xi: apply_fn(p, xi[None])[0, 0])(params))]) for xi in x1]
    J = jnp.stack(flat)
    rtol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(np.asarray(K), np.asarray(J @ J.T), rtol=rtol, atol=rtol)


def test_lazy_entry_points_resolve():
    assert callable(nx.load_config) and callable(nx.run)
    assert "jacot_fig1" in nx.EXPERIMENTS and "mlp" in nx.ARCHITECTURES
    assert {"gd", "sgd", "ngd"} <= set(nx.OPTIMIZERS)
