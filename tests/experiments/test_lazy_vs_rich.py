"""lazy_vs_rich: the summary's slopes and best learning rates against synthetic results
with known power laws and known minimisers, the tiny preset end to end, and the config
checks."""

import json
import os

import numpy as np
import pytest

from ntkexp import config as C
from ntkexp.experiments import lazy_vs_rich as LR
from ntkexp.experiments import run

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lazy_vs_rich.yaml")


def test_summary_recovers_known_rates_and_best_rates():
    cfg = C.load(CONFIG, preset="tiny", overrides=["model.width=[32, 128, 512]",
                                                   "train.inits=2"])
    widths = np.asarray(cfg.model.widths, float)
    W, K, P, L = len(widths), 2, 3, len(cfg.params.lr_multipliers)
    # kernel movement: ntk 2 n^-1/2, mup constant 0.8, standard n^+0.3
    law = {0: 2.0 * widths**-0.5, 1: np.full(W, 0.8), 2: 0.1 * widths**0.3}
    km = np.zeros((W, 1, K, P))
    for p, v in law.items():
        km[:, 0, :, p] = v[:, None]
    # final losses: ntk / mup best at multiplier index 1 for every width; standard's best
    # moves one grid step down per width (index 2, 1, 0) -> spread 2^2 = 4
    fl = np.ones((W, 1, K, P, L))
    for wi in range(W):
        fl[wi, 0, :, 0, 1] = fl[wi, 0, :, 1, 1] = 0.1
        fl[wi, 0, :, 2, 2 - wi] = 0.1
    fl[0, 0, 0, 2, 0] = np.nan  # a diverged member (lr index 0) is never the best
    res = {"final_loss": fl, "test_error": fl, "kernel_movement": km,
           "weight_movement": km, "feature_movement": km, "widths": widths.astype(int)}
    s, rows = LR.summarize(cfg, res)
    assert s["kernel_movement_slope_ntk"] == pytest.approx(-0.5, abs=1e-9)
    assert s["kernel_movement_slope_mup"] == pytest.approx(0.0, abs=1e-9)
    assert s["kernel_movement_slope_sp"] == pytest.approx(0.3, abs=1e-9)
    assert s["best_lr_spread_mup"] == pytest.approx(1.0)
    assert s["best_lr_spread_sp"] == pytest.approx(4.0)
    lrs = LR.learning_rates(cfg, "standard")
    assert s["per_parameterization"]["standard"]["best_lr"] == pytest.approx(
        [lrs[2], lrs[1], lrs[0]])
    json.dumps(s, allow_nan=False)  # strict JSON (NaN -> null)
    assert len(rows) == W * P


def test_tiny_run(tmp_path):
    cfg = C.load(CONFIG, preset="tiny")
    res = run(cfg, str(tmp_path / "r"), quiet=True)
    s = res.summary
    for key in ("kernel_movement_slope_ntk", "kernel_movement_slope_mup",
                "best_lr_spread_mup", "best_lr_spread_sp"):
        assert s[key] is not None and np.isfinite(s[key]), key
    per = s["per_parameterization"]
    # rich vs lazy at the widest net: muP features move far more than NTK ones
    assert per["mup"]["feature_movement"][-1] > 3 * per["ntk"]["feature_movement"][-1]
    assert os.path.exists(tmp_path / "r" / "figures" / "lazy_vs_rich.png")


@pytest.mark.parametrize("override, match", [
    ("model.depth=0", "hidden layers"),
    ("params.lr_multipliers=[0.5, 2.0]", "must contain 1.0"),
    ("params.parameterizations=[mean_field]", "two-layer net"),
    ("params.kernel_points=100", "at most data.n_train"),
    ("train.learning_rate=[0.1, 0.2]", "one learning rate"),
])
def test_config_checks(override, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load(CONFIG, preset="tiny", overrides=[override])
