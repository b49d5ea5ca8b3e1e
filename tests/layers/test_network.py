"""Network (apply_fn of a composition): structured NTK, diagnostics, frozen layers, APIs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkexp as nx
from conftest import needs_x64, rel_err
from ntkexp.empirical import has_structure
from ntkexp.layers import (
    Activation,
    Dense,
    Flatten,
    Network,
    frozen,
    init_network,
    parallel,
    residual,
    serial,
)
from ntkexp.layers.attention import GlobalSelfAttention
from ntkexp.theory import max_weight_distance, pattern_flip_fraction, supports_patterns

NET = serial(Dense(6, b_std=0.2), Activation("tanh"),
             residual(Activation("relu"), Dense(6, b_std=0.1), scale=0.5),
             frozen(Dense(5)), Activation("erf"), Dense(3, b_std=0.3, readout=True))


@pytest.mark.parametrize("trace", [True, False])
def test_structured_ntk_equals_jacobian(dtype, tol, trace):
    x1 = jax.random.normal(jax.random.key(0), (5, 4), dtype)
    x2 = jax.random.normal(jax.random.key(1), (3, 4), dtype)
    net, p = init_network(NET, (4,), jax.random.key(2), dtype)
    assert has_structure(net)
    for a, b in ((x1, None), (x1, x2)):
        s = nx.empirical_ntk(net, p, a, b, method="structured", trace_outputs=trace)
        j = nx.empirical_ntk(net, p, a, b, method="jacobian", trace_outputs=trace)
        assert rel_err(s, j) <= tol["exact"]


def test_spatial_dense_structured_equals_jacobian(dtype, tol):
    """Dense acting per position on (n, P, C) inputs: sum over position pairs."""
    layer = serial(Dense(5, b_std=0.1), Activation("relu"), Flatten(), Dense(2, readout=True))
    x = jax.random.normal(jax.random.key(0), (4, 3, 2), dtype)
    net, p = init_network(layer, (3, 2), jax.random.key(1), dtype)
    s = nx.empirical_ntk(net, p, x, method="structured")
    assert rel_err(s, nx.empirical_ntk(net, p, x, method="jacobian")) <= tol["exact"]


@needs_x64  # float64 truth at float64 tolerances
def test_attention_falls_back_to_generic():
    layer = serial(GlobalSelfAttention(4, n_heads=2, n_chan_key=3, n_chan_val=3), Flatten(),
                   Dense(1, readout=True))
    net, p = init_network(layer, (3, 2), jax.random.key(0), jnp.float64)
    assert not has_structure(net)
    with pytest.raises(ValueError, match="structured"):
        nx.empirical_ntk(net, p, jnp.ones((2, 3, 2)), method="structured")
    x = jax.random.normal(jax.random.key(1), (3, 3, 2), jnp.float64)
    np.testing.assert_allclose(nx.empirical_ntk(net, p, x),
                               nx.empirical_ntk(net, p, x, method="jvp"), rtol=1e-10)


def test_frozen_layer_is_not_trained():
    net, p = init_network(NET, (4,), jax.random.key(0), jnp.float64)
    mask = net.trainable_mask(p)
    assert mask[3] == {"W": False} and mask[0] == {"W": True, "b": True}
    # its gradient is exactly zero (stop_gradient), so it adds nothing to the NTK
    g = jax.grad(lambda q: jnp.sum(net(q, jnp.ones((2, 4)))))(p)
    assert float(jnp.max(jnp.abs(g[3]["W"]))) == 0.0
    x = jax.random.normal(jax.random.key(3), (6, 4), jnp.float64)
    y = jnp.sum(x, axis=1, keepdims=True) * jnp.ones((1, 3))
    res = nx.train(net, p, x, y, optimizer=nx.gd(0.1), steps=3)
    np.testing.assert_array_equal(res.params[3]["W"], p[3]["W"])
    assert not np.array_equal(res.params[0]["W"], p[0]["W"])


def test_pattern_flips_and_weight_distance_through_the_protocol():
    net, p0 = init_network(NET, (4,), jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (8, 4), jnp.float64)
    assert supports_patterns(net)
    pre = net.preactivations(p0, x)
    assert [z.shape for z in pre] == [(8, 6), (8, 6), (8, 5)]
    p1 = jax.tree_util.tree_map(lambda a: a, p0)
    p1[0] = {"W": -p0[0]["W"], "b": -p0[0]["b"]}  # flips every tanh/relu pattern of layer 0
    f = float(pattern_flip_fraction(net, p1, p0, x))
    assert 6 / 17 <= f <= 1.0  # the first layer's 6 of 17 units flip at every point
    d = float(max_weight_distance(net, p1, p0))
    np.testing.assert_allclose(d, float(jnp.max(2 * jnp.linalg.norm(p0[0]["W"].T, axis=1))))


def test_parallel_rejects_correlated_branches():
    with pytest.raises(ValueError, match="correlated"):
        parallel(serial(), serial(Activation("relu")))


def test_network_errors():
    with pytest.raises(ValueError, match="flat"):
        Network(serial(Dense(3)), (4, 2))
    net, p = init_network(NET, (4,), jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        net(p, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="Gaussian"):
        nx.analytic_kernel(serial(Activation("relu"), Dense(1, readout=True)), jnp.ones((2, 3)))


@needs_x64  # float64 truth at float64 tolerances
def test_monte_carlo_kernel_on_a_composition():
    """nx.monte_carlo_kernel takes a composition (widths replaced) and agrees with jacobian MC."""
    layer = serial(Dense(4, b_std=0.1), Activation("tanh"), Dense(1, readout=True))
    x = jax.random.normal(jax.random.key(0), (3, 2), jnp.float64)
    k = nx.monte_carlo_kernel(layer, x, key=jax.random.key(1), n_samples=4, width=64)
    from ntkexp.layers import with_width

    net = Network(with_width(layer, 64), (2,))
    keys = jax.random.split(jax.random.key(1), 4)
    ref = np.mean([np.asarray(nx.empirical_ntk(net, net.init(kk, jnp.float64), x,
                                                method="jacobian")) for kk in keys], axis=0)
    np.testing.assert_allclose(k.ntk, ref, rtol=1e-10)
