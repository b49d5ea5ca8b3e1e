"""Jacot, Gabriel & Hongler (2018), Figure 2: networks trained to convergence
follow the limiting Gaussian distribution of the NTK regime.

Each unit trains the initialisations of one width, as one ensemble, on the few points of ``data``
(the paper: 4 points on the unit circle; positions and targets are not stated,
the config documents our choice) for ``train.steps`` GD steps and records the
trained function ``f(cos g, sin g)`` on ``params.n_gamma`` angles in [-pi, pi].

The reference is the limiting Gaussian (Jacot et al. 2018, section 5): with
``Theta`` the limiting NTK, ``Sigma`` the limiting NNGP, ``K = Theta(X, X)``
and ``kappa_x = Theta(X, x)``,

    mean(x) = kappa_x^T K^-1 y
    var(x)  = Sigma(x, x) - 2 kappa_x^T K^-1 Sigma(X, x)
              + kappa_x^T K^-1 Sigma(X, X) K^-1 kappa_x

and P10 / P50 / P90 = mean -/+ 1.2816 sd. We also store the same Gaussian at
the finite training time (linearised discrete GD: ``K^-1`` replaced by
``K^-1 (I - (I - lr K / N)^steps)`` for the mean loss), to show that
``train.steps`` is long enough for the t = infinity curves to apply.

results.npz: ``f_trained``/``f_init`` ``(W, 1, K, G)``, ``loss``,
``limit_gammas (G,)``, ``limit_mean``, ``limit_sd``, ``limit_mean_t``,
``limit_sd_t`` ``(G,)``, ``limit_x_train``, ``limit_y_train``.

summary.json headline numbers, per width:

* ``frac_in_band``: fraction of (trained curve, angle) pairs inside [P10, P90]
  of the limit (0.8 if the trained functions follow the limiting Gaussian);
* ``mean_gap``: rms over g of (mean of the trained curves - limit mean),
  relative to the rms of the limit mean;
* ``sd_ratio``: rms over g of the sd across trained curves / rms of the limit sd;
* ``final_loss``.
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
    per_member,
    rms,
    train_ensemble,
)
from ntkexp.plotting import jacot_fig2_figure

Z90 = 1.2815515655446004  # the 90% quantile of N(0, 1)


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``jacot_fig2``.

    Attributes:
      n_gamma: number of angles on [-pi, pi] where the functions are evaluated.
      limit: ``auto`` (the architecture's analytic kernels if it registers them,
        else a Monte Carlo estimate), ``analytic`` or ``monte_carlo``.
      mc_width, mc_samples, mc_batch: the Monte Carlo limit's width, number of
        initialisations, and initialisations per vmapped batch.
    """

    n_gamma: int = dataclasses.field(default=181, metadata={"min": 3})
    limit: Literal["auto", "analytic", "monte_carlo"] = "auto"
    mc_width: int = dataclasses.field(default=4096, metadata={"min": 1})
    mc_samples: int = dataclasses.field(default=16, metadata={"min": 1})
    mc_batch: int | None = dataclasses.field(default=4, metadata={"min": 1})


def compute_unit(cfg, data, unit, progress):
    dtype = data.x_train.dtype
    apply_fn, params = build_ensemble(cfg, unit, data.x_train.shape[1], dtype)
    _, xs = circle_grid(cfg.params.n_gamma, dtype)
    f0 = per_member(apply_fn, params, xs)[..., 0]
    res = train_ensemble(cfg, apply_fn, params, data.x_train, data.y_train, unit, progress)
    ft = per_member(apply_fn, res.params, xs)[..., 0]
    return {"f_init": f0, "f_trained": ft, "loss": res.losses}


def limiting_gaussian(k_xx, k_tx, s_xx, s_tx, s_tt_diag, y, *, shrink=None):
    """Mean and sd of the NTK-regime function at test points (Jacot et al. 2018, sec. 5).

    Args:
      k_xx: ``(N, N)`` NTK on the training inputs.
      k_tx: ``(G, N)`` NTK between test and training inputs.
      s_xx: ``(N, N)`` NNGP on the training inputs.
      s_tx: ``(G, N)`` NNGP between test and training inputs.
      s_tt_diag: ``(G,)`` NNGP variance at the test inputs.
      y: ``(N,)`` targets.
      shrink: None for t = infinity; else ``(N,)`` -> ``(N,)`` function ``h(lam)``
        giving the spectral filter ``K^-1 -> V diag(h(lam) / lam) V^T`` at finite time.

    Returns:
      ``(mean (G,), sd (G,))``.
    """
    lam, V = np.linalg.eigh(np.asarray(k_xx, np.float64))
    h = np.ones_like(lam) if shrink is None else shrink(lam)
    M = (V * (h / lam)) @ V.T                       # K^-1 (I - E_t)
    A = np.asarray(k_tx, np.float64) @ M            # (G, N)
    mean = A @ np.asarray(y, np.float64)
    s_tx = np.asarray(s_tx, np.float64)
    var = (np.asarray(s_tt_diag, np.float64) - 2 * np.sum(A * s_tx, axis=1)
           + np.sum((A @ np.asarray(s_xx, np.float64)) * A, axis=1))
    return mean, np.sqrt(np.maximum(var, 0.0))


def reference(cfg, data):
    dtype = data.x_train.dtype
    g, xs = circle_grid(cfg.params.n_gamma, dtype)
    X, y = data.x_train, np.asarray(data.y_train[:, 0])
    p = cfg.params
    method = limit_method(cfg, p.limit)
    kw = dict(method=method, mc_width=p.mc_width, mc_samples=p.mc_samples, mc_batch=p.mc_batch)
    # one kernel on [X; xs], sliced: one compiled program (three shapes compiled three)
    n = X.shape[0]
    k = limit_kernel(cfg, jnp.concatenate([X, xs]), **kw)
    ntk, nngp = np.asarray(k.ntk), np.asarray(k.nngp)
    args = (ntk[:n, :n], ntk[n:, :n], nngp[:n, :n], nngp[n:, :n], np.diag(nngp)[n:], y)
    mean, sd = limiting_gaussian(*args)
    lr, steps = cfg.train.learning_rates[0], cfg.train.steps
    div = n if cfg.train.loss_reduction == "mean" else 1
    mean_t, sd_t = limiting_gaussian(
        *args, shrink=lambda lam: 1.0 - (1.0 - lr * lam / div) ** steps)
    return {"gammas": g, "mean": mean, "sd": sd, "mean_t": mean_t, "sd_t": sd_t,
            "x_train": X, "y_train": y}


def summarize(cfg, results):
    mu = np.asarray(results["limit_mean"], np.float64)
    sd = np.asarray(results["limit_sd"], np.float64)
    lo, hi = mu - Z90 * sd, mu + Z90 * sd
    per_width, rows = {}, []
    for wi, w in enumerate(results["widths"]):
        f = np.asarray(results["f_trained"][wi, 0], np.float64)   # (K, G)
        loss = np.asarray(results["loss"][wi, 0], np.float64)
        inside = (f >= lo) & (f <= hi)
        K = f.shape[0]
        per_width[str(int(w))] = {
            "width": int(w),
            "inits": K,
            "frac_in_band": float(inside.mean()),
            "mean_gap": float(rms(f.mean(0) - mu) / rms(mu)),
            "sd_ratio": float(rms(f.std(0, ddof=1)) / rms(sd)) if K > 1 else None,
            "final_loss": float(loss[:, -1].mean()),
        }
        for k in range(K):
            rows.append({"width": int(w), "init": k, "frac_in_band": float(inside[k].mean()),
                         "loss_final": float(loss[k, -1])})
    summary = {
        "experiment": "jacot_fig2",
        "t": cfg.train.steps * cfg.train.learning_rates[0],
        "limit_rms_mean": float(rms(mu)),
        "limit_rms_sd": float(rms(sd)),
        "finite_time_gap": float(np.max(np.abs(np.asarray(results["limit_mean_t"]) - mu))
                                 / rms(mu)),
        "per_width": per_width,
        "expected_frac_in_band": 0.8,
        "limit": limit_summary(cfg, limit_method(cfg, cfg.params.limit),
                               cfg.params.mc_width, cfg.params.mc_samples),
    }
    return summary, rows


def plot(results, summary, cfg_dict, fig_dir):
    return jacot_fig2_figure(results, summary, cfg_dict, fig_dir)


def check(cfg):
    check_common(cfg, "jacot_fig2")
    limit_method(cfg, cfg.params.limit)


EXPERIMENT = register_experiment(Experiment(
    name="jacot_fig2", params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot, check=check, main_figure="jacot_fig2"))
