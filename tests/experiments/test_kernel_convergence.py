"""kernel_convergence: the summary's fitted slope and errors against synthetic kernels
with a known n^-1/2 law, and the config checks."""

import os

import numpy as np
import pytest

from ntkexp import config as C
from ntkexp.experiments import kernel_convergence as KC

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                      "kernel_convergence.yaml")


def test_summary_recovers_a_known_rate():
    """K_n = K_inf + E / sqrt(n) (E fixed per init): relative error c / sqrt(n) exactly,
    so the fitted slope is -1/2; drift built as 0.1 / n has slope -1."""
    cfg = C.load(CONFIG, preset="tiny")
    rng = np.random.default_rng(0)
    n, K = 6, cfg.train.inits
    widths = np.asarray(cfg.model.widths)
    a = rng.normal(size=(n, n))
    lim = a @ a.T + n * np.eye(n)
    E = rng.normal(size=(K, n, n))
    k0 = np.stack([lim + E / np.sqrt(w) for w in widths])[:, None]      # (W, 1, K, n, n)
    kt = np.stack([k0[i, 0] * (1 + 0.1 / w) for i, w in enumerate(widths)])[:, None]
    res = {"ntk_init": k0, "ntk_trained": kt, "limit_ntk": lim, "widths": widths,
           "loss": np.ones((len(widths), 1, K, cfg.train.steps + 1))}
    s, rows = KC.summarize(cfg, res)
    assert s["slope_error"] == pytest.approx(-0.5, abs=1e-9)
    assert s["slope_drift"] == pytest.approx(-1.0, abs=1e-9)
    want = np.linalg.norm(E[0]) / np.linalg.norm(lim) / np.sqrt(widths[0])
    assert rows[0]["error_init"] == pytest.approx(want, rel=1e-12)
    assert s["limit"]["method"] == "analytic" and len(rows) == len(widths) * K


def test_fit_slope_edges():
    assert KC.fit_slope([10], [0.1]) is None
    assert KC.fit_slope([10, 100], [0.1, 0.0]) is None
    assert KC.fit_slope([10, 1000], [1.0, 0.1]) == pytest.approx(-0.5)


def test_config_checks():
    with pytest.raises(C.ConfigError, match="one learning rate"):
        C.load(CONFIG, preset="tiny", overrides=["train.learning_rate=[0.1, 1.0]"])
    with pytest.raises(C.ConfigError, match="at least 2 inputs"):
        C.load(CONFIG, preset="tiny", overrides=["data.n_train=1"])
    with pytest.raises(C.ConfigError, match="params.limit"):
        C.load(CONFIG, preset="tiny", overrides=["params.limit=analytico"])
    for arch in ("mlp", "resmlp", "cnn"):  # every built-in architecture validates here
        assert C.load(CONFIG, preset="tiny", overrides=[f"model.arch={arch}"]).model.arch == arch
