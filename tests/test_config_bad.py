"""Bad configs fail before any work: exit 2 from ``validate`` and from ``run``, one line
naming the key path, nothing written.

Each case mutates a tiny valid config (an MLP, or the same net written as a layer
list) and names the key path the error line must contain. Both commands run the
same check pass (``ntkexp.experiments.checks.preflight``); ``run`` must stop
before training: the run folder does not exist afterwards and the training loop
is never entered (it is replaced by one that fails the test).
"""

import contextlib
import copy
import io
import os
import textwrap

import jax
import numpy as np
import pytest
import yaml

import ntkexp.training
from ntkexp.cli import main

MLP = {
    "experiment": "kernel_convergence",
    "seed": 0,
    "model": {"arch": "mlp", "depth": 1, "width": [8], "activation": "relu", "W_std": 1.0,
              "b_std": 0.1},
    "data": {"name": "sphere", "n_train": 4, "dim": 3, "target": "product"},
    "train": {"optimizer": "gd", "learning_rate": 0.5, "steps": 1, "inits": 1},
    "params": {"mc_width": 16, "mc_samples": 2, "mc_batch": 2},
}
LAYERS = copy.deepcopy(MLP)
LAYERS["model"] = {"arch": "layers", "width": [8], "b_std": 0.1,
                   "layers": [{"dense": {}}, "relu", {"dense": {"out": 1}}]}

PLUGIN = "h20_bad_plugin"
PLUGIN_SRC = textwrap.dedent("""
    import jax.numpy as jnp
    from ntkexp.activations import ACTIVATIONS, Activation

    # integer outputs: rounds and casts
    ACTIVATIONS.register("h20_int", lambda: Activation("h20_int",
                                                       lambda z: jnp.round(z).astype(jnp.int32)))
    # a step function: derivative zero everywhere (an NTK of zero)
    ACTIVATIONS.register("h20_step", lambda: Activation("h20_step",
                                                        lambda z: (z > 0).astype(z.dtype)))
""")


def _set(d, key, value):
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if value is _DROP:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


_DROP = object()


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _good_arrays(n=4, m=2, d=3):
    r = np.random.default_rng(0)
    return dict(x_train=r.normal(size=(n, d)), y_train=r.normal(size=(n, 1)),
                x_test=r.normal(size=(m, d)), y_test=r.normal(size=(m, 1)))


def _nan_arrays():
    a = _good_arrays()
    a["x_train"][1, 2] = np.nan
    return a


def _short_arrays():
    a = _good_arrays()
    a["y_train"] = a["y_train"][:3]
    return a


def _no_test_arrays():
    a = _good_arrays()
    a.pop("y_test")
    return a


# (id, base, {dotted key: value}, fragment the one error line must contain)
# a value "NPZ:<factory>" writes that .npz beside the config and puts its file name
CASES = [
    # top level
    ("unknown_top_key", MLP, {"modle": {}}, "modle"),
    ("missing_experiment", MLP, {"experiment": _DROP}, "experiment"),
    ("unknown_experiment", MLP, {"experiment": "kernel_convergense"}, "experiment"),
    ("bad_dtype", MLP, {"dtype": "float16"}, "dtype"),
    ("bad_device", MLP, {"device": "tpu"}, "device"),
    ("negative_seed", MLP, {"seed": -1}, "seed"),
    ("missing_plugin", MLP, {"plugins": ["h20_no_such_module"]}, "plugins[0]"),
    ("bad_memory_budget", MLP, {"kernels.memory_budget": "lots"}, "kernels.memory_budget"),
    ("distributed_typo", MLP, {"distributed.enabeld": True}, "distributed.enabeld"),
    # model
    ("model_typo", MLP, {"model.widht": 8}, "model.widht"),
    ("unknown_arch", MLP, {"model.arch": "mpl"}, "model.arch"),
    ("unknown_activation", MLP, {"model.activation": "rleu"}, "model.activation"),
    ("zero_width", MLP, {"model.width": [0]}, "model.width"),
    ("negative_depth", MLP, {"model.depth": -1}, "model.depth"),
    ("out_dim_vs_targets", MLP, {"model.out_dim": 3}, "model.out_dim"),
    ("integer_activation", MLP, {"plugins": [PLUGIN], "model.activation": "h20_int"},
     "model.activation"),
    ("zero_derivative_activation", MLP, {"plugins": [PLUGIN], "model.activation": "h20_step"},
     "model.activation"),
    # layer lists
    ("relu_after_relu", LAYERS, {"model.layers": [{"dense": {}}, "relu", "relu",
                                                  {"dense": {"out": 1}}]}, "model.layers[2]"),
    ("relu_before_layer_norm", LAYERS, {"model.layers": [{"dense": {}}, "relu", "layer_norm",
                                                         {"dense": {"out": 1}}]},
     "model.layers[2]"),
    ("residual_branch_activation", LAYERS,
     {"model.layers": [{"dense": {}}, "relu", {"residual": {"layers": ["relu", {"dense": {}}]}},
                       {"dense": {"out": 1}}]}, "model.layers[2]"),
    ("activation_first", LAYERS, {"model.layers": ["tanh", {"dense": {"out": 1}}]},
     "model.layers[0]"),
    ("conv_after_flatten", LAYERS,
     {"model.input_shape": [3, 1],
      "model.layers": [{"conv": {"filter": 3}}, "relu", "flatten", {"conv": {"filter": 3}},
                       {"dense": {"out": 1}}]}, "model.layers[3]"),
    ("conv_on_flat_data", LAYERS, {"model.layers": [{"conv": {"filter": 3}}, "relu", "flatten",
                                                    {"dense": {"out": 1}}]},
     "model.input_shape"),
    ("wrong_input_shape", LAYERS, {"model.input_shape": [2, 2],
                                   "model.layers": [{"conv": {"filter": 3}}, "relu", "flatten",
                                                    {"dense": {"out": 1}}]},
     "model.input_shape"),
    ("no_readout", LAYERS, {"model.layers": [{"dense": {}}, "relu"]}, "model.layers"),
    ("readout_vs_targets", LAYERS, {"model.layers": [{"dense": {}}, "relu",
                                                     {"dense": {"out": 3}}]}, "model.layers"),
    ("spatial_output", LAYERS, {"model.input_shape": [3, 1],
                                "model.layers": [{"conv": {"filter": 3}}, "relu"]},
     "model.layers"),
    ("unknown_layer", LAYERS, {"model.layers": [{"dense": {}}, "rlu", {"dense": {"out": 1}}]},
     "model.layers[1]"),
    ("layer_key_typo", LAYERS, {"model.layers": [{"dense": {"widht": 4}}, "relu",
                                                 {"dense": {"out": 1}}]},
     "model.layers[0].dense.widht"),
    ("empty_layer_list", LAYERS, {"model.layers": []}, "model.layers"),
    # data
    ("unknown_dataset", MLP, {"data.name": "gausian"}, "data.name"),
    ("unknown_target", MLP, {"data.target": "prodcut"}, "data.target"),
    ("zero_n_train", MLP, {"data.n_train": 0}, "data.n_train"),
    ("negative_noise", MLP, {"data.noise": -1.0}, "data.noise"),
    ("circle_in_3d", MLP, {"data.name": "circle"}, "data"),
    ("digits_dim", MLP, {"data.name": "digits", "data.dim": 3}, "data.dim"),
    ("npz_without_path", MLP, {"data.name": "npz", "data.dim": _DROP}, "data.path"),
    ("npz_missing_file", MLP, {"data.name": "npz", "data.path": "absent.npz"}, "data.path"),
    ("npz_missing_array", MLP, {"data.name": "npz", "data.path": "NPZ:_no_test_arrays"},
     "data.path"),
    ("npz_nan", MLP, {"data.name": "npz", "data.path": "NPZ:_nan_arrays"}, "data.path"),
    ("npz_wrong_size", MLP, {"data.name": "npz", "data.dim": 5,
                             "data.path": "NPZ:_good_arrays"}, "data.dim"),
    ("npz_mismatched_rows", MLP, {"data.name": "npz", "data.path": "NPZ:_short_arrays"},
     "data.path"),
    # train
    ("lr_wrong_type", MLP, {"train.learning_rate": "fast"}, "train.learning_rate"),
    ("lr_zero", MLP, {"train.learning_rate": 0}, "train.learning_rate"),
    ("unknown_optimizer", MLP, {"train.optimizer": "adamw"}, "train.optimizer"),
    ("ngd_option_typo", MLP, {"train.optimizer": "ngd", "train.optimizer_options.dampng": 1e-3},
     "train.optimizer_options.dampng"),
    ("gd_takes_no_options", MLP, {"train.optimizer_options.momentum": 0.9},
     "train.optimizer_options.momentum"),
    ("lr_in_options", MLP, {"train.optimizer_options.learning_rate": 0.1},
     "train.optimizer_options.learning_rate"),
    ("ngd_negative_damping", MLP, {"train.optimizer": "ngd",
                                   "train.optimizer_options.damping": -1.0},
     "train.optimizer_options"),
    ("gd_with_batch_size", MLP, {"train.batch_size": 2}, "train.batch_size"),
    ("batch_larger_than_data", MLP, {"train.optimizer": "sgd", "train.batch_size": 100},
     "train.batch_size"),
    ("negative_steps", MLP, {"train.steps": -1}, "train.steps"),
    ("zero_inits", MLP, {"train.inits": 0}, "train.inits"),
    ("bad_loss_reduction", MLP, {"train.loss_reduction": "avg"}, "train.loss_reduction"),
    # the experiment's own section
    ("params_typo", MLP, {"params.mc_widht": 16}, "params.mc_widht"),
    ("params_bad_literal", MLP, {"params.limit": "exact"}, "params.limit"),
    ("params_bad_method", MLP, {"params.method": "finite"}, "params.method"),
]


@pytest.fixture
def plugin_path(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "h20_plugins"
    folder.mkdir(exist_ok=True)
    (folder / f"{PLUGIN}.py").write_text(PLUGIN_SRC)
    monkeypatch.syspath_prepend(str(folder))
    return folder


@pytest.fixture
def no_training(monkeypatch):
    """Training must never start for a bad config."""
    def refuse(*a, **k):
        raise AssertionError("training started for a config the check pass should reject")

    monkeypatch.setattr(ntkexp.training, "train", refuse)


def _write(tmp_path, base, changes):
    d = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, str) and value.startswith("NPZ:"):
            value = os.path.basename(_npz(tmp_path / "d.npz", **globals()[value[4:]]()))
        _set(d, key, value)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def _cli(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), \
            jax.numpy_rank_promotion("allow"):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _assert_one_line(code, out, err, fragment, what):
    lines = err.strip().splitlines()
    assert code == 2, (what, code, out, err)
    assert len(lines) == 1 and lines[0].startswith("ntkexp: error: "), (what, err)
    assert "Traceback" not in out + err
    assert fragment in lines[0], (what, fragment, lines[0])


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,base,changes,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_config_fails_in_validate_and_run(name, base, changes, fragment, tmp_path,
                                              plugin_path, no_training):
    path = _write(tmp_path, base, changes)
    _assert_one_line(*_cli(["validate", path]), fragment, f"validate {name}")
    out = tmp_path / "run"
    _assert_one_line(*_cli(["run", path, "--out", str(out), "--quiet"]), fragment,
                     f"run {name}")
    assert not out.exists(), f"run {name} wrote {sorted(os.listdir(out))}"
    assert sorted(os.listdir(tmp_path)) in (["cfg.yaml"], ["cfg.yaml", "d.npz"])


@pytest.mark.parametrize("argv,fragment", [
    (["--preset", "nope"], "unknown preset"),
    (["--set", "model.width"], "--set"),
    (["--set", "model.depth=-2"], "model.depth"),
])
def test_bad_command_line_fails_in_validate_and_run(argv, fragment, tmp_path, no_training):
    path = _write(tmp_path, MLP, {})
    _assert_one_line(*_cli(["validate", path, *argv]), fragment, "validate")
    out = tmp_path / "run"
    _assert_one_line(*_cli(["run", path, "--out", str(out), "--quiet", *argv]), fragment, "run")
    assert not out.exists()


@pytest.mark.parametrize("text,fragment", [("model: [1, 2\n", "malformed YAML"),
                                           ("- 1\n- 2\n", "top level")])
def test_unreadable_config_fails_in_validate_and_run(text, fragment, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    _assert_one_line(*_cli(["validate", str(path)]), fragment, "validate")
    _assert_one_line(*_cli(["run", str(path), "--out", str(tmp_path / "run")]), fragment, "run")
    assert not (tmp_path / "run").exists()


def test_gpu_asked_without_a_gpu(tmp_path, no_training):
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this machine has a GPU")
    path = _write(tmp_path, MLP, {"device": "gpu"})
    for argv in (["validate", path], ["run", path, "--out", str(tmp_path / "run")]):
        _assert_one_line(*_cli(argv), "device", argv[0])
    assert not (tmp_path / "run").exists()


def test_the_valid_bases_pass_validate(tmp_path):
    """The cases fail because of their change: the unchanged configs are valid."""
    for base in (MLP, LAYERS):
        code, out, err = _cli(["validate", _write(tmp_path, base, {})])
        assert code == 0 and ": ok" in out, (out, err)


def test_sgd_without_batch_size_says_it_is_full_batch(tmp_path):
    code, out, err = _cli(["validate", _write(tmp_path, MLP, {"train.optimizer": "sgd"})])
    assert code == 0, err
    assert "full-batch" in out
