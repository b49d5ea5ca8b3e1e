"""MLP module, functional form, parameterizations and layer structure (ntkexp.models.mlp)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import needs_x64, rel_err
from ntkexp.models.mlp import MLP, MLPApply, MLPSpec, functional, init_params


@needs_x64
def test_init_statistics_match_the_parameterization():
    """NTK param stores N(0,1); standard stores N(0, W_std^2/n_in) and N(0, b_std^2)."""
    base = dict(depth=1, width=512, W_std=1.5, b_std=0.3)
    p_ntk = init_params(MLPSpec(**base), 512, jax.random.key(0), jnp.float64)
    p_std = init_params(MLPSpec(**base, parameterization="standard"), 512, jax.random.key(0),
                        jnp.float64)
    W = np.asarray(p_ntk["layers"][0]["W"])  # 512 x 512 = 262144 draws
    se = math.sqrt(2 / W.size)
    assert abs(W.mean()) < 5 / math.sqrt(W.size)
    assert abs(W.var() - 1.0) < 5 * se
    Ws = np.asarray(p_std["layers"][0]["W"])
    assert abs(Ws.var() / (1.5**2 / 512) - 1.0) < 5 * se
    b = np.concatenate([np.asarray(p_std["layers"][0]["b"])] * 1)
    assert abs(b.var() / 0.3**2 - 1.0) < 5 * math.sqrt(2 / b.size)
    assert "b" not in init_params(MLPSpec(depth=1, width=4), 3, jax.random.key(0))["layers"][0]


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_ntk_and_standard_parameterizations_give_the_same_function(activation, dtype, tol):
    """Same underlying N(0,1) draw -> the same network function at initialisation."""
    base = dict(depth=3, width=16, activation=activation, W_std=1.3, b_std=0.2, out_dim=2)
    s_ntk, s_std = MLPSpec(**base), MLPSpec(**base, parameterization="standard")
    p_ntk = init_params(s_ntk, 5, jax.random.key(3), dtype)
    p_std = init_params(s_std, 5, jax.random.key(3), dtype)
    for h, layer in p_ntk["layers"].items():  # the draw is shared, scaled at init
        fan_in = layer["W"].shape[0]
        np.testing.assert_allclose(p_std["layers"][h]["W"], layer["W"] * 1.3 / math.sqrt(fan_in),
                                   rtol=tol["exact"])
        np.testing.assert_allclose(p_std["layers"][h]["b"], layer["b"] * 0.2, rtol=tol["exact"])
    x = jax.random.normal(jax.random.key(1), (7, 5), dtype)
    assert rel_err(MLPApply(s_std)(p_std, x), MLPApply(s_ntk)(p_ntk, x)) <= tol["agree"]


def test_functional_equals_module_call(dtype, tol):
    spec = MLPSpec(depth=2, width=8, activation="erf", b_std=0.5, out_dim=3)
    model = MLP(spec, in_dim=4, rngs=nnx.Rngs(0), dtype=dtype)
    f, p = functional(model)
    assert isinstance(f, MLPApply)
    x = jax.random.normal(jax.random.key(1), (5, 4), dtype)
    np.testing.assert_array_equal(np.asarray(f(p, x)), np.asarray(model(x)))
    # and the module equals a hand-written forward pass (NTK parameterization)
    a = np.asarray(x, np.float64)
    for h in range(3):
        W = np.asarray(p["layers"][h]["W"], np.float64)
        b = np.asarray(p["layers"][h]["b"], np.float64)
        z = a @ W / math.sqrt(W.shape[0]) + 0.5 * b
        a = np.asarray(jax.scipy.special.erf(z)) if h < 2 else z
    assert rel_err(model(x), a) <= tol["exact"]


def test_structure_factorises_the_parameter_gradients(dtype, tol):
    """df/dW^(h) = w_mult a^(h) b^(h)^T and df/db^(h) = b_mult b^(h) (chain rule)."""
    spec = MLPSpec(depth=2, width=6, activation="tanh", b_std=0.4, out_dim=2,
                   parameterization="standard")
    f = MLPApply(spec)
    p = init_params(spec, 3, jax.random.key(0), dtype)
    x = jax.random.normal(jax.random.key(1), (4, 3), dtype)
    st = f.structure(p, x)
    np.testing.assert_allclose(st.out, f(p, x), rtol=tol["exact"])
    J = jax.vmap(jax.jacrev(lambda q, xi: f(q, xi[None])[0]), in_axes=(None, 0))(p, x)
    for h in range(spec.depth + 1):
        back = st.backward[h] if h < spec.depth else jnp.broadcast_to(
            jnp.eye(2, dtype=dtype)[None], (4, 2, 2))
        dW = st.w_mults[h] * jnp.einsum("ni,naj->naij", st.inputs[h], back)
        assert rel_err(dW, J["layers"][h]["W"]) <= tol["agree"]
        assert rel_err(st.b_mults[h] * back, J["layers"][h]["b"]) <= tol["agree"]


@pytest.mark.parametrize("spec", [
    MLPSpec(depth=3, width=7, activation="erf", b_std=0.2, out_dim=3),
    MLPSpec(depth=2, width=5, activation="tanh", b_std=0.5, parameterization="standard"),
    MLPSpec(depth=1, width=6, activation="relu"),  # no bias
    MLPSpec(depth=0, width=4, b_std=1.0),  # linear model
])
@pytest.mark.parametrize("in_dim, n", [(2, 5), (6, 5), (6, 130)])  # the three weight-grad forms
def test_hand_written_vjp_equals_autodiff(spec, in_dim, n, dtype, tol):
    """MLPApply.vjp (training's backward pass) against jax.vjp, also under vmap over params."""
    f = MLPApply(spec)
    keys = jax.random.split(jax.random.key(0), 3)
    ps = jax.vmap(lambda k: init_params(spec, in_dim, k, dtype))(keys)
    x = jax.random.normal(jax.random.key(1), (n, in_dim), dtype)
    ct = jax.random.normal(jax.random.key(2), (n, spec.out_dim), dtype)

    def ours(p):
        out, pull = f.vjp(p, x)
        return out, pull(ct)

    def ref(p):
        out, pull = jax.vjp(lambda q: f(q, x), p)
        return out, pull(ct)[0]

    a, b = jax.jit(jax.vmap(ours))(ps), jax.vmap(ref)(ps)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert u.dtype == v.dtype and rel_err(u, v) <= tol["agree"]
    with pytest.raises(ValueError, match="inputs must have shape"):
        f.vjp(jax.tree_util.tree_map(lambda l: l[0], ps), x[:, :1])


@pytest.mark.parametrize("bad", [
    dict(depth=-1), dict(width=0), dict(depth=1.5), dict(activation="nope"),
    dict(W_std=-1.0), dict(b_std=float("nan")), dict(parameterization="mupp"), dict(out_dim=0),
    dict(parameterization="mean_field"),
])
def test_bad_specs_raise_one_clear_error(bad):
    kw = {"depth": 2, "width": 4, **bad}
    with pytest.raises((ValueError, KeyError)) as e:
        MLPSpec(**kw)
    assert len(str(e.value).splitlines()) == 1


def test_bad_module_arguments_and_shapes():
    with pytest.raises(ValueError, match="in_dim"):
        MLP(MLPSpec(depth=1, width=4), in_dim=0, rngs=nnx.Rngs(0))
    f, p = functional(MLP(MLPSpec(depth=1, width=4), in_dim=3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="shape"):
        f(p, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="dense layers"):
        MLPApply(MLPSpec(depth=2, width=4))(p, jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="nnx.Module"):
        functional(lambda x: x)
