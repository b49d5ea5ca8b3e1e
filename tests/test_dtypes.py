"""Dtype policy: models, empirical NTKs and training follow JAX's type promotion.

float32 parameters applied to float64 inputs compute in float64 (as ``jnp.dot``,
``flax.nnx.Linear(dtype=None)`` and neural-tangents do); before, the inputs (and
``train``'s targets) were cast down to float32 without a word, so the empirical
NTK and the losses came back float32 beside a float64 analytic kernel. Truth: the
same computation with the parameters upcast to float64 by hand (exact), which a
downcast misses by ~1e-7. Needs x64 (skipped without it: no float64 exists).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from ntkexp.empirical import empirical_ntk
from ntkexp.models.cnn import CNNApply, CNNSpec, init_cnn_params
from ntkexp.models.mlp import MLPApply, MLPSpec, init_params
from ntkexp.models.resmlp import ResMLPApply, ResMLPSpec, init_resmlp_params
from ntkexp.models.two_layer import TwoLayerApply, TwoLayerSpec, init_two_layer
from ntkexp.optim import gd
from ntkexp.training import train

pytestmark = pytest.mark.skipif(not jax.config.jax_enable_x64,
                                reason="float64 needs JAX_ENABLE_X64=1")

# float64 rounding only (a float32 downcast gives ~1e-7)
F64 = 1e-12


def _up(p):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)


def _models():
    k = jax.random.key(0)
    return {
        "mlp": (MLPApply(MLPSpec(depth=2, width=16, activation="tanh", b_std=0.2)),
                init_params(MLPSpec(depth=2, width=16, activation="tanh", b_std=0.2), 3, k), 3),
        "cnn": (CNNApply(CNNSpec(depth=1, width=4, image_shape=(4,), filter_size=3, b_std=0.1)),
                init_cnn_params(CNNSpec(depth=1, width=4, image_shape=(4,), filter_size=3,
                                        b_std=0.1), 4, k), 4),
        "resmlp": (ResMLPApply(ResMLPSpec(depth=1, width=8, alpha=0.5, b_std=0.1)),
                   init_resmlp_params(ResMLPSpec(depth=1, width=8, alpha=0.5, b_std=0.1), 3, k),
                   3),
        "two_layer": (TwoLayerApply(TwoLayerSpec(width=16)),
                      init_two_layer(TwoLayerSpec(width=16), 3, k), 3),
    }


MODELS = ["mlp", "cnn", "resmlp", "two_layer"]


@pytest.mark.parametrize("name", MODELS)
def test_float64_inputs_to_a_float32_network_promote(name):
    f, p, d = _models()[name]
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(p))
    x = jax.random.normal(jax.random.key(1), (5, d), jnp.float64)
    out = f(p, x)
    assert out.dtype == jnp.float64
    assert rel_err(out, f(_up(p), x)) < F64
    # float32 inputs stay float32; integer inputs take the parameters' dtype
    assert f(p, x.astype(jnp.float32)).dtype == jnp.float32
    assert f(p, jnp.ones((2, d), jnp.int32)).dtype == jnp.float32


@pytest.mark.parametrize("method", ["structured", "jvp", "jacobian"])
def test_empirical_ntk_is_float64_for_float64_inputs(method):
    f, p, d = _models()["mlp"]
    x = jax.random.normal(jax.random.key(1), (6, d), jnp.float64)
    K = empirical_ntk(f, p, x, method=method)
    assert K.dtype == jnp.float64
    assert rel_err(K, empirical_ntk(f, _up(p), x, method=method)) < F64
    K2 = empirical_ntk(f, p, x[:4], x[4:], method=method, trace_outputs=False)
    assert K2.dtype == jnp.float64


def test_empirical_ntk_generic_model_promotes():
    """A model without structure (CNN) through ``auto``: float64 kernel, float64 accuracy."""
    f, p, d = _models()["cnn"]
    x = jax.random.normal(jax.random.key(1), (4, d), jnp.float64)
    K = empirical_ntk(f, p, x)
    assert K.dtype == jnp.float64
    assert rel_err(K, empirical_ntk(f, _up(p), x)) < F64


def test_mlp_hand_written_pullback_keeps_the_parameter_dtype():
    """``MLPApply.vjp`` under promotion: gradients float32 (as ``jax.vjp`` gives them)."""
    f, p, d = _models()["mlp"]
    x = jax.random.normal(jax.random.key(1), (5, d), jnp.float64)
    out, pull = f.vjp(p, x)
    assert out.dtype == jnp.float64
    ct = jnp.ones_like(out)
    g = pull(ct)
    g_ref = jax.vjp(lambda q: f(q, x), p)[1](ct)[0]
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref), strict=True):
        assert a.dtype == jnp.float32
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("name", ["mlp", "resmlp"])
def test_train_losses_follow_float64_targets(name):
    """``train`` no longer casts float64 targets (or inputs) down to the parameters' dtype."""
    f, p, d = _models()[name]
    x = jax.random.normal(jax.random.key(1), (5, d), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (5, 1), jnp.float64)
    res = train(f, p, x, y, optimizer=gd(0.1), steps=3)
    assert res.losses.dtype == jnp.float64
    u0 = np.asarray(f(_up(p), x), np.float64)
    loss0 = 0.5 * np.mean(np.sum((u0 - np.asarray(y)) ** 2, axis=1))
    assert abs(float(res.losses[0]) - loss0) < F64 * loss0
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(res.params))
    assert float(res.losses[-1]) < float(res.losses[0])
