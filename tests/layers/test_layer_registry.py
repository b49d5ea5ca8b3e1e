"""YAML layer lists: parsing, defaults, one-line errors naming the key path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkexp as nx
from ntkexp.config import ConfigError, model_from_dict
from ntkexp.layers import Activation, Dense, Parallel, build_layers


def _model(layers, **kw):
    return model_from_dict({"arch": "layers", "width": 16, "layers": layers, **kw},
                           source="cfg.yaml")


def test_list_builds_the_composition_with_model_defaults():
    cfg = _model([{"dense": {}}, "relu", {"leaky_relu": {"slope": 0.2}},
                  {"residual": {"scale": 0.5, "layers": [{"dense": {"width": 7}}, "tanh",
                                                         {"dense": {}}]}},
                  {"dense": {"out": 2}}], b_std=0.1)
    layer = cfg.spec(32).layer
    d0, a1, a2, res, out = layer.layers
    assert d0 == Dense(32, b_std=0.1) and a1 == Activation("relu")
    assert a2 == Activation("leaky_relu", {"slope": 0.2})
    assert isinstance(res, Parallel) and res.scales == (1.0, 0.5)
    assert res.branches[1].layers[0] == Dense(7, b_std=0.1)
    assert out == Dense(2, b_std=0.1, readout=True)  # the readout is not swept


@pytest.mark.parametrize("layers, where, what", [
    ([{"dense": {"widht": 4}}, {"dense": {"out": 1}}], "model.layers[0].dense.widht",
     "did you mean 'width'"),
    ([{"dense": {}}, "rleu", {"dense": {"out": 1}}], "model.layers[1]", "did you mean 'relu'"),
    ([{"dense": {}}, {"residual": {"layers": ["relu", {"dense": {"W_std": -1}}]}},
      {"dense": {"out": 1}}], "model.layers[1].residual.layers[1].dense", "W_std"),
    ([{"dense": {}}, {"tanh": {"x": 1}}, {"dense": {"out": 1}}], "model.layers[1].tanh",
     "bad parameters"),
    ([{"dense": {}, "relu": {}}], "model.layers[0]", "one-key mapping"),
    ([], "model.layers", "empty"),
])
def test_bad_entries_are_one_line_errors_naming_the_key_path(layers, where, what):
    with pytest.raises(ConfigError) as e:
        _model(layers)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cfg.yaml: {where}") and what in msg, msg


def test_cli_reports_a_bad_layer_in_one_line(tmp_path, capsys):
    from ntkexp.cli import main

    p = tmp_path / "c.yaml"
    p.write_text("experiment: kernel_convergence\nmodel:\n  arch: layers\n  width: 8\n"
                 "  layers: [{dense: {}}, relu, {conv: {widht: 3}}]\n")
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers[2]" in err[0], err


def test_analytic_kernel_accepts_the_spec_and_the_composition():
    cfg = _model([{"dense": {}}, "erf", {"dense": {"out": 1}}], b_std=0.2)
    x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    spec = cfg.spec(16)
    k1 = nx.analytic_kernel(spec, x)
    k2 = nx.analytic_kernel(build_layers([{"dense": {"width": 5, "b_std": 0.2}}, "erf",
                                          {"dense": {"out": 1, "b_std": 0.2}}]), x)
    k3 = nx.analytic_kernel(nx.MLPSpec(depth=1, width=5, activation="erf", b_std=0.2), x)
    for k in (k1, k2):
        np.testing.assert_allclose(k.ntk, k3.ntk, rtol=1e-12)
        np.testing.assert_allclose(k.nngp, k3.nngp, rtol=1e-12)
