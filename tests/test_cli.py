"""The ntkexp CLI: user errors exit 2 with one line and leave no run folder."""

import os

import jax
import pytest
import yaml

from ntkexp.cli import default_run_dir, main

ROOT = os.path.join(os.path.dirname(__file__), "..")
FIG1 = os.path.join(ROOT, "configs", "jacot_fig1.yaml")


def tiny_dict(**top):
    d = yaml.safe_load(open(FIG1))
    d.update(top)
    return d


def write(tmp_path, data, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def one_line_error(capsys, argv, *fragments):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ntkexp: error: "), err
    assert "Traceback" not in err + out
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


def _bad_width(d):
    d["model"]["width"] = -3
    return d


def _bad_type(d):
    d["model"]["depth"] = "many"
    return d


def _unknown_key(d):
    d["train"]["lerning_rate"] = 0.1
    return d


@pytest.mark.parametrize("content, fragments", [
    ("experiment: jacot_fig1\nmodel: [1, 2\n", ["malformed YAML", "line"]),
    (_unknown_key, ["train.lerning_rate", "did you mean 'learning_rate'"]),
    (_bad_type, ["model.depth", "integer", "'many'"]),
    (_bad_width, ["model.width", ">= 1", "-3"]),
    (lambda d: {**d, "experiment": "jacot_fig3"}, ["experiment", "unknown experiment",
                                                   "jacot_fig1"]),
], ids=["malformed", "unknown-key", "wrong-type", "negative-width", "unknown-experiment"])
def test_bad_config_exit_2_no_run_folder(tmp_path, capsys, content, fragments):
    text = content if isinstance(content, str) else yaml.safe_dump(content(tiny_dict()))
    path = write(tmp_path, text)
    out = tmp_path / "run"
    # no preset: the tiny preset would override the very keys under test
    line = one_line_error(capsys, ["run", path, "--out", str(out)], *fragments)
    assert path in line
    assert not out.exists()
    one_line_error(capsys, ["validate", path], *fragments)


def test_missing_file_and_bad_args(tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, ["run", str(tmp_path / "nope.yaml"), "--out", str(out)],
                   "no such config file")
    assert not out.exists()
    one_line_error(capsys, ["run", FIG1, "--preset", "laptop"], "unknown preset 'laptop'")
    one_line_error(capsys, ["run", FIG1, "--set", "model.width"], "KEY=VALUE")
    one_line_error(capsys, ["frobnicate"], "invalid choice")
    one_line_error(capsys, ["plot", str(tmp_path / "nothing")], "no such run folder")
    os.makedirs(tmp_path / "half")
    one_line_error(capsys, ["plot", str(tmp_path / "half")], "not a finished run")


def test_missing_data_file_leaves_no_folder(tmp_path, capsys):
    d = tiny_dict()
    d["data"] = {"name": "npz", "path": str(tmp_path / "absent.npz"), "dim": 2}
    out = tmp_path / "run"
    one_line_error(capsys, ["run", write(tmp_path, d), "--out", str(out)], "absent.npz")
    assert not out.exists()


def _has_gpu():
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(_has_gpu(), reason="needs a machine without a GPU")
def test_gpu_asked_for_but_absent(tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, ["run", FIG1, "--preset", "tiny", "--set", "device=gpu", "--out",
                            str(out)], "device: gpu", "no GPU")
    assert not out.exists()


def test_validate_and_list(capsys):
    assert main(["validate", FIG1, "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "[32, 256]" in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("jacot_fig1", "jacot_fig2", "mlp", "relu", "gd", "gaussian", "digits", "npz"):
        assert name in out


def test_default_run_dir():
    assert default_run_dir("configs/jacot_fig1.yaml", "cpu") == os.path.join(
        "runs", "jacot_fig1-cpu")
    assert default_run_dir("a/b.yml", None) == os.path.join("runs", "b")


def test_atomic_write_keeps_old_file_on_failure_and_normal_mode(tmp_path):
    from ntkexp import io

    path = str(tmp_path / "x.json")
    io.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert io.read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]      # no temporary left
    assert os.stat(path).st_mode & 0o044            # readable by others, like open()


def _npz(path, n_train=12, n_test=0, dim=2, seed=0):
    import numpy as np

    r = np.random.default_rng(seed)
    np.savez(path, x_train=r.normal(size=(n_train, dim)), y_train=r.integers(0, 2, n_train),
             x_test=r.normal(size=(n_test, dim)), y_test=r.integers(0, 2, n_test))
    return str(path)


def test_unit_hash_follows_npz_contents(tmp_path):
    """A changed .npz at the same path must not reuse units computed from the old one."""
    from ntkexp import config as C
    from ntkexp.experiments.base import make_units, unit_hash

    path = _npz(tmp_path / "d.npz", seed=0)
    d = tiny_dict()
    d["data"] = {"name": "npz", "path": path, "dim": 2}
    cfg = C.resolve(d, preset="tiny")
    u = make_units(cfg)[0]
    h0 = unit_hash(cfg, u)
    _npz(tmp_path / "d.npz", seed=1)
    h1 = unit_hash(cfg, u)
    assert h1 != h0
    _npz(tmp_path / "d.npz", seed=0)  # same contents again: the old units are valid
    assert unit_hash(cfg, u) == h0
    # other datasets: unchanged by the rule
    assert unit_hash(C.resolve(tiny_dict(), preset="tiny"), u) == unit_hash(
        C.resolve(tiny_dict(), preset="tiny"), u)


def test_data_error_inside_an_experiment_leaves_no_new_folder(tmp_path, capsys):
    """lee2020 needs a test set; a .npz without one fails inside compute_unit with a
    user error: exit 2, one line, and the run folder this call created is gone; a
    folder that existed before is left as it was."""
    lee = yaml.safe_load(open(os.path.join(ROOT, "configs", "lee2020_finite_vs_infinite.yaml")))
    lee["data"] = {"name": "npz", "path": _npz(tmp_path / "no_test.npz", dim=3), "dim": 3}
    path = write(tmp_path, lee)
    out = tmp_path / "run"
    one_line_error(capsys, ["run", path, "--preset", "tiny", "--out", str(out), "--quiet"],
                   path, "n_test")
    assert not out.exists()
    kept = tmp_path / "old_run"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    one_line_error(capsys, ["run", path, "--preset", "tiny", "--out", str(kept), "--quiet"],
                   "n_test")
    assert (kept / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(_has_gpu(), reason="needs a machine without a GPU")
def test_gpu_check_without_gpu_is_one_line(tmp_path, capsys):
    out = tmp_path / "gpu"
    one_line_error(capsys, ["gpu-check", "--out", str(out)], "needs a GPU", "cuda12")
    assert not out.exists()
