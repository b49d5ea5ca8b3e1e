"""A failure inside a run that is not a user error: one line, exit 1, a resumable folder.

A plug-in experiment registered here raises (``NotImplementedError`` in a chosen
unit, or ``RuntimeError`` in ``summarize``); the CLI must report it in one line
without a traceback, exit with status 1, say that the run folder can be resumed,
keep the finished units, and leave no ``meta.json`` / ``summary.json`` beside
numbers they do not describe. Before, the exception escaped ``main`` as a
traceback after all the work was done.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import yaml

from ntkexp.cli import main
from ntkexp.experiments import EXPERIMENTS, Experiment, register_experiment

ROOT = os.path.join(os.path.dirname(__file__), "..")
NAME = "h14_failing"
FAIL = {"width": None, "summary": False}


@dataclasses.dataclass(frozen=True)
class _Params:
    scale: float = 1.0


def _compute(cfg, data, unit, progress):  # per_init: unit is one initialisation
    if unit.width == FAIL["width"]:
        raise NotImplementedError(f"width {unit.width} is not\nimplemented")
    progress(1)
    return {"value": np.asarray([unit.width * cfg.params.scale, unit.init], np.float64)}


def _summarize(cfg, results):
    if FAIL["summary"]:
        raise RuntimeError("summary broke")
    return {"total": float(np.sum(results["value"]))}, [{"n": 1}]


@pytest.fixture
def failing_experiment():
    register_experiment(Experiment(
        name=NAME, params=_Params, compute_unit=_compute, reference=lambda cfg, data: {},
        summarize=_summarize, plot=lambda results, summary, cfg, fig_dir: [],
        unit_work=lambda cfg: 1, main_figure=NAME, per_init=True))
    FAIL.update(width=None, summary=False)
    yield
    EXPERIMENTS.unregister(NAME)


def _config(tmp_path, widths=(4, 8, 16), scale=1.0):
    d = yaml.safe_load(open(os.path.join(ROOT, "configs", "kernel_convergence.yaml")))
    d.pop("presets")
    d["experiment"] = NAME
    d["model"]["width"] = list(widths)
    d["data"].update(n_train=4)
    d["train"].update(steps=1, inits=1)
    d["params"] = {"scale": scale}
    p = tmp_path / f"cfg_{scale}.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def _run(capsys, path, out, *extra):
    code = main(["run", path, "--out", str(out), "--quiet", *extra])
    o, err = capsys.readouterr()
    return code, o, err


def _units(out):
    folder = out / "units"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def _one_line(err, out_text, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ntkexp: error: "), err
    assert "Traceback" not in err + out_text
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_exception_in_a_unit_is_one_line_and_the_run_resumes(tmp_path, capsys,
                                                             failing_experiment):
    path, out = _config(tmp_path), tmp_path / "run"
    FAIL["width"] = 16  # the first two units finish, the third raises
    code, o, err = _run(capsys, path, out)
    assert code == 1
    _one_line(err, o, "NotImplementedError", "width 16 is not implemented", "can be resumed",
              str(out), "2 finished unit(s)")
    assert len(_units(out)) == 2
    assert not (out / "meta.json").exists() and not (out / "summary.json").exists()
    # fixed: the rerun reuses the two finished units and completes
    FAIL["width"] = None
    code, o, err = _run(capsys, path, out)
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["units_reused"] == 2 and meta["units_computed"] == 1
    assert json.loads((out / "summary.json").read_text())["total"] == 4 + 8 + 16


def test_failed_rerun_leaves_no_old_headline_numbers(tmp_path, capsys, failing_experiment):
    """A complete run, then a rerun with a new config that fails in ``summarize``:
    the old meta.json / summary.json must not stay beside the new units."""
    out = tmp_path / "run"
    assert _run(capsys, _config(tmp_path, scale=1.0), out)[0] == 0
    assert (out / "summary.json").exists() and (out / "meta.json").exists()
    FAIL["summary"] = True
    code, o, err = _run(capsys, _config(tmp_path, scale=2.0), out)
    assert code == 2  # another config's folder: refused unless --force
    _one_line(err, o, "holds the results of another config", "params.scale", "--force")
    assert (out / "summary.json").exists() and (out / "meta.json").exists()  # untouched
    code, o, err = _run(capsys, _config(tmp_path, scale=2.0), out, "--force")
    assert code == 1
    _one_line(err, o, "RuntimeError: summary broke", "can be resumed")
    assert not (out / "meta.json").exists() and not (out / "summary.json").exists()
    assert len(_units(out)) == 6  # the old config's three units and the new one's three
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_failure_before_any_unit_writes_nothing(tmp_path, capsys, failing_experiment):
    path, out = _config(tmp_path), tmp_path / "run"
    FAIL["width"] = 4
    code, o, err = _run(capsys, path, out)
    assert code == 1
    _one_line(err, o, "NotImplementedError", "nothing was written")
    assert not out.exists()


def test_traceback_on_request(tmp_path, capsys, failing_experiment, monkeypatch):
    monkeypatch.setenv("NTKEXP_TRACEBACK", "1")
    FAIL["width"] = 4
    with pytest.raises(NotImplementedError):
        main(["run", _config(tmp_path), "--out", str(tmp_path / "run"), "--quiet"])
