"""Layer compositions vs neural-tangents 0.6.5 (float64 reference values made outside the project).

The cases and their stax mapping are in ``tests/kernels/data/make_nt_layers.py``;
this file checks the ones built from the core layers (dense, activations,
flatten, layer norm, residual, attention). Cases needing a kind that is not
registered here are skipped (conv/pool are checked by tests/layers/test_conv*).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_x64, rel_err
from ntkexp.layers import LAYERS, build_layers, composition_kernel

DATA = os.path.join(os.path.dirname(__file__), "..", "kernels", "data", "nt_layers.json")
with open(DATA) as f:
    CASES = {c["name"]: c for c in json.load(f)["cases"]}

CORE = ["dense_relu", "dense_erf", "dense_relu_standard", "flatten_on_input", "layernorm_dense",
        "residual_dense", "attention_softmax", "attention_softmax_on_input",
        "attention_identity", "gap_on_input"]


def _kinds(layers):
    for lay in layers:
        if isinstance(lay, str):
            yield lay
        else:
            (name, p), = lay.items()
            yield name
            if name == "residual":
                yield from _kinds(p["branch"])


@pytest.mark.parametrize("name", CORE)
@needs_x64  # float64 truth at float64 tolerances
def test_matches_neural_tangents(name):
    case = CASES[name]
    missing = [k for k in _kinds(case["layers"])
               if k not in LAYERS and k not in ("relu", "erf", "identity")]
    assert not missing, f"reference case uses unregistered layer kinds: {missing}"
    net = build_layers(case["layers"])
    x1 = jnp.asarray(case["x1"], jnp.float64)
    x2 = jnp.asarray(case["x2"], jnp.float64)
    k12 = composition_kernel(net, x1, x2)
    k11 = composition_kernel(net, x1)
    for kind in ("nngp", "ntk"):
        assert rel_err(getattr(k12, kind), np.asarray(case[f"{kind}_x1_x2"])) < 1e-10, kind
        assert rel_err(getattr(k11, kind), np.asarray(case[f"{kind}_x1_x1"])) < 1e-10, kind
