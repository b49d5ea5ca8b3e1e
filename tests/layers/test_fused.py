"""The rule table of ntkexp.layers.fused: each fused map equals the layer-by-layer map.

Truth: :func:`ntkexp.layers.composition_kernel` with ``fused=False`` (every layer's own
kernel map on the KernelState, independent code from kernels/analytic.py and
kernels/cnn.py). Random compositions (seeded draws of depth 0..3, activation, W_std,
b_std, parameterization, filter, readout, 1-D and 2-D inputs, x2 given or None) agree to
1e-13 in float64 (max-abs error over max-abs).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import ntkexp as nx
from conftest import needs_x64, rel_err
from ntkexp.layers import Activation, Dense, composition_kernel, serial
from ntkexp.layers.conv import Conv
from ntkexp.layers.fused import RULES, fused_rule
from ntkexp.layers.pool import GlobalAvgPool
from ntkexp.layers.reshape import Flatten

TOL = 1e-13


def _agree(layer, x1, x2, **options):
    fast = composition_kernel(layer, x1, x2, **options)
    plain = composition_kernel(layer, x1, x2, fused=False)
    for kind in ("nngp", "ntk"):
        a, b = np.asarray(getattr(fast, kind)), np.asarray(getattr(plain, kind))
        assert a.shape == b.shape
        assert rel_err(a, b) < TOL, (kind, rel_err(a, b))
    if x2 is None:
        np.testing.assert_array_equal(np.asarray(fast.ntk), np.asarray(fast.ntk).T)


def _mlp(rng, depth):
    act = rng.choice(["relu", "erf", "leaky_relu", "abs", "gelu"])
    W, b = float(rng.uniform(0.6, 1.6)), float(rng.choice([0.0, rng.uniform(0.05, 0.5)]))
    par = str(rng.choice(["ntk", "standard"]))
    width = int(rng.integers(3, 40))
    ls = []
    for _ in range(depth):
        ls += [Dense(width, W, b, par), Activation(str(act))]
    return serial(*ls, Dense(1, W, b, par, readout=True))


def _conv(rng, depth, k):
    act = str(rng.choice(["relu", "erf", "leaky_relu"]))
    W, b = float(rng.uniform(0.6, 1.6)), float(rng.choice([0.0, rng.uniform(0.05, 0.5)]))
    q = int(rng.choice([1, 2, 3]))
    ls = []
    for _ in range(depth):
        ls += [Conv(4, q, 1, "SAME", W, b, "ntk"), Activation(act)]
    pool = GlobalAvgPool() if rng.random() < 0.5 else Flatten()
    return serial(*ls, pool, Dense(1, W, b, "ntk", readout=True))


@needs_x64
@pytest.mark.parametrize("seed", [0, 1, 2, 3, pytest.param(4, marks=pytest.mark.slow),
                                  pytest.param(5, marks=pytest.mark.slow)])
def test_mlp_rule_equals_layer_map(seed):
    rng = np.random.default_rng(seed)
    depth = seed % 4  # 0, 1, 2, 3, 0, 1
    layer = _mlp(rng, depth)
    d = int(rng.integers(2, 7))
    x1 = jnp.asarray(rng.normal(size=(5, d)))
    x2 = jnp.asarray(rng.normal(size=(3, d)))
    found = fused_rule(layer, (d,))
    assert found is not None and found[0].name == "mlp"
    _agree(layer, x1, None)
    _agree(layer, x1, x2)


@needs_x64
@pytest.mark.parametrize("seed", [0, 1, 2, 3] + [pytest.param(s, marks=pytest.mark.slow)
                                                 for s in range(4, 8)])
def test_conv_stack_rule_equals_layer_map(seed):
    rng = np.random.default_rng(100 + seed)
    depth = seed % 3  # 0, 1, 2
    k = 1 + seed % 2  # 1-D and 2-D
    layer = _conv(rng, depth, k)
    shape = (5, 3) if k == 1 else (3, 4, 2)
    x1 = jnp.asarray(rng.normal(size=(4, *shape)))
    x2 = jnp.asarray(rng.normal(size=(3, *shape)))
    found = fused_rule(layer, shape)
    assert found is not None and found[0].name == "conv_stack"
    _agree(layer, x1, None)
    _agree(layer, x1, x2)
    if found[1]["readout"] == "vec":  # the full pixel-pair recursion, diagonal mean
        _agree(layer, x1, x2, pixel_pairs="all")
    _agree(layer, x1, None, block_entries=7)  # several lax.map blocks


@needs_x64
@pytest.mark.parametrize("readout", ["gap", "vec"])
@pytest.mark.parametrize("image_shape", [(6,), (3, 4)])
@pytest.mark.parametrize("depth", [0, pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(2, marks=pytest.mark.slow)])
def test_cnn_kernel_every_depth_and_readout(depth, readout, image_shape):
    """nx.cnn_kernel (the fused map) = the layer map of spec.layers(), depth 0 included
    (depth 0 + GAP on 2-D images used to raise in kernels/cnn.py::self_variances)."""
    rng = np.random.default_rng(depth)
    spec = nx.CNNSpec(depth=depth, width=3, filter_size=3, W_std=1.2, b_std=0.3,
                      readout=readout, image_shape=image_shape)
    x1 = jnp.asarray(rng.normal(size=(4, *image_shape, 2)))
    x2 = jnp.asarray(rng.normal(size=(2, *image_shape, 2)))
    for b in (None, x2):
        k = nx.cnn_kernel(spec, x1, b)
        ref = composition_kernel(spec.layers(), x1, b, fused=False)
        assert rel_err(k.ntk, ref.ntk) < TOL and rel_err(k.nngp, ref.nngp) < TOL
    assert bool(jnp.all(jnp.isfinite(nx.analytic_kernel(spec, x1).ntk)))


@needs_x64
def test_mlp_spec_goes_through_the_composition():
    """nx.analytic_kernel(MLPSpec) = the composition's layer map of spec.layers()."""
    spec = nx.MLPSpec(depth=2, width=7, activation="erf", W_std=1.3, b_std=0.2,
                      parameterization="standard")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)))
    k = nx.analytic_kernel(spec, x)
    ref = composition_kernel(spec.layers(), x, fused=False)
    assert rel_err(k.ntk, ref.ntk) < TOL and rel_err(k.nngp, ref.nngp) < TOL


def test_no_rule_for_other_compositions():
    """A strided conv, a residual block or mixed activations run layer by layer."""
    names = {r.name for r in RULES}
    assert names == {"mlp", "conv_stack"}
    strided = serial(Conv(4, 3, 2, "SAME"), Activation("relu"), Flatten(), Dense(1))
    mixed = serial(Dense(5), Activation("relu"), Dense(5), Activation("erf"), Dense(1))
    res = serial(Dense(5), nx.layers.residual(Activation("relu"), Dense(5)), Dense(1))
    assert fused_rule(strided, (8, 2)) is None
    assert fused_rule(mixed, (3,)) is None
    assert fused_rule(res, (3,)) is None
    with pytest.raises(TypeError, match="unknown kernel option"):
        composition_kernel(mixed, np.ones((2, 3)), bogus=1)
