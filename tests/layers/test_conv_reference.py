"""Conv / pooling compositions vs neural-tangents 0.6.5 (float64 reference values made outside).

The cases (1-D and 2-D convolutions with filter sizes, strides, SAME / VALID /
CIRCULAR padding, standard parameterization, average and global average
pooling, flatten readouts, layer norm and residual around convolutions, the
depth-3 CNN-GAP) and their stax mapping are in
``tests/kernels/data/make_nt_layers.py``. Error measure: max-abs over max-abs
(``conftest.rel_err``) per entry class:

* entries of pairs at angle 0 (each point with itself, and the collinear pair
  ``x2[0] = x1[0] / 2``): neural-tangents takes ``arccos(c / s)`` there, which
  loses half the digits (``sqrt(eps)``, errors up to 5e-9 seen on its side;
  ntkexp's angle is exact there), so these are checked at 2e-8;
* every other entry at 1e-11 in float64 (measured: 1e-16 .. 1.7e-12, the
  largest on avgpool2d_circular).

float32 runs four of the cases (SAME/VALID/CIRCULAR, pooling, the fused
stack) at 2e-5 (measured up to ~3e-6).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_x64, rel_err
from ntkexp.layers import build_layers, composition_kernel
from ntkexp.layers.conv import conv_stack_of

DATA = os.path.join(os.path.dirname(__file__), "..", "kernels", "data", "nt_layers.json")
with open(DATA) as f:
    CASES = {c["name"]: c for c in json.load(f)["cases"]}

CONV = ["conv1d_same_relu_gap", "conv1d_valid_stride2_flatten", "conv1d_circular_erf_gap",
        "conv1d_same_even_stride2_gap", "conv1d_standard_gap", "conv2d_same_relu_gap",
        "conv2d_valid_stride_flatten", "conv2d_circular_flatten", "avgpool1d_valid",
        "avgpool1d_same_stride1", "avgpool2d_same", "avgpool2d_circular", "gap_on_input",
        "layernorm_conv1d", "residual_conv1d", "cnn_gap_depth3_q5"]
TOL = {jnp.float64: 1e-11, jnp.float32: 2e-5}
EDGE_TOL = 2e-8  # float64, entries at angle 0 (see the module docstring)


def _check(got, ref, edge, dtype):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = np.max(np.abs(ref))
    err = np.abs(got - ref) / scale
    tol = TOL[dtype]
    assert err[~edge].max(initial=0) < tol, err
    assert err[edge].max(initial=0) < max(tol, EDGE_TOL), err


def test_every_conv_case_is_listed():
    """Every reference case using conv or pooling is checked here (core cases elsewhere)."""
    def uses(layers):
        for lay in layers:
            name = lay if isinstance(lay, str) else next(iter(lay))
            if name in ("conv", "avg_pool", "global_avg_pool"):
                return True
            if name == "residual" and uses(lay[name]["branch"]):
                return True
        return False

    want = {n for n, c in CASES.items() if uses(c["layers"]) and not n.startswith("attention")}
    assert want == set(CONV)


F32 = ["conv1d_circular_erf_gap", "conv2d_valid_stride_flatten", "avgpool2d_same",
       "cnn_gap_depth3_q5"]


@pytest.mark.parametrize("name", CONV)
@needs_x64  # float64 truth at float64 tolerances
def test_matches_neural_tangents(name):
    _compare(name, jnp.float64)


@pytest.mark.parametrize("name", F32)
def test_matches_neural_tangents_float32(name):
    """float32 on a subset (each case costs a compile; float64 covers all)."""
    _compare(name, jnp.float32)


def _compare(name, dtype):
    case = CASES[name]
    net = build_layers(case["layers"])
    x1 = jnp.asarray(case["x1"], dtype)
    x2 = jnp.asarray(case["x2"], dtype)
    k12 = composition_kernel(net, x1, x2)
    k11 = composition_kernel(net, x1)
    edge12 = np.zeros((3, 2), bool)
    edge12[0, 0] = True  # x2[0] = x1[0] / 2
    edge11 = np.eye(3, dtype=bool)
    for kind in ("nngp", "ntk"):
        assert getattr(k12, kind).dtype == dtype
        _check(getattr(k12, kind), case[f"{kind}_x1_x2"], edge12, dtype)
        _check(getattr(k11, kind), case[f"{kind}_x1_x1"], edge11, dtype)
    np.testing.assert_array_equal(np.asarray(k11.ntk), np.asarray(k11.ntk).T)


def test_fused_stack_is_recognised():
    """The CNN-GAP case is a plain conv stack (fused kernels/cnn.py map); strided ones are not."""
    net = build_layers(CASES["cnn_gap_depth3_q5"]["layers"])
    hp = conv_stack_of(net, (12, 1))
    assert hp is not None and hp["depth"] == 3 and hp["filter_size"] == 5
    assert hp["readout"] == "gap"
    for other in ("conv1d_valid_stride2_flatten", "conv1d_standard_gap", "avgpool1d_valid",
                  "residual_conv1d"):
        layers = build_layers(CASES[other]["layers"])
        assert conv_stack_of(layers, np.asarray(CASES[other]["x1"]).shape[1:]) is None, other


def test_fused_and_layerwise_maps_agree(dtype, tol):
    """The fused blocked map equals the generic per-layer maps (serial of Conv/act/pool maps)."""
    from ntkexp.kernels.cnn import conv_stack_kernel
    from ntkexp.layers.network import _composition_kernel

    case = CASES["cnn_gap_depth3_q5"]
    net = build_layers(case["layers"])
    x1 = jnp.asarray(case["x1"], dtype)
    x2 = jnp.asarray(case["x2"], dtype)
    hp = conv_stack_of(net, x1.shape[1:])
    for b in (None, x2):
        fused = conv_stack_kernel(x1, b, **hp, block_entries=200)  # several lax.map blocks
        generic = _composition_kernel(net, x1, x1 if b is None else b, b is None)
        assert rel_err(fused.ntk, generic.ntk) < tol["agree"] * 10
        assert rel_err(fused.nngp, generic.nngp) < tol["agree"] * 10
