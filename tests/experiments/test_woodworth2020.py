"""woodworth2020: the tiny preset end to end (trained diagonal nets against the exact
Q_alpha theory) and the config checks."""

import json
import os

import pytest

from ntkexp import config as C
from ntkexp.experiments import run

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "woodworth2020.yaml")


def test_tiny_run_matches_exact_theory(tmp_path):
    cfg = C.load(CONFIG, preset="tiny")
    res = run(cfg, str(tmp_path / "w"), quiet=True)
    s = json.load(open(tmp_path / "w" / "summary.json"))
    assert s == res.summary
    assert s["max_rel_gap"] <= 0.02          # trained vs argmin Q_alpha, every alpha
    assert s["l1_gap"] <= 1e-2 and s["l2_gap"] <= 1e-2
    assert s["trained_l2_gap"] <= 1e-2
    # the crossover: small alpha recovers the sparse beta*, large alpha does not
    errs = [r["test_error_theory"] for r in s["per_alpha"]]
    assert errs[0] < 0.01 < 0.3 < errs[-1]
    assert errs[-1] == pytest.approx(s["test_error_l2"], rel=1e-3)
    assert os.path.exists(tmp_path / "w" / "figures" / "woodworth2020.png")


@pytest.mark.parametrize("override, match", [
    ("model.arch=mlp", "diagonal"),
    ("data.dim=31", "must equal model.width"),
    ("data.n_train=40", "underdetermined"),
    ("params.alphas=[0.1, -1.0]", "positive"),
    ("params.sparsity=31", "at most d"),
])
def test_config_checks(override, match):
    extra = ["data.dim=30"] if override.startswith("model.arch") else []
    with pytest.raises(C.ConfigError, match=match):
        C.load(CONFIG, preset="tiny", overrides=[override] + extra)
