"""Jacot, Gabriel & Hongler (2018), Figure 1: the NTK converges to a fixed limit
and stays put during training as the width grows.

For each width n, one unit takes the ``train.inits`` initialisations as one
ensemble and computes, for each, the empirical NTK ``Theta(x0, x)`` with ``x0 = (1, 0)`` and
``x = (cos g, sin g)``, ``g in [-pi, pi]`` (``params.n_gamma`` points), at
initialisation (t = 0) and after ``train.steps`` steps of full-batch GD on the
least-squares task of ``data`` (t = steps x learning rate, so t = 200 with the
paper's 200 steps at lr 1). The reference is the analytic limit
``Theta^(L)_infinity(x0, x)`` (Jacot et al. 2018, Theorem 1), from
``ntkexp.analytic_kernel``. For an architecture that registers no analytic
kernel (a plugin), the limit is a Monte Carlo estimate, the mean empirical NTK
of ``params.mc_samples`` initialisations at width ``params.mc_width``; the
summary's ``limit`` record says which was used.

results.npz (W widths, K inits, G angles): ``gammas (G,)``, ``ntk_init`` and
``ntk_trained`` ``(W, 1, K, G)``, ``loss (W, 1, K, steps + 1)``,
``limit_ntk (G,)``, ``widths (W,)``.

summary.json headline numbers, per width (all relative to ``rms(limit)``, the
root mean square over g of the analytic kernel):

* ``mean_gap_init``: rms over g of (mean over inits of Theta_0 - limit); the
  paper's claim is that it is small at both widths (we check < 2% at n = 10^4).
* ``spread_init``: rms over g of the standard deviation across inits of
  Theta_0 (shrinks like n^-1/2).
* ``drift``: rms over inits and g of Theta_t - Theta_0 (shrinks like n^-1/2:
  the NTK "inflates" at n = 500, hardly at n = 10^4).
* ``inflation``: mean over inits and g of Theta_t - Theta_0 (signed).
* ``mean_gap_trained``, ``spread_trained``, ``final_loss`` (mean over inits),
  ``theta_x0x0_init`` (mean Theta_0(x0, x0)) beside ``limit_x0x0``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

from ntkexp.experiments.base import Experiment, register_experiment
from ntkexp.experiments.common import (
    build_ensemble,
    check_common,
    circle_grid,
    limit_kernel,
    limit_method,
    limit_summary,
    ntk_rows,
    rms,
    train_ensemble,
)
from ntkexp.plotting import jacot_fig1_figure


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``jacot_fig1``.

    Attributes:
      n_gamma: number of angles g on [-pi, pi] where Theta(x0, x) is evaluated.
      x0_angle: the angle of ``x0`` on the unit circle (0 gives x0 = (1, 0)).
      limit: ``auto`` (analytic if the architecture registers one, else Monte
        Carlo), ``analytic`` or ``monte_carlo``.
      mc_width, mc_samples: width and number of initialisations of the Monte
        Carlo limit; mc_batch: initialisations per vmapped batch (memory).
    """

    n_gamma: int = dataclasses.field(default=121, metadata={"min": 3})
    x0_angle: float = 0.0
    limit: Literal["auto", "analytic", "monte_carlo"] = "auto"
    mc_width: int = dataclasses.field(default=4096, metadata={"min": 1})
    mc_samples: int = dataclasses.field(default=16, metadata={"min": 1})
    mc_batch: int | None = dataclasses.field(default=4, metadata={"min": 1})


def _x0(cfg, dtype):
    a = cfg.params.x0_angle
    return jnp.asarray([np.cos(a), np.sin(a)], dtype)


def compute_unit(cfg, data, unit, progress):
    dtype = data.x_train.dtype
    apply_fn, params = build_ensemble(cfg, unit, data.x_train.shape[1], dtype)
    _, xs = circle_grid(cfg.params.n_gamma, dtype)
    x0 = _x0(cfg, dtype)
    k0 = ntk_rows(apply_fn, params, x0, xs)
    res = train_ensemble(cfg, apply_fn, params, data.x_train, data.y_train, unit, progress)
    kt = ntk_rows(apply_fn, res.params, x0, xs)
    return {"ntk_init": k0, "ntk_trained": kt, "loss": res.losses}


def reference(cfg, data):
    dtype = data.x_train.dtype
    g, xs = circle_grid(cfg.params.n_gamma, dtype)
    x0 = _x0(cfg, dtype)[None, :]
    p = cfg.params
    method = limit_method(cfg, p.limit)
    # one kernel on [x0; xs] (one compiled program, analytic or Monte Carlo): row 0 holds both
    full = limit_kernel(cfg, jnp.concatenate([x0, xs]), method=method, mc_width=p.mc_width,
                        mc_samples=p.mc_samples, mc_batch=p.mc_batch).ntk
    k, k00 = full[0, 1:], full[0, 0]
    return {"ntk": k, "x0x0": k00, "gammas": g}


def summarize(cfg, results):
    lim = np.asarray(results["limit_ntk"], np.float64)
    scale = float(rms(lim))
    g = np.asarray(results["limit_gammas"])
    i0 = int(np.argmin(np.abs(g - cfg.params.x0_angle)))
    per_width, rows = {}, []
    t = cfg.train.steps * cfg.train.learning_rates[0]
    for wi, w in enumerate(results["widths"]):
        k0 = np.asarray(results["ntk_init"][wi, 0], np.float64)     # (K, G)
        kt = np.asarray(results["ntk_trained"][wi, 0], np.float64)
        loss = np.asarray(results["loss"][wi, 0], np.float64)       # (K, steps+1)
        K = k0.shape[0]
        sd = (lambda a: a.std(axis=0, ddof=1)) if K > 1 else (lambda a: np.zeros(a.shape[1:]))
        per_width[str(int(w))] = {
            "width": int(w),
            "inits": K,
            "mean_gap_init": float(rms(k0.mean(0) - lim) / scale),
            "mean_gap_trained": float(rms(kt.mean(0) - lim) / scale),
            "spread_init": float(rms(sd(k0)) / scale),
            "spread_trained": float(rms(sd(kt)) / scale),
            "drift": float(rms(kt - k0) / scale),
            "inflation": float(np.mean(kt - k0) / scale),
            "final_loss": float(loss[:, -1].mean()),
            "initial_loss": float(loss[:, 0].mean()),
            "theta_x0x0_init": float(k0[:, i0].mean()),
        }
        for k in range(K):
            rows.append({"width": int(w), "init": k, "t": t,
                         "gap_init": float(rms(k0[k] - lim) / scale),
                         "drift": float(rms(kt[k] - k0[k]) / scale),
                         "loss_init": float(loss[k, 0]), "loss_final": float(loss[k, -1])})
    summary = {
        "experiment": "jacot_fig1",
        "t": t,
        "limit_x0x0": float(results["limit_x0x0"]),
        "limit_rms": scale,
        "limit": limit_summary(cfg, limit_method(cfg, cfg.params.limit),
                               cfg.params.mc_width, cfg.params.mc_samples),
        "per_width": per_width,
        "metric_definitions": "relative to rms over gamma of the analytic limit; see "
                              "ntkexp.experiments.jacot_fig1",
    }
    return summary, rows


def plot(results, summary, cfg_dict, fig_dir):
    return jacot_fig1_figure(results, summary, cfg_dict, fig_dir)


def check(cfg):
    check_common(cfg, "jacot_fig1")
    limit_method(cfg, cfg.params.limit)


EXPERIMENT = register_experiment(Experiment(
    name="jacot_fig1", params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot, check=check, main_figure="jacot_fig1"))
