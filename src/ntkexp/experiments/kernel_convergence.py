"""Kernel convergence: the empirical NTK at initialisation against its
infinite-width limit, for any registered architecture (issue 7).

For each width n, one unit takes the ``train.inits`` initialisations as one
ensemble and computes, for each, the empirical NTK ``Theta_n(X, X)``
(``ntkexp.empirical.empirical_ntk``, traced over outputs and divided by
``out_dim``: the per-output kernel) on the ``data.n_train`` training inputs,
and, when ``train.steps > 0``, again after training with ``train``'s optimizer.
The reference is the limit ``Theta_inf(X, X)``: the architecture's analytic
kernel where it registers one (``params.limit: auto``), else a Monte Carlo
estimate (the mean empirical NTK of ``params.mc_samples`` initialisations at
width ``params.mc_width``; the summary's ``limit`` record and the command line
say so).

Theory (Jacot et al. 2018, Thm. 1 and 2; Arora et al. 2019, Thm. 3.1): at
initialisation ``Theta_n -> Theta_inf`` with fluctuations of order
``n^-1/2``, and during training the kernel moves by ``O(n^-1/2)``. So the
relative Frobenius error ``||Theta_n - Theta_inf||_F / ||Theta_inf||_F`` falls
with a slope near ``-1/2`` in log-log, and the drift
``||Theta_t - Theta_0||_F / ||Theta_0||_F`` at least as fast (the ``cpu``
preset measures -0.57 and -0.71).

results.npz (W widths, K inits, n inputs): ``ntk_init``, ``ntk_trained``
``(W, 1, K, n, n)``, ``loss (W, 1, K, steps + 1)``, ``limit_ntk (n, n)``,
``widths (W,)``.

summary.json: per width ``error_init`` (mean over inits of the relative error),
``error_init_sd``, ``error_mean_kernel`` (error of the mean over inits),
``drift`` (mean relative drift; null without training), ``final_loss``; and
``slope_error`` / ``slope_drift``, the least-squares slopes of log error and log
drift against log width (theory ``-0.5``), ``limit`` (how the limit was
obtained) and, for a Monte Carlo limit, ``mc_error_estimate``: the error the
fitted law ``c n^-1/2`` predicts for the Monte Carlo mean itself
(``c (mc_width * mc_samples)^-1/2``), a floor below which finite-width errors
cannot be resolved.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import numpy as np

from ntkexp.config import ConfigError
from ntkexp.empirical import empirical_ntk
from ntkexp.experiments.base import Experiment, register_experiment
from ntkexp.experiments.common import (
    build_ensemble,
    limit_kernel,
    limit_method,
    limit_summary,
    train_ensemble,
)
from ntkexp.members import member as take_member
from ntkexp.plotting import kernel_convergence_figure

NAME = "kernel_convergence"
THEORY_SLOPE = -0.5


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``kernel_convergence``.

    Attributes:
      limit: ``auto`` (analytic if the architecture registers a kernel, else
        Monte Carlo), ``analytic`` or ``monte_carlo``.
      mc_width: width of the Monte Carlo limit's networks.
      mc_samples: number of initialisations averaged by the Monte Carlo limit.
      mc_batch: initialisations per vmapped batch of the Monte Carlo limit
        (bounds memory; None: all at once).
      method: empirical NTK method (``ntkexp.empirical.empirical_ntk``).
    """

    limit: Literal["auto", "analytic", "monte_carlo"] = "auto"
    mc_width: int = dataclasses.field(default=4096, metadata={"min": 1})
    mc_samples: int = dataclasses.field(default=16, metadata={"min": 1})
    mc_batch: int | None = dataclasses.field(default=4, metadata={"min": 1})
    method: Literal["auto", "structured", "jvp", "jacobian"] = "auto"


def _ntk(cfg, apply_fn, params, x):
    """Per-output empirical NTK of every member, ``(K, n, n)`` (one member at a time:
    the structured path's Gram matrices are the memory, not the parameters)."""
    K = jax.tree_util.tree_leaves(params)[0].shape[0]
    out = []
    for i in range(K):
        p = take_member(params, i)
        k = empirical_ntk(apply_fn, p, x, method=cfg.params.method, outputs="trace")
        out.append(np.asarray(k / apply_fn(p, x[:1]).shape[1]))
    return np.stack(out)


def compute_unit(cfg, data, unit, progress):
    x = data.x_train
    apply_fn, params = build_ensemble(cfg, unit, x.shape[1], x.dtype)
    k0 = _ntk(cfg, apply_fn, params, x)
    if cfg.train.steps > 0:
        res = train_ensemble(cfg, apply_fn, params, x, data.y_train, unit, progress)
        kt, loss = _ntk(cfg, apply_fn, res.params, x), res.losses
    else:
        kt, loss = k0, np.zeros((len(unit.inits), 1), k0.dtype)
        progress(len(unit.inits))
    return {"ntk_init": k0, "ntk_trained": kt, "loss": loss}


def reference(cfg, data):
    p = cfg.params
    k = limit_kernel(cfg, data.x_train, method=limit_method(cfg, p.limit),
                     mc_width=p.mc_width, mc_samples=p.mc_samples, mc_batch=p.mc_batch)
    return {"ntk": k.ntk}


def _rel(a, b) -> np.ndarray:
    """``||a - b||_F / ||b||_F`` over the last two axes."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=(-2, -1)) / np.linalg.norm(b, axis=(-2, -1))


def fit_slope(widths, values) -> float | None:
    """Least-squares slope of ``log values`` against ``log widths`` (None if < 2
    distinct widths or a non-positive value)."""
    w, v = np.asarray(widths, np.float64), np.asarray(values, np.float64)
    if len(np.unique(w)) < 2 or np.any(v <= 0) or not np.all(np.isfinite(v)):
        return None
    return float(np.polyfit(np.log(w), np.log(v), 1)[0])


def summarize(cfg, results):
    lim = np.asarray(results["limit_ntk"], np.float64)
    widths = [int(w) for w in results["widths"]]
    trained = cfg.train.steps > 0
    method = limit_method(cfg, cfg.params.limit)
    per_width, rows = {}, []
    err_means, drift_means = [], []
    for wi, w in enumerate(widths):
        k0 = np.asarray(results["ntk_init"][wi, 0], np.float64)      # (K, n, n)
        kt = np.asarray(results["ntk_trained"][wi, 0], np.float64)
        loss = np.asarray(results["loss"][wi, 0], np.float64)        # (K, steps + 1)
        err = _rel(k0, lim)                                          # (K,)
        drift = _rel(kt, k0) if trained else None
        err_means.append(float(err.mean()))
        if trained:
            drift_means.append(float(drift.mean()))
        per_width[str(w)] = {
            "width": w,
            "inits": int(k0.shape[0]),
            "error_init": float(err.mean()),
            "error_init_sd": float(err.std(ddof=1)) if len(err) > 1 else 0.0,
            "error_mean_kernel": float(_rel(k0.mean(0), lim)),
            "drift": float(drift.mean()) if trained else None,
            "initial_loss": float(loss[:, 0].mean()) if trained else None,
            "final_loss": float(loss[:, -1].mean()) if trained else None,
        }
        for k in range(k0.shape[0]):
            row = {"width": w, "init": k, "error_init": float(err[k])}
            if trained:
                row.update(drift=float(drift[k]), loss_init=float(loss[k, 0]),
                           loss_final=float(loss[k, -1]))
            rows.append(row)
    slope = fit_slope(widths, err_means)
    summary = {
        "experiment": NAME,
        "architecture": cfg.model.arch,
        "limit": limit_summary(cfg, method, cfg.params.mc_width, cfg.params.mc_samples),
        "theory_slope": THEORY_SLOPE,
        "slope_error": slope,
        "slope_drift": fit_slope(widths, drift_means) if trained else None,
        "trained": trained,
        "t": cfg.train.steps * cfg.train.learning_rates[0] if trained else 0.0,
        "per_width": per_width,
        "metric_definitions": "relative Frobenius norms on the training inputs; see "
                              "ntkexp.experiments.kernel_convergence",
    }
    if method == "monte_carlo" and slope is not None:
        # the fitted error law c * n^(-1/2), evaluated at the Monte Carlo budget
        c = np.exp(np.mean(np.log(err_means) - THEORY_SLOPE * np.log(widths)))
        summary["mc_error_estimate"] = float(
            c * (cfg.params.mc_width * cfg.params.mc_samples) ** THEORY_SLOPE)
    return summary, rows


def plot(results, summary, cfg_dict, fig_dir):
    return kernel_convergence_figure(results, summary, cfg_dict, fig_dir)


def check(cfg):
    if len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"train.learning_rate: {NAME} sweeps widths and inits only; give "
                          "one learning rate")
    if cfg.data.n_train < 2:
        raise ConfigError(f"data.n_train: {NAME} needs at least 2 inputs, got "
                          f"{cfg.data.n_train}")
    limit_method(cfg, cfg.params.limit)


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot, check=check, main_figure=NAME,
    unit_work=lambda cfg: max(cfg.train.steps, 1)))
