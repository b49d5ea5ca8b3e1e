"""Natural-gradient descent against GD and SGD on Du et al.'s two-layer ReLU net
(Zhang, Martens & Grosse, NeurIPS 2019).

Same model, data and loss as ``du2019_fig1`` (``L = 1/2 sum_i (f(x_i) - y_i)^2``,
first layer trained). For each width m and initialisation, one unit trains
the same initial network with

* GD: ``W <- W - eta grad L``, ``eta`` = ``train.learning_rate``;
* SGD: the same rule on mini-batches of ``params.sgd_batch_size`` points
  (without replacement, reshuffled each epoch), ``eta`` =
  ``params.sgd_learning_rate`` (default: GD's);
* NGD for each ``eta`` in ``params.ngd_learning_rates``:
  ``W <- W - eta J^T (J J^T + lambda I)^(-1) (u - y)`` (Zhang et al. 2019,
  eq. 4, with the Gauss-Newton Fisher; ``lambda`` = ``params.ngd_damping``),
  via ``ntkexp.optim.ngd``.

Theory (Zhang et al. 2019, Thm 3, for a wide enough net and ``eta <= 1``):
``||u(k) - y||^2 <= (1 - eta)^k ||u(0) - y||^2``; in the infinite-width
(linear) limit the residual contracts by exactly ``(1 - eta)`` per step, a
rate that does not depend on ``lambda_min(H)``. GD's residual contracts by
``1 - eta lambda_min(H)`` per step asymptotically (Du et al. 2019, Thm 4.1;
Arora et al. 2019, Thm 4.1), so its rate does.

Measured rates (summary.json):

* NGD per-step contraction: ``(||r_s|| / ||r_0||)^(1/s)`` with
  ``s = params.rate_steps`` (the geometric mean of ``||r_{k+1}|| / ||r_k||``
  over the first s steps), beside ``|1 - eta|``; ``r = u - y`` and
  ``||r||^2 = 2 L``.
* GD late rate: the same ratio over the last half of the steps, beside
  ``1 - eta lambda_min(H^inf)`` and ``1 - eta lambda_min(H(0))``.

results.npz (W widths, K inits, S steps, E NGD step sizes):
``loss_gd``, ``loss_sgd`` ``(W, 1, K, S + 1)``, ``loss_ngd (W, 1, K, E, S + 1)``,
``lambda_min_init (W, 1, K)``, ``limit_eigenvalues (n,)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.config import ConfigError
from ntkexp.experiments.base import Experiment, register_experiment
from ntkexp.experiments.common import (
    build_ensemble,
    check_two_layer,
    gram_two_layer,
    h_infinity,
    train_ensemble,
)
from ntkexp.plotting import save_figure

NAME = "zhang2019_ngd"


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``zhang2019_ngd``.

    Attributes:
      ngd_learning_rates: NGD step sizes eta (each in (0, 1]).
      ngd_damping: ``lambda >= 0`` added to the diagonal of ``J J^T``.
      sgd_batch_size: SGD mini-batch size.
      sgd_learning_rate: SGD step size (None: GD's ``train.learning_rate``).
      rate_steps: NGD contraction is measured over the first this many steps.
    """

    ngd_learning_rates: tuple[float, ...] = dataclasses.field(
        default=(0.25, 0.5, 1.0), metadata={"min_exclusive": 0.0, "max": 1.0, "nonempty": True})
    ngd_damping: float = dataclasses.field(default=0.0, metadata={"min": 0.0})
    sgd_batch_size: int = dataclasses.field(default=10, metadata={"min": 1})
    sgd_learning_rate: float | None = dataclasses.field(default=None,
                                                        metadata={"min_exclusive": 0.0})
    rate_steps: int = dataclasses.field(default=3, metadata={"min": 1})


def contraction(loss, start: int, stop: int) -> float:
    """Geometric-mean residual contraction per step between two steps.

    ``(||r_stop|| / ||r_start||)^(1 / (stop - start))`` with ``||r||^2 = 2 L``
    (so ``sqrt(L_stop / L_start)`` per step).

    Args:
      loss: ``(S + 1,)`` losses ``1/2 ||r_k||^2``.
      start, stop: steps, ``0 <= start < stop <= S``.
    """
    loss = np.asarray(loss, np.float64)
    a, b = loss[start], loss[stop]
    if not (a > 0) or not (b >= 0):
        return float("nan")
    return float((b / a) ** (0.5 / (stop - start)))


def _units_work(cfg) -> int:
    return cfg.train.steps * (2 + len(cfg.params.ngd_learning_rates))


def compute_unit(cfg, data, unit, progress):
    x, y = data.x_train, data.y_train
    apply_fn, params = build_ensemble(cfg, unit, x.shape[1], x.dtype)
    p = cfg.params
    out = {}
    res = train_ensemble(cfg, apply_fn, params, x, y, unit, progress, optimizer="gd",
                         batch_size=None, run=0)
    out["loss_gd"] = res.losses
    bs = min(p.sgd_batch_size, x.shape[0])
    lr_sgd = p.sgd_learning_rate if p.sgd_learning_rate is not None else unit.learning_rate
    res = train_ensemble(cfg, apply_fn, params, x, y, unit, progress, optimizer="sgd",
                         learning_rate=lr_sgd, batch_size=bs, run=1)
    out["loss_sgd"] = res.losses
    ngd = []
    for e, eta in enumerate(p.ngd_learning_rates):  # one compiled program for every eta
        res = train_ensemble(cfg, apply_fn, params, x, y, unit, progress, optimizer="ngd",
                             learning_rate=float(eta), batch_size=None, run=2 + e,
                             options={"damping": p.ngd_damping})
        ngd.append(np.asarray(res.losses))
    out["loss_ngd"] = np.stack(ngd, axis=1)
    out["lambda_min_init"] = jax.vmap(
        lambda W: jnp.linalg.eigvalsh(gram_two_layer(W, x))[0])(params["W"])
    return out


def reference(cfg, data):
    return {"eigenvalues": jnp.linalg.eigvalsh(h_infinity(data.x_train))}


def summarize(cfg, results):
    p = cfg.params
    S = cfg.train.steps
    s = min(p.rate_steps, S)
    half = S // 2
    ev = np.asarray(results["limit_eigenvalues"], np.float64)
    lr = float(cfg.train.learning_rates[0])
    widths = [int(w) for w in results["widths"]]
    per_width, rows = {}, []
    for wi, w in enumerate(widths):
        gd = np.asarray(results["loss_gd"][wi, 0], np.float64)      # (K, S+1)
        sgd = np.asarray(results["loss_sgd"][wi, 0], np.float64)
        ngd = np.asarray(results["loss_ngd"][wi, 0], np.float64)    # (K, E, S+1)
        lam0 = np.asarray(results["lambda_min_init"][wi, 0], np.float64)
        K = gd.shape[0]
        entry = {"width": w, "inits": K,
                 "initial_loss": float(gd[:, 0].mean()),
                 "final_loss_gd": float(gd[:, -1].mean()),
                 "final_loss_sgd": float(sgd[:, -1].mean()),
                 "lambda_min_H0": float(lam0.mean()),
                 "gd_late_rate": float(np.mean([contraction(gd[k], half, S) for k in range(K)])),
                 "gd_rate_predicted_H0": float(np.mean(1.0 - lr * lam0)),
                 "ngd": {}}
        for e, eta in enumerate(p.ngd_learning_rates):
            c = np.array([contraction(ngd[k, e], 0, s) for k in range(K)])
            theory = abs(1.0 - eta)
            entry["ngd"][f"{eta:g}"] = {
                "eta": float(eta),
                "contraction": float(c.mean()),
                "contraction_theory": theory,
                "relative_error": (float(abs(c.mean() - theory) / theory) if theory > 0
                                   else None),
                "final_loss": float(ngd[:, e, -1].mean()),
            }
            for k in range(K):
                rows.append({"width": w, "init": k, "method": "ngd", "eta": float(eta),
                             "contraction": float(c[k]), "final_loss": float(ngd[k, e, -1])})
        for k in range(K):
            rows.append({"width": w, "init": k, "method": "gd", "eta": lr,
                         "late_rate": contraction(gd[k], half, S),
                         "final_loss": float(gd[k, -1])})
            rows.append({"width": w, "init": k, "method": "sgd",
                         "final_loss": float(sgd[k, -1])})
        per_width[str(w)] = entry
    summary = {
        "experiment": NAME,
        "gd_learning_rate": lr,
        "sgd_learning_rate": (p.sgd_learning_rate if p.sgd_learning_rate is not None else lr),
        "sgd_batch_size": p.sgd_batch_size,
        "ngd_learning_rates": [float(e) for e in p.ngd_learning_rates],
        "rate_steps": s,
        "lambda_min_Hinf": float(ev[0]),
        "lambda_max_Hinf": float(ev[-1]),
        "gd_rate_predicted_Hinf": float(1.0 - lr * ev[0]),
        "per_width": per_width,
    }
    return summary, rows


def plot(results, summary, cfg_dict, fig_dir):
    import matplotlib.pyplot as plt

    widths = [int(w) for w in results["widths"]]
    etas = summary["ngd_learning_rates"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    ax, ax_r = axes
    wi = len(widths) - 1
    S = results["loss_gd"].shape[-1] - 1
    k = np.arange(S + 1)
    gd = np.asarray(results["loss_gd"][wi, 0], np.float64).mean(0)
    sgd = np.asarray(results["loss_sgd"][wi, 0], np.float64).mean(0)
    l0 = gd[0]
    floor = l0 * 1e-14
    ax.semilogy(k, np.maximum(gd, floor), color="k", lw=2, label=f"GD, eta = "
                f"{summary['gd_learning_rate']:g}")
    ax.semilogy(k, np.maximum(sgd, floor), color="tab:gray", lw=1.5,
                label=f"SGD, batch {summary['sgd_batch_size']}, eta = "
                f"{summary['sgd_learning_rate']:g}")
    ax.semilogy(k, l0 * (1.0 - summary["lambda_min_Hinf"] * summary["gd_learning_rate"])
                ** (2 * k), color="k", ls=":", lw=1,
                label="$(1-\\eta\\lambda_{min}(H^\\infty))^{2k}$")
    colors = plt.cm.plasma(np.linspace(0.0, 0.8, len(etas)))
    for e, eta in enumerate(etas):
        ngd = np.asarray(results["loss_ngd"][wi, 0, :, e], np.float64).mean(0)
        ax.semilogy(k, np.maximum(ngd, floor), color=colors[e], lw=1.8, label=f"NGD, eta = {eta:g}")
        if eta < 1:
            ax.semilogy(k, l0 * (1 - eta) ** (2 * k), color=colors[e], ls="--", lw=1)
    ax.set_ylim(floor, l0 * 3)
    ax.set_xlabel("iteration k")
    ax.set_ylabel("training loss")
    ax.set_title(f"width m = {widths[wi]} (dashed: $(1-\\eta)^{{2k}} L(0)$, i.e. "
                 "residual $\\propto(1-\\eta)^k$)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    pw = summary["per_width"]
    for e, eta in enumerate(etas):
        c = [pw[str(w)]["ngd"][f"{eta:g}"]["contraction"] for w in widths]
        ax_r.semilogx(widths, c, "o-", color=colors[e], label=f"NGD eta = {eta:g}")
        ax_r.axhline(abs(1 - eta), color=colors[e], ls="--", lw=1)
    ax_r.semilogx(widths, [pw[str(w)]["gd_late_rate"] for w in widths], "s-", color="k",
                  label="GD late rate")
    ax_r.semilogx(widths, [pw[str(w)]["gd_rate_predicted_H0"] for w in widths], "k:",
                  label="$1-\\eta\\lambda_{min}(H(0))$")
    ax_r.set_xlabel("width m")
    ax_r.set_ylabel("per-step residual contraction")
    ax_r.set_title("NGD's rate is $1-\\eta$ at every large width; GD's follows "
                   "$\\lambda_{min}(H)$", fontsize=9)
    ax_r.legend(fontsize=7)
    ax_r.grid(alpha=0.3, which="both")
    d = cfg_dict.get("data", {})
    fig.suptitle(f"NGD vs GD vs SGD (Zhang et al. 2019) on Du et al.'s two-layer ReLU net, "
                 f"n = {d.get('n_train')}, d = {d.get('dim')}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, fig_dir, NAME)


def check(cfg):
    check_two_layer(cfg, NAME)
    if len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"train.learning_rate: {NAME} uses one GD step size; sweep NGD's "
                          "with params.ngd_learning_rates")
    if cfg.params.sgd_batch_size > cfg.data.n_train:
        raise ConfigError(f"params.sgd_batch_size: {cfg.params.sgd_batch_size} is larger than "
                          f"data.n_train = {cfg.data.n_train}")


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot, unit_work=_units_work, check=check, main_figure=NAME))
