"""Conv and pooling layers: finite forward passes against explicit numpy patches, the
structured empirical NTK against autodiff (jvp), and analytic kernels against Monte
Carlo estimates of wide nets within their stated sampling error.

Independent truths: numpy loops over windows (finite side), ``jax.jvp`` of the
Flax forward pass (structured NTK), the mean over random initialisations of the
empirical NNGP/NTK (``tests/layers/mc.py``: within 5 standard errors plus an
O(1/width) allowance) for the analytic limits. Comparisons against
neural-tangents are in ``test_conv_reference.py``.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mc import assert_within_sampling_error, jnp_inputs, mc_kernels

from conftest import rel_err
from ntkexp.empirical import empirical_ntk
from ntkexp.layers import Activation, Dense, Flatten, Network, composition_kernel, serial
from ntkexp.layers.conv import Conv, conv_stack_of
from ntkexp.layers.pool import AvgPool, GlobalAvgPool


def _np_windows(x, window, strides, padding):
    """``(n, *S_out, prod(window), C)`` explicit windows (lax SAME rule; CIRCULAR wraps)."""
    n, *S, c = x.shape
    pads = []
    for s, q, st in zip(S, window, strides, strict=True):
        if padding == "VALID":
            pads.append((0, 0))
        else:
            out = -(-s // st)
            tot = max((out - 1) * st + q - s, 0)
            pads.append((tot // 2, tot - tot // 2))
    mode = "wrap" if padding == "CIRCULAR" else "constant"
    xp = np.pad(x, [(0, 0)] + pads + [(0, 0)], mode=mode)
    outs = [(sp - q) // st + 1 for sp, q, st in zip(xp.shape[1:-1], window, strides, strict=True)]
    res = np.zeros((n, *outs, int(np.prod(window)), c))
    for pos in itertools.product(*[range(o) for o in outs]):
        for t, delta in enumerate(itertools.product(*[range(q) for q in window])):
            idx = tuple(p * st + d for p, st, d in zip(pos, strides, delta, strict=True))
            res[(slice(None), *pos, t)] = xp[(slice(None), *idx)]
    return res


CONV_CASES = [((7, 2), 3, 2, "SAME"), ((7, 2), 2, 1, "VALID"), ((6, 2), 3, 1, "CIRCULAR"),
              ((5, 4, 2), (3, 2), (2, 1), "SAME"), ((4, 4, 1), 3, 1, "CIRCULAR")]


@pytest.mark.parametrize(("shape", "filt", "strides", "padding"), CONV_CASES)
@pytest.mark.parametrize("param", ["ntk", "standard"])
def test_conv_forward_matches_numpy(shape, filt, strides, padding, param, dtype, tol):
    layer = Conv(3, filt, strides, padding, W_std=1.3, b_std=0.4, parameterization=param)
    x = jax.random.normal(jax.random.key(0), (2, *shape), dtype)
    p = layer.init(jax.random.key(1), shape, dtype)
    y = layer.apply(p, x)
    assert y.shape == (2, *layer.out_shape(shape)) and y.dtype == dtype
    k = len(shape) - 1
    window = layer.filter if isinstance(layer.filter, tuple) else (layer.filter,) * k
    st = layer.strides if isinstance(layer.strides, tuple) else (layer.strides,) * k
    win = _np_windows(np.asarray(x, np.float64), window, st, padding)
    W = np.asarray(p["W"], np.float64).reshape(-1, shape[-1], 3)
    z = np.einsum("n...tc,tco->n...o", win, W)
    fan = W.shape[0] * W.shape[1]
    b = np.asarray(p["b"], np.float64)
    if param == "ntk":
        ref = 1.3 / np.sqrt(fan) * z + 0.4 * b
    else:  # the stored parameters carry the scales
        ref = z + b
        assert abs(np.std(np.asarray(p["W"])) * np.sqrt(fan) / 1.3 - 1) < 0.8
    assert rel_err(y, ref) < tol["exact"]


@pytest.mark.parametrize(("shape", "window", "strides", "padding"),
                         [((7, 2), 2, 2, "VALID"), ((7, 1), 3, 1, "SAME"),
                          ((5, 4, 2), (3, 2), (2, 2), "SAME"), ((4, 4, 1), 3, 1, "CIRCULAR")])
def test_pool_forward_matches_numpy(shape, window, strides, padding, dtype, tol):
    layer = AvgPool(window, strides, padding)
    x = jax.random.normal(jax.random.key(2), (2, *shape), dtype)
    k = len(shape) - 1
    w = layer.window if isinstance(layer.window, tuple) else (layer.window,) * k
    st = layer.strides if isinstance(layer.strides, tuple) else (layer.strides,) * k
    ref = _np_windows(np.asarray(x, np.float64), w, st, padding).mean(axis=-2)
    y = layer.apply({}, x)
    assert y.shape == (2, *layer.out_shape(shape))
    assert rel_err(y, ref) < tol["exact"]
    g = GlobalAvgPool().apply({}, x)
    assert rel_err(g, np.asarray(x, np.float64).reshape(2, -1, shape[-1]).mean(1)) < tol["exact"]


def _cnn(padding="SAME", strides=1, pool=None, readout="gap", b_std=0.2, out=2):
    body = [Conv(8, 3, strides, padding, W_std=1.4, b_std=b_std), Activation("relu")]
    if pool is not None:
        body.append(pool)
    body += [Conv(8, 2, 1, padding, W_std=1.4, b_std=b_std), Activation("erf")]
    return serial(*body, GlobalAvgPool() if readout == "gap" else Flatten(),
                  Dense(out, 1.4, b_std, readout=True))


STRUCT = {"1d_same_gap": ((6, 2), _cnn()),
          "1d_circular_stride_pool_vec": ((8, 2), _cnn("CIRCULAR", 2, AvgPool(2, 1, "SAME"),
                                                       "vec")),
          "2d_valid_gap": ((5, 4, 2), _cnn("VALID", 1, None, "gap", b_std=0.0))}


@pytest.mark.parametrize("name", list(STRUCT))
def test_structured_ntk_equals_jvp(name, dtype, tol):
    shape, layer = STRUCT[name]
    net = Network(layer, shape)
    assert net.structured_available
    p = net.init(jax.random.key(3), dtype)
    x1 = jax.random.normal(jax.random.key(4), (4, *shape), dtype)
    x2 = jax.random.normal(jax.random.key(5), (3, *shape), dtype)
    for a, b in ((x1, x2), (x1, None)):
        s = empirical_ntk(net, p, a, b, method="structured")
        j = empirical_ntk(net, p, a, b, method="jvp")
        assert s.dtype == dtype
        assert rel_err(s, j) < tol["agree"] * 10
    full_s = empirical_ntk(net, p, x1, x2, method="structured", trace_outputs=False)
    full_j = empirical_ntk(net, p, x1, x2, method="jvp", trace_outputs=False)
    assert full_s.shape == (4, 3, 2, 2)
    assert rel_err(full_s, full_j) < tol["agree"] * 10


MC = {
    # strided circular convs, average pooling, flatten readout (generic per-layer maps)
    "circular_stride_pool_vec": ((8, 2), _cnn("CIRCULAR", 2, AvgPool(2, 1, "SAME"), "vec",
                                              out=1)),
    # 2-D VALID convs, GAP readout
    "2d_valid_gap": ((4, 4, 2), _cnn("VALID", out=1)),
    # the fused stride-1 SAME stack (kernels/cnn.py)
    "fused_gap": ((6, 2), serial(Conv(8, 3, W_std=1.4, b_std=0.2), Activation("relu"),
                                 Conv(8, 3, W_std=1.4, b_std=0.2), Activation("relu"),
                                 GlobalAvgPool(), Dense(1, 1.4, 0.2, readout=True))),
}


@pytest.mark.parametrize("name", list(MC))
def test_analytic_matches_monte_carlo(name):
    shape, layer = MC[name]
    x = jnp_inputs(3, shape, seed=7)
    if name == "fused_gap":
        assert conv_stack_of(layer, shape) is not None
    k = composition_kernel(layer, x)
    nngp, ntk = mc_kernels(layer, x, width=128, n_samples=8)
    assert_within_sampling_error(nngp, k.nngp, width=128)
    assert_within_sampling_error(ntk, k.ntk, width=128)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MC))
def test_analytic_matches_monte_carlo_wide(name):
    """Slow twin: width 512, 16 nets (the slack shrinks by ~2x in SE and 4x in bias)."""
    shape, layer = MC[name]
    x = jnp_inputs(3, shape, seed=8)
    k = composition_kernel(layer, x)
    nngp, ntk = mc_kernels(layer, x, width=512, n_samples=16)
    assert_within_sampling_error(nngp, k.nngp, width=512)
    assert_within_sampling_error(ntk, k.ntk, width=512)


def test_bad_inputs():
    with pytest.raises(ValueError, match="padding"):
        Conv(4, 3, 1, "REFLECT")
    with pytest.raises(ValueError, match="filter"):
        Conv(4, 0)
    with pytest.raises(ValueError, match="width"):
        Conv(0)
    with pytest.raises(ValueError, match=r"conv needs inputs \(L, C\)"):
        Conv(4, 3).out_shape((5,))
    with pytest.raises(ValueError, match="does not fit"):
        Conv(4, 5, 1, "VALID").out_shape((3, 2))
    with pytest.raises(ValueError, match="global_avg_pool"):
        GlobalAvgPool().out_shape((4,))
    with pytest.raises(ValueError, match="window"):
        AvgPool(0)
    m = Conv(4, 3).module((5, 2), rngs=nnx.Rngs(0))
    assert m(jnp.ones((2, 5, 2))).shape == (2, 5, 4)
