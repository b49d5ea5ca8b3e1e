"""Du, Zhai, Poczos & Singh (ICLR 2019), Figure 1: gradient descent on an
over-parameterized two-layer ReLU net.

Model (Du et al. 2019, eq. 1): ``f(x) = (1/sqrt(m)) sum_r a_r relu(w_r . x)``,
``w_r ~ N(0, I)``, ``a_r`` uniform on ``{-1, +1}`` and fixed; only ``W`` is
trained, by full-batch GD on ``L = 1/2 sum_i (f(x_i) - y_i)^2``. Data: ``n``
points uniform on the unit sphere ``S^{d-1}`` with ``N(0, 1)`` labels
(config: ``model.arch: two_layer_relu``, ``data.name: sphere``,
``data.target: normal``, ``train.loss_reduction: sum``).

For each width m, one unit trains the ``train.inits`` initialisations as one
ensemble for ``train.steps`` steps and records, every ``params.record_every``
steps: (a) the training loss (every step), (b) the fraction of activation
patterns flipped, ``sum_{i,r} 1{sign(w_r(0).x_i) != sign(w_r(k).x_i)} / (mn)``,
and (c) ``max_r ||w_r(k) - w_r(0)||_2`` (Du et al. 2019, Fig. 1). It also
stores ``lambda_min`` of the finite-width Gram matrix
``H(W)_ij = (x_i.x_j / m) sum_r 1{w_r.x_i > 0} 1{w_r.x_j > 0}`` (eq. 3.2) at
the start and the end, and the loss the infinite-width linear dynamics
predict from the same initial outputs, ``1/2 ||(I - eta H^inf)^k (u(0) - y)||^2``
(Du et al. 2019, eq. 4; Arora et al. 2019, Thm 4.1).

The reference is ``H^inf_ij = x_i.x_j (pi - arccos(x_i.x_j)) / (2 pi)``
(Du et al. 2019, eq. 3.1): its smallest and largest eigenvalues give the
paper's ``lambda_0`` and the step-size limit ``eta < 2 / lambda_max``.

results.npz (W widths, K inits, S steps, R records, n points):
``loss (W, 1, K, S + 1)``, ``loss_pred (W, 1, K, S + 1)``,
``flip_fraction (W, 1, K, R)``, ``max_distance (W, 1, K, R)``,
``record_steps (W, 1, K, R)``, ``lambda_min_init``/``lambda_min_final``
``(W, 1, K)``, ``limit_eigenvalues (n,)``, ``widths (W,)``.

summary.json: per width (means over inits) the initial and final loss, the
iterations to reach ``params.loss_threshold`` times the initial loss, the
final flip fraction and max distance, ``lambda_min`` of ``H(0)``; overall
``lambda_min``/``lambda_max`` of ``H^inf``, ``2 / lambda_max``, and the
exponents of max distance and flip fraction against m fitted on a log-log
scale (theory: max distance ~ m^(-1/2), Du et al. 2019, Lemma 3.3 / eq. 10).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import ntkexp.models.two_layer  # noqa: F401  (registers the two_layer_relu architecture)
from ntkexp.config import ConfigError
from ntkexp.experiments.base import Experiment, register_experiment
from ntkexp.experiments.common import (
    build_ensemble,
    check_two_layer,
    fit_exponent,
    gram_two_layer,
    h_infinity,
    per_member,
    train_ensemble,
)
from ntkexp.plotting import save_figure
from ntkexp.theory import gd_loss_curve

NAME = "du2019_fig1"


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``du2019_fig1``.

    Attributes:
      record_every: record flips and distances every this many steps (and at
        the last step).
      loss_threshold: "iterations to converge" counts steps until the loss is
        at most this fraction of its initial value.
    """

    record_every: int = dataclasses.field(default=1, metadata={"min": 1})
    loss_threshold: float = dataclasses.field(default=1e-3, metadata={"min_exclusive": 0.0,
                                                                       "max": 1.0})


# --------------------------------------------------------------------------
# Numerical pieces (pure)
# --------------------------------------------------------------------------


def iterations_to(loss, fraction: float) -> float:
    """First step k with ``loss[k] <= fraction * loss[0]`` (``nan`` if never reached)."""
    loss = np.asarray(loss, np.float64)
    hit = np.nonzero(loss <= fraction * loss[0])[0]
    return float(hit[0]) if hit.size else float("nan")


def record_schedule(steps: int, every: int) -> tuple[int, ...]:
    """Steps ``0, every, 2 every, ..., steps`` (the last step always included)."""
    return tuple(sorted(set(range(0, steps + 1, every)) | {steps}))


# --------------------------------------------------------------------------
# Experiment hooks
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("steps", "loss_reduction"))
def _predicted_loss(x, u0, y, lr, *, steps, loss_reduction):
    return gd_loss_curve(h_infinity(x), u0[:, 0], y[:, 0], steps, learning_rate=lr,
                         loss_reduction=loss_reduction)


def compute_unit(cfg, data, unit, progress):
    x, y = data.x_train, data.y_train
    apply_fn, params = build_ensemble(cfg, unit, x.shape[1], x.dtype)
    K = len(unit.inits)
    rec = record_schedule(cfg.train.steps, cfg.params.record_every)
    u0 = per_member(apply_fn, params, x)
    lr = jnp.asarray(unit.learning_rate, x.dtype)
    pred = jax.vmap(lambda u: _predicted_loss(x, u, y, lr, steps=cfg.train.steps,
                                              loss_reduction=cfg.train.loss_reduction))(u0)
    res = train_ensemble(cfg, apply_fn, params, x, y, unit, progress, batch_size=None,
                         record_steps=rec)
    lam = jax.vmap(lambda W: jnp.linalg.eigvalsh(gram_two_layer(W, x))[0])
    return {"loss": res.losses, "loss_pred": pred, "flip_fraction": res.flip_fraction,
            "max_distance": res.max_weight_distance,
            "record_steps": np.tile(np.asarray(res.record_steps, np.int32), (K, 1)),
            "lambda_min_init": lam(params["W"]), "lambda_min_final": lam(res.params["W"])}


def reference(cfg, data):
    ev = jnp.linalg.eigvalsh(h_infinity(data.x_train))
    return {"eigenvalues": ev}


def summarize(cfg, results):
    ev = np.asarray(results["limit_eigenvalues"], np.float64)
    lr = float(cfg.train.learning_rates[0])
    thr = cfg.params.loss_threshold
    widths = [int(w) for w in results["widths"]]
    per_width, rows = {}, []
    finals_dist, finals_flip = [], []
    for wi, w in enumerate(widths):
        loss = np.asarray(results["loss"][wi, 0], np.float64)          # (K, S+1)
        pred = np.asarray(results["loss_pred"][wi, 0], np.float64)
        flips = np.asarray(results["flip_fraction"][wi, 0], np.float64)  # (K, R)
        dist = np.asarray(results["max_distance"][wi, 0], np.float64)
        lam0 = np.asarray(results["lambda_min_init"][wi, 0], np.float64)
        lam1 = np.asarray(results["lambda_min_final"][wi, 0], np.float64)
        its = [iterations_to(loss[k], thr) for k in range(loss.shape[0])]
        finals_dist.append(dist[:, -1].mean())
        finals_flip.append(flips[:, -1].mean())
        per_width[str(w)] = {
            "width": w,
            "inits": int(loss.shape[0]),
            "initial_loss": float(loss[:, 0].mean()),
            "final_loss": float(loss[:, -1].mean()),
            "final_loss_predicted": float(pred[:, -1].mean()),
            "iterations_to_threshold": (float(np.mean(its)) if np.all(np.isfinite(its))
                                        else None),
            "final_flip_fraction": float(flips[:, -1].mean()),
            "final_max_distance": float(dist[:, -1].mean()),
            "final_max_distance_sd": float(dist[:, -1].std()),
            "lambda_min_H0": float(lam0.mean()),
            "lambda_min_H_final": float(lam1.mean()),
        }
        for k in range(loss.shape[0]):
            rows.append({"width": w, "init": k, "loss_init": float(loss[k, 0]),
                         "loss_final": float(loss[k, -1]),
                         "iterations_to_threshold": its[k] if np.isfinite(its[k]) else None,
                         "flip_fraction": float(flips[k, -1]),
                         "max_distance": float(dist[k, -1]),
                         "lambda_min_H0": float(lam0[k])})
    fl = [per_width[str(w)]["final_loss"] for w in widths]
    summary = {
        "experiment": NAME,
        "learning_rate": lr,
        "steps": cfg.train.steps,
        "loss_threshold": thr,
        "lambda_min_Hinf": float(ev[0]),
        "lambda_max_Hinf": float(ev[-1]),
        "eta_max_stable": float(2.0 / ev[-1]),
        "distance_exponent": fit_exponent(widths, finals_dist),
        "flip_exponent": fit_exponent(widths, finals_flip),
        "distance_exponent_theory": -0.5,
        "final_loss_decreasing_in_width": bool(np.all(np.diff(fl) < 0)),
        "per_width": per_width,
    }
    return summary, rows


def plot(results, summary, cfg_dict, fig_dir):
    import matplotlib.pyplot as plt

    widths = [int(w) for w in results["widths"]]
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(widths)))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    ax_l, ax_f, ax_d, ax_s = axes
    for wi, w in enumerate(widths):
        c = colors[wi]
        loss = np.asarray(results["loss"][wi, 0], np.float64)
        pred = np.asarray(results["loss_pred"][wi, 0], np.float64)
        steps = np.arange(loss.shape[1])
        rs = np.asarray(results["record_steps"][wi, 0, 0])
        for k in range(loss.shape[0]):
            ax_l.semilogy(steps, loss[k], color=c, lw=0.7, alpha=0.5)
        ax_l.semilogy(steps, loss.mean(0), color=c, lw=1.8, label=f"m = {w}")
        ax_l.semilogy(steps, pred.mean(0), color=c, lw=1.0, ls=":")
        for name, ax in (("flip_fraction", ax_f), ("max_distance", ax_d)):
            v = np.asarray(results[name][wi, 0], np.float64)
            ax.plot(rs, v.mean(0), color=c, lw=1.8, label=f"m = {w}")
            if v.shape[0] > 1:
                ax.fill_between(rs, v.min(0), v.max(0), color=c, alpha=0.2, lw=0)
    ax_l.set_title("(a) training loss ($\\frac{1}{2}\\sum_i (f(x_i)-y_i)^2$)\n"
                   "dotted: $\\frac{1}{2}\\|(I-\\eta H^\\infty)^k (u(0)-y)\\|^2$", fontsize=9)
    ax_f.set_title("(b) fraction of activation patterns flipped", fontsize=9)
    ax_d.set_title("(c) $\\max_r \\|w_r(k) - w_r(0)\\|_2$", fontsize=9)
    for ax in (ax_l, ax_f, ax_d):
        ax.set_xlabel("iteration k")
        ax.grid(alpha=0.3)
    ax_l.legend(fontsize=7)
    pw = summary["per_width"]
    d = np.array([pw[str(w)]["final_max_distance"] for w in widths])
    f = np.array([pw[str(w)]["final_flip_fraction"] for w in widths])
    ax_s.loglog(widths, d, "o-", color="tab:blue",
                label=f"max distance, slope {summary['distance_exponent']:.2f}")
    ax_s.loglog(widths, f, "s-", color="tab:red",
                label=f"flip fraction, slope {summary['flip_exponent']:.2f}")
    ax_s.loglog(widths, d[0] * (np.asarray(widths) / widths[0]) ** -0.5, "k--", lw=1,
                label="$m^{-1/2}$ (theory)")
    ax_s.set_xlabel("width m")
    ax_s.set_title("(d) at the last iteration, against width", fontsize=9)
    ax_s.legend(fontsize=7)
    ax_s.grid(alpha=0.3, which="both")
    m = cfg_dict.get("data", {})
    fig.suptitle(f"Du et al. 2019, Fig. 1: two-layer ReLU, n = {m.get('n_train')}, "
                 f"d = {m.get('dim')}, GD eta = {summary['learning_rate']:g} "
                 f"(2/lambda_max(H^inf) = {summary['eta_max_stable']:.3g})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, fig_dir, NAME)


def check(cfg):
    check_two_layer(cfg, NAME)
    if len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"train.learning_rate: {NAME} sweeps widths and inits only; give "
                          "one learning rate")


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot, check=check, main_figure=NAME))
