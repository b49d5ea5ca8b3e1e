"""Activation layers: each registered activation's map vs Gaussian sampling, in any position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkexp as nx
from conftest import needs_x64
from ntkexp.activations import ACTIVATIONS
from ntkexp.layers import Activation, Dense, KernelState, input_state

PARAMS = {"leaky_relu": {"slope": 0.2}, "exp": {"shift": 1.0}}


def _gaussian_state(q1, c, q2, spatial=False):
    """A 1-point vs 1-point Gaussian state with variances q1, q2 and covariance c."""
    if not spatial:
        a = jnp.array
        return KernelState(a([[c]]), a([[1.0]]), a([q1]), a([q2]), (), 1, True)
    # two positions: (q1, c) at position 0 and the same at position 1 (a copy)
    nngp = jnp.array([[[[c, 0.3 * c], [0.3 * c, c]]]])
    cov1 = jnp.array([[[q1, 0.5 * q1], [0.5 * q1, q1]]])
    cov2 = jnp.array([[[q2, 0.5 * q2], [0.5 * q2, q2]]])
    return KernelState(nngp, jnp.ones_like(nngp), cov1, cov2, (2,), 1, True)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS.names()))
def test_dual_maps_match_gaussian_sampling(name):
    q1, c, q2 = 0.8, 0.5, 1.3
    act = Activation(name, PARAMS.get(name, {}))
    out = act.kernel(_gaussian_state(q1, c, q2))
    # independent truth: E[phi(u) phi(v)], E[phi'(u) phi'(v)] over 400k samples
    L = np.linalg.cholesky(np.array([[q1, c], [c, q2]]))
    z = np.random.default_rng(0).normal(size=(400_000, 2)) @ L.T
    u, v = jnp.asarray(z[:, 0]), jnp.asarray(z[:, 1])
    phi, dphi = act.act.fn, act.act.derivative
    for got, s in ((out.nngp[0, 0], np.asarray(phi(u) * phi(v))),
                   (out.ntk[0, 0], np.asarray(dphi(u) * dphi(v)))):
        se = s.std() / np.sqrt(s.size)
        assert abs(float(got) - s.mean()) <= 5 * se + 1e-12, (name, float(got), s.mean(), se)


@pytest.mark.parametrize("name", ["tanh", "relu", "erf"])
@needs_x64  # float64 truth at float64 tolerances
def test_spatial_map_is_the_flat_map_per_position_pair(name):
    """On per-position covariances each (i, j) entry is mapped with its own variances."""
    act = Activation(name)
    sp = act.kernel(_gaussian_state(0.8, 0.5, 1.3, spatial=True))
    for (i, j), c, qa, qb in (((0, 0), 0.5, 0.8, 1.3), ((0, 1), 0.15, 0.8, 1.3)):
        flat = act.kernel(_gaussian_state(qa, c, qb))
        np.testing.assert_allclose(sp.nngp[0, 0, i, j], flat.nngp[0, 0], rtol=1e-10)
        np.testing.assert_allclose(sp.ntk[0, 0, i, j], flat.ntk[0, 0], rtol=1e-10)
    # cov1 entry (0, 1): variances (q1, q1), covariance 0.5 q1
    flat = act.kernel(_gaussian_state(0.8, 0.4, 0.8))
    np.testing.assert_allclose(sp.cov1[0, 0, 1], flat.nngp[0, 0], rtol=1e-10)


def test_non_gaussian_input_is_a_clear_error():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="Gaussian inputs"):
        Activation("relu").kernel(input_state(x))


def test_user_registered_activation_in_any_position(dtype):
    """A user's own activation (no closed form) gets an analytic limit via the Mehler fallback."""
    name = "test_layers_swish"
    if name not in ACTIVATIONS:
        @nx.register_activation(name)
        def _swish():
            return nx.Activation(name, lambda z: z * jax.nn.sigmoid(z))
    from ntkexp.layers import Flatten, composition_kernel, serial
    from ntkexp.models.mlp import MLPSpec

    # one-position signals (n, 1, 3): the generic per-position path (not the MLP fast path)
    net = serial(Dense(8, b_std=0.1), Activation(name), Dense(8, b_std=0.1), Activation(name),
                 Flatten(), Dense(1, b_std=0.1, readout=True))
    x = jax.random.normal(jax.random.key(0), (4, 1, 3), dtype)
    k = composition_kernel(net, x)
    assert k.nngp.dtype == dtype and bool(jnp.all(jnp.isfinite(k.ntk)))
    # independent implementation: the MLP recursion of kernels/analytic.py on flat inputs
    ref = nx.analytic_kernel(MLPSpec(depth=2, width=8, activation=name, b_std=0.1),
                             x.reshape(4, 3))
    rtol = 1e-5 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(k.nngp, ref.nngp, rtol=rtol)
    np.testing.assert_allclose(k.ntk, ref.ntk, rtol=rtol)
