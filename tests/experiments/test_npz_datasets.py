"""A user's ``.npz`` (x_train, y_train, x_test, y_test) plugs into every data-driven
experiment (issue 6, item 6): each test writes a small synthetic file, runs a config
with ``data.name=npz`` through the CLI in process, and checks that the run used the
file's data (an independent recomputation from the file) and learned something."""

import json
import os

import jax
import numpy as np
import pytest

import ntkexp.experiments.arora2019 as A
import ntkexp.experiments.lee2020 as L
from ntkexp.cli import main
from ntkexp.data import DataError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _config(name):
    return os.path.join(ROOT, "configs", f"{name}.yaml")


@pytest.fixture(autouse=True)
def _allow_bias_broadcast():
    with jax.numpy_rank_promotion("allow"):
        yield


def _blobs(path, *, n_train=60, n_test=60, d=6, k=3, seed=0):
    """k well-separated Gaussian blobs on the unit sphere; integer class ids as y."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, d)))[0][:k]
    n = n_train + n_test
    ids = np.arange(n) % k
    x = centres[ids] + 0.25 * rng.normal(size=(n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.savez(path, x_train=x[:n_train], y_train=ids[:n_train], x_test=x[n_train:],
             y_test=ids[n_train:])
    return x[:n_train], ids[:n_train], x[n_train:], ids[n_train:]


def _regression(path, *, n=16, d=16, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.normal(size=(n, 1))
    np.savez(path, x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])
    return x, y


def _run(cfg, preset, out, overrides):
    args = ["run", _config(cfg), "--preset", preset, "--out", str(out), "--quiet", "--force"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    return (json.load(open(os.path.join(out, "summary.json"))),
            dict(np.load(os.path.join(out, "results.npz"))))


def test_npz_arora(tmp_path):
    f = tmp_path / "blobs.npz"
    xtr, ids, _, _ = _blobs(f)
    s, r = _run("arora2019_finegrained", "tiny", tmp_path / "run", [
        "data.name=npz", f"data.path={f}", "data.dim=6", "data.n_train=60",
        "params.positive_classes=[0]", "model.width=[20, 200]", "train.steps=40",
        "params.random_fractions=[0.0, 1.0]"])
    assert s["n_train"] == 60
    # the spectrum is that of H^inf on the file's inputs
    H = np.asarray(A.gram_inf(np.asarray(xtr, np.float32)))
    np.testing.assert_allclose(r["limit_eigvals"], np.linalg.eigvalsh(H)[::-1], rtol=1e-3,
                               atol=1e-4)
    # the binary labels are class 0 vs the rest of the file's class ids
    y = np.where(ids == 0, 1.0, -1.0)
    np.testing.assert_allclose(r["limit_proj_true"].sum(), np.sum(y**2), rtol=1e-4)
    # separable blobs: true labels are learned, random ones generalise at chance
    err = s["widest"]["test_error"]
    assert err[0] < 0.1 and err[0] < err[1]


def test_npz_lee(tmp_path):
    f = tmp_path / "blobs.npz"
    _, _, _, ids_te = _blobs(f, d=8, k=4)
    s, r = _run("lee2020_finite_vs_infinite", "tiny", tmp_path / "run", [
        "data.name=npz", f"data.path={f}", "data.dim=8", "data.n_train=60",
        "data.n_test=60", "model.width=[64]", "train.inits=1", "train.steps=40"])
    assert s["classes"] == 4 and s["chance"] == pytest.approx(0.25)
    np.testing.assert_array_equal(r["limit_labels"], ids_te)
    assert s["kernels"]["NTK"] > 0.9 and s["kernels"]["NNGP"] > 0.9
    assert s["per_width"]["64"]["ntk+C"]["single"] > 0.75


@pytest.mark.parametrize("name,overrides", [
    ("du2019_fig1", ["model.width=[50, 200]", "train.steps=10"]),
    ("zhang2019_ngd", ["model.width=[64]", "train.steps=4"]),
])
def test_npz_two_layer_experiments(tmp_path, name, overrides):
    f = tmp_path / "reg.npz"
    x, _ = _regression(f)
    s, r = _run(name, "tiny", tmp_path / "run", [
        "data.name=npz", f"data.path={f}", "data.dim=16", "data.n_train=16"] + overrides)
    H = np.asarray(A.gram_inf(np.asarray(x, np.float32)))
    np.testing.assert_allclose(np.sort(r["limit_eigenvalues"]), np.linalg.eigvalsh(H),
                               rtol=1e-3, atol=1e-4)
    loss = np.asarray(r["loss" if "loss" in r else "loss_gd"], np.float64)
    assert np.all(loss[..., -1] < loss[..., 0])


def test_npz_jacot(tmp_path):
    f = tmp_path / "plane.npz"
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 2))
    y = (x[:, 0] * x[:, 1])[:, None]
    np.savez(f, x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])
    s, r = _run("jacot_fig1", "tiny", tmp_path / "run", [
        "data.name=npz", f"data.path={f}", "data.n_train=12", "model.width=[32]",
        "train.inits=1"])
    # the initial loss is that of the file's targets: (1/2n) sum (f0 - y)^2 > 0, and falls
    assert s["per_width"]["32"]["final_loss"] < s["per_width"]["32"]["initial_loss"]


def test_npz_lee_rejects_regression_targets(tmp_path, capsys):
    f = tmp_path / "reg.npz"
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 1))
    np.savez(f, x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(DataError, match="class ids"):
        L.class_targets(y, y)
    # through the CLI: one line on stderr, exit status 2, no traceback
    assert main(["run", _config("lee2020_finite_vs_infinite"), "--preset", "tiny",
                 "--out", str(tmp_path / "run"), "--quiet", "--set", "data.name=npz",
                 "--set", f"data.path={f}", "--set", "data.dim=4"]) == 2
    err = capsys.readouterr().err
    assert "class ids" in err and "Traceback" not in err
