"""End to end: a YAML layer list and the built-in compositions through ``ntkexp run``.

Also the acceptance check that a layer list's empirical NTK converges to its
analytic limit at the rate width^(-1/2): fitted slope in [-0.65, -0.35]
(slow test over widths 128..8192, fast twin over 32..512 with more inits).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import ntkexp as nx
from conftest import rel_err
from ntkexp.layers import build_layers, init_network, with_width

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
LAYERS = [{"dense": {}}, "tanh", {"dense": {}},
          {"residual": {"scale": 0.5, "layers": ["relu", {"dense": {}}]}},
          "softplus", {"dense": {"out": 1}}]


def _run(tmp_path, name, model, preset="tiny", extra=()):
    from ntkexp.cli import main

    with open(os.path.join(ROOT, "configs", f"{name}.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"] = model
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = str(tmp_path / "run")
    with jax.numpy_rank_promotion("allow"):
        assert main(["run", str(p), "--preset", preset, "--out", out, "--quiet", *extra]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_layer_list_runs_kernel_convergence(tmp_path):
    s = _run(tmp_path, "kernel_convergence",
             {"arch": "layers", "width": [32, 128, 512], "b_std": 0.1, "layers": LAYERS})
    assert s["limit"]["method"] == "analytic"
    assert all(np.isfinite(v["error_init"]) for v in s["per_width"].values())


def test_layer_list_runs_jacot_fig1(tmp_path):
    s = _run(tmp_path, "jacot_fig1",
             {"arch": "layers", "width": [32, 256], "layers": LAYERS})
    assert s


def test_resmlp_with_tanh_runs(tmp_path):
    """resmlp with an activation without closed form: analytic limit, no Monte Carlo."""
    s = _run(tmp_path, "kernel_convergence",
             {"arch": "resmlp", "depth": 1, "width": [32, 128], "activation": "tanh",
              "alpha": 0.5, "b_std": 0.1})
    assert s["limit"]["method"] == "analytic"


@pytest.mark.parametrize("act", ["softplus", "test_runs_swish"])
def test_resmlp_analytic_matches_monte_carlo(act):
    """softplus and a user-registered activation: the ResMLP limit vs 8 width-256 nets."""
    from mc import assert_within_sampling_error

    from ntkexp.activations import ACTIVATIONS
    from ntkexp.models.resmlp import ResMLPApply, ResMLPSpec, init_resmlp_params

    if act not in ACTIVATIONS:
        @nx.register_activation(act)
        def _swish():
            return nx.Activation(act, lambda z: z * jax.nn.sigmoid(z))
    spec = ResMLPSpec(depth=1, width=256, alpha=0.5, activation=act, b_std=0.1)
    x = jax.random.normal(jax.random.key(0), (3, 3), jnp.float64)
    k = nx.analytic_kernel(spec, x)
    ntks = np.stack([np.asarray(nx.empirical_ntk(
        ResMLPApply(spec), init_resmlp_params(spec, 3, kk, jnp.float64), x, method="jacobian"))
        for kk in jax.random.split(jax.random.key(1), 8)])
    assert_within_sampling_error(ntks, k.ntk, width=256)


def _slope(widths, inits, n=8, seed=0):
    layer = build_layers(LAYERS, width=1, b_std=0.1)
    x = jax.random.normal(jax.random.key(seed), (n, 3), jnp.float64)
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    limit = nx.analytic_kernel(layer, x).ntk
    errs = []
    for w in widths:
        e = []
        for i in range(inits):
            net, p = init_network(with_width(layer, w), (3,), jax.random.key(1000 * w + i),
                                  jnp.float64)
            e.append(rel_err(nx.empirical_ntk(net, p, x), limit))
        errs.append(np.mean(e))
    return np.polyfit(np.log(widths), np.log(errs), 1)[0]


def test_empirical_ntk_converges_at_rate_half_fast():
    assert -0.65 <= _slope((32, 128, 512), inits=12) <= -0.35


@pytest.mark.slow
def test_empirical_ntk_converges_at_rate_half():
    assert -0.65 <= _slope((128, 512, 2048, 8192), inits=8) <= -0.35
