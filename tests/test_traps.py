"""No silent traps: output reduction of the empirical NTK, NaN inputs, data.dim from the
data set, relative data paths, `list`, reused units, another config's run folder."""

import contextlib
import copy
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import ntkexp as nx
from ntkexp import config as C
from ntkexp.cli import main
from ntkexp.experiments import EXPERIMENTS  # noqa: F401  (registers the config schemas)

BASE = {
    "experiment": "kernel_convergence",
    "model": {"arch": "mlp", "depth": 1, "width": [8], "activation": "relu", "b_std": 0.1},
    "data": {"name": "sphere", "n_train": 4, "dim": 3},
    "train": {"optimizer": "gd", "learning_rate": 0.5, "steps": 1, "inits": 1},
    "params": {"mc_width": 16, "mc_samples": 2, "mc_batch": 2},
}


def _cli(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), \
            jax.numpy_rank_promotion("allow"):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _write(folder, d, name="cfg.yaml"):
    p = folder / name
    p.write_text(yaml.safe_dump(d))
    return str(p)


# ---- empirical_ntk: the output reduction is named, the default is per output ----

def test_empirical_ntk_reductions_and_the_per_output_default_matches_the_limit():
    x = jax.random.normal(jax.random.key(0), (5, 3))
    spec = nx.MLPSpec(depth=1, width=2048, activation="relu", W_std=1.0, b_std=0.1,
                      parameterization="ntk", out_dim=3)
    apply_fn, params = nx.MLPApply(spec), nx.init_params(spec, 3, jax.random.key(1))
    full = nx.empirical_ntk(apply_fn, params, x, outputs="full")
    trace = nx.empirical_ntk(apply_fn, params, x, outputs="trace")
    mean = nx.empirical_ntk(apply_fn, params, x)
    assert full.shape == (5, 5, 3, 3) and trace.shape == mean.shape == (5, 5)
    np.testing.assert_allclose(np.trace(np.asarray(full), axis1=2, axis2=3), trace, rtol=1e-4)
    np.testing.assert_allclose(3 * np.asarray(mean), trace, rtol=1e-5)
    # the older switch still means what it meant
    np.testing.assert_allclose(nx.empirical_ntk(apply_fn, params, x, trace_outputs=True), trace,
                               rtol=1e-6)
    # the default compares with analytic_kernel's per-output NTK (Monte Carlo at width 2048)
    lim = np.asarray(nx.analytic_kernel(spec, x).ntk)
    rel = np.linalg.norm(np.asarray(mean) - lim) / np.linalg.norm(lim)
    assert rel < 0.1, rel
    rel_trace = np.linalg.norm(np.asarray(trace) - lim) / np.linalg.norm(lim)
    assert rel_trace > 1.5  # summing over the 3 outputs is 3x the limit
    with pytest.raises(ValueError, match="unknown outputs reduction"):
        nx.empirical_ntk(apply_fn, params, x, outputs="sum")


def test_nan_inputs_are_named_in_empirical_ntk_and_train():
    spec = nx.MLPSpec(depth=1, width=16, activation="relu", out_dim=1)
    apply_fn, params = nx.MLPApply(spec), nx.init_params(spec, 2, jax.random.key(0))
    x = jnp.ones((4, 2)).at[1, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"x1 holds 1 NaN or inf"):
        nx.empirical_ntk(apply_fn, params, x)
    with pytest.raises(ValueError, match=r"x2 holds 1 NaN or inf"):
        nx.empirical_ntk(apply_fn, params, jnp.ones((3, 2)), x)
    with pytest.raises(ValueError, match=r"train: x holds 1 NaN or inf"):
        nx.train(apply_fn, params, x, jnp.zeros((4, 1)), optimizer=nx.gd(0.1), steps=2)
    with pytest.raises(ValueError, match=r"train: y holds 1 NaN or inf"):
        nx.train(apply_fn, params, jnp.ones((4, 2)), jnp.zeros((4, 1)).at[2].set(jnp.inf),
                 optimizer=nx.gd(0.1), steps=2)


# ---- data: dim follows the data set, relative paths from the config's folder ----

def test_data_dim_follows_the_data_set(tmp_path):
    d = copy.deepcopy(BASE)
    d["data"] = {"name": "digits", "n_train": 8}
    assert C.resolve(d).data.dim == 64
    r = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=r.normal(size=(6, 7)), y_train=r.normal(size=(6, 1)),
             x_test=r.normal(size=(2, 7)), y_test=r.normal(size=(2, 1)))
    d["data"] = {"name": "npz", "n_train": 6, "path": str(tmp_path / "d.npz")}
    assert C.resolve(d).data.dim == 7
    d["data"] = {"name": "gaussian", "n_train": 6}
    assert C.resolve(d).data.dim == 2
    digits = {**BASE, "data": {"name": "digits", "n_train": 8},
              "model": {**BASE["model"], "out_dim": 10}}
    code, out, err = _cli(["validate", _write(tmp_path, digits)])
    assert code == 0, err


def test_relative_data_path_is_read_from_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    r = np.random.default_rng(0)
    np.savez(folder / "d.npz", x_train=r.normal(size=(4, 3)), y_train=r.normal(size=(4, 1)),
             x_test=r.normal(size=(2, 3)), y_test=r.normal(size=(2, 1)))
    d = copy.deepcopy(BASE)
    d["data"] = {"name": "npz", "n_train": 4, "path": "d.npz"}
    path = _write(folder, d)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working folder has no d.npz
    code, out, err = _cli(["validate", path])
    assert code == 0, err
    assert C.load(path).data.path == str(folder / "d.npz")


# ---- the CLI: list, reused units, another config's folder ----

def test_list_shows_layer_kinds_and_a_configs_plugins(tmp_path, monkeypatch):
    code, out, err = _cli(["list"])
    assert code == 0
    kinds = next(line for line in out.splitlines() if line.startswith("layer kinds:"))
    for kind in ("dense", "conv", "residual", "layer_norm", "attention"):
        assert kind in kinds
    plug = tmp_path / "plug"
    plug.mkdir()
    (plug / "h20_list_plugin.py").write_text(
        "from ntkexp.activations import ACTIVATIONS, Activation\n"
        "ACTIVATIONS.register('h20_listed', lambda: Activation('h20_listed', lambda z: z))\n")
    monkeypatch.syspath_prepend(str(plug))
    path = _write(tmp_path, {**BASE, "plugins": ["h20_list_plugin"]})
    code, out, err = _cli(["list", "--config", path])
    assert code == 0, err
    assert "plug-ins of" in out and "h20_list_plugin" in out
    assert any("from plug-ins: h20_listed" in line for line in out.splitlines()), out


def test_run_says_how_many_units_were_reused_and_refuses_another_configs_folder(tmp_path):
    path = _write(tmp_path, BASE)
    out_dir = str(tmp_path / "run")
    code, out, err = _cli(["run", path, "--out", out_dir, "--quiet"])
    assert code == 0, err
    assert "units: 1 computed, 0 reused" in out
    code, out, err = _cli(["run", path, "--out", out_dir, "--quiet"])
    assert code == 0, err
    assert "units: 0 computed, 1 reused" in out
    # more widths: the same config extended, its old unit reused
    code, out, err = _cli(["run", path, "--out", out_dir, "--quiet",
                           "--set", "model.width=[8, 16]"])
    assert code == 0, err
    assert "units: 1 computed, 1 reused" in out
    # another config (a different activation): refused, the folder untouched, unless --force
    before = sorted(os.listdir(os.path.join(out_dir, "units")))
    code, out, err = _cli(["run", path, "--out", out_dir, "--quiet",
                           "--set", "model.activation=tanh"])
    assert code == 2
    assert "holds the results of another config" in err and "model.activation" in err
    assert sorted(os.listdir(os.path.join(out_dir, "units"))) == before
    code, out, err = _cli(["run", path, "--out", out_dir, "--quiet", "--force",
                           "--set", "model.activation=tanh"])
    assert code == 0, err
