"""Lee et al. (NeurIPS 2020), "Finite Versus Infinite Neural Networks", on a small real set.

Test accuracy of infinite-width kernel regression (NNGP and NTK, Lee et al.
2020, section 2; the posterior mean ``K(x, X) K^-1 y`` and the NTK-GP mean of
the net trained for ever, Lee et al. 2019, eq. 16) next to finite MLPs of
several widths trained by GD or SGD on the mean squared error, in the NTK and
in the standard parameterization, as single nets and as ensembles (``+U``:
outputs averaged over ``train.inits`` initialisations), with and without
centring (``+C``: the model ``f(theta, x) - f(theta_0, x)``; trained exactly
as the raw net on the shifted targets ``y + f(theta_0, X)``, since the loss
``||f - f0 - y||^2`` is the same function of theta).

Targets: one-hot vectors centred to zero mean over the ``k`` classes,
``e_c - 1/k`` (``0.9 / -0.1`` for the 10 digits, as ``ntkexp.data`` builds
them); a dataset with several target columns is used as given (class =
argmax), one column of integers is read as class ids and encoded this way.
Inputs: ``params.preprocess`` (default ``standardize``: subtract the
training mean of each feature, then scale every input to norm ``sqrt(d)``).

Learning rates (``params.lr_mode: relative``, default): ``eta = learning_rate
/ lambda_max(Theta_0 / n)``, with ``lambda_max`` of the net's own empirical NTK
at initialisation (power iteration on ``J J^T``); the standard
parameterization's NTK grows with width, so its step shrinks like 1/width as
Lee et al. 2020 (section 3) prescribe. The infinite-width "NTK, t = T" column
uses the analytic NTK with the same relative rate and number of steps.

results.npz (W widths, K inits, V variants = parameterizations x centring,
m test points, k classes): ``test_out (W, 1, K, V, m, k)`` (centred variants
store ``f - f0``), ``test_acc``, ``eta``, ``final_loss (W, 1, K, V)``;
``limit_nngp_out``, ``limit_ntk_out``, ``limit_ntk_t_out`` ``(m, k)``,
``limit_labels (m,)``, ``limit_variants`` (``"ntk"`` / ``"ntk+C"`` ...).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.config import ConfigError
from ntkexp.experiments import streams
from ntkexp.experiments.base import Experiment, register_experiment
from ntkexp.experiments.common import (
    Task,
    build_ensemble,
    class_targets,  # noqa: F401  (re-exported for tests and plug-ins)
    ntk_lambda_max,
    per_member,
    preprocess,  # noqa: F401
    train_ensemble,
    variant_name,
    variants,
)
from ntkexp.models import ARCHITECTURES
from ntkexp.plotting import save_figure
from ntkexp.theory import kernel_regression, ntk_gp

NAME = "lee2020_finite_vs_infinite"


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``lee2020_finite_vs_infinite``.

    Attributes:
      parameterizations: ``ntk`` and/or ``standard`` (each width is trained in each).
      centering: which of raw (``false``) and centred (``true``) nets to train.
      preprocess: ``none``, ``center`` (subtract the training mean per feature) or
        ``standardize`` (center, then scale each input to norm ``sqrt(d)``).
      lr_mode: ``relative`` (``eta = learning_rate / lambda_max(Theta_0 / n)``) or
        ``absolute``.
      kernel_ridge: diagonal regulariser of kernel regression, relative to the
        mean diagonal of the kernel (a numerical jitter, not a tuned ridge).
      power_iterations: iterations of the power method for ``lambda_max``.
    """

    parameterizations: tuple[Literal["ntk", "standard"], ...] = dataclasses.field(
        default=("ntk", "standard"), metadata={"nonempty": True})
    centering: tuple[bool, ...] = dataclasses.field(default=(False, True),
                                                    metadata={"nonempty": True})
    preprocess: Literal["none", "center", "standardize"] = "standardize"
    lr_mode: Literal["relative", "absolute"] = "relative"
    kernel_ridge: float = dataclasses.field(default=1e-6, metadata={"min": 0.0})
    power_iterations: int = dataclasses.field(default=30, metadata={"min": 1})


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def _step(cfg, lam: float, n: int) -> float:
    lr = cfg.train.learning_rates[0]
    if cfg.params.lr_mode == "absolute":
        return float(lr)
    eff = lam / n if cfg.train.loss_reduction == "mean" else lam
    return float(lr / eff)


def _accuracy(out, labels) -> float:
    return float(np.mean(np.argmax(np.asarray(out), axis=1) == np.asarray(labels)))


def compute_unit(cfg, data, unit, progress):
    task = Task(cfg, data, NAME)
    base = cfg.model.spec(unit.width)
    n = task.x.shape[0]
    pkeys = streams.keys(cfg.seed, "power", unit.inits)
    outs = {k: [] for k in ("test_out", "test_acc", "eta", "final_loss")}
    for p, centred in variants(cfg):
        spec = dataclasses.replace(base, parameterization=p, out_dim=task.k)
        apply_fn, params = build_ensemble(cfg, unit, task.x.shape[1], task.dtype, spec=spec)
        lam = np.asarray(jax.vmap(lambda q, k, f=apply_fn: ntk_lambda_max(
            f, q, task.x, k, cfg.params.power_iterations))(params, pkeys), np.float64)
        eta = np.asarray([_step(cfg, float(v), n) for v in lam])
        f0_train = per_member(apply_fn, params, task.x)
        f0_test = per_member(apply_fn, params, task.x_test)
        y = task.y + f0_train if centred else task.y
        # run 0 for every variant: the same mini-batch order for all variants of an init
        res = train_ensemble(cfg, apply_fn, params, task.x, y, unit, progress,
                             learning_rate=eta, run=0, targets_per_member=centred)
        f = per_member(apply_fn, res.params, task.x_test)
        if centred:
            f = f - f0_test
        f = np.asarray(f)
        outs["test_out"].append(f)
        outs["test_acc"].append([_accuracy(fk, task.labels_test) for fk in f])
        outs["eta"].append(eta)
        outs["final_loss"].append(np.asarray(res.losses)[:, -1])
    return {k: np.stack([np.asarray(a) for a in v], axis=1) for k, v in outs.items()}


# --------------------------------------------------------------------------
# Infinite width
# --------------------------------------------------------------------------


def reference(cfg, data):
    task = Task(cfg, data, NAME)
    arch = ARCHITECTURES.get(cfg.model.arch)
    spec = dataclasses.replace(cfg.model.spec(cfg.model.widths[0]), parameterization="ntk",
                               out_dim=1)
    n = task.x.shape[0]
    k = arch.analytic(spec, jnp.concatenate([task.x, task.x_test]))
    res = {}
    for name in ("nngp", "ntk"):
        K = getattr(k, name)
        Ktr, Kte = K[:n, :n], K[n:, :n]
        ridge = cfg.params.kernel_ridge * float(jnp.mean(jnp.diag(Ktr)))
        res[f"{name}_out"] = np.asarray(kernel_regression(Kte, Ktr, task.y, ridge=ridge))
    Ktr = k.ntk[:n, :n] + cfg.params.kernel_ridge * jnp.mean(jnp.diag(k.ntk[:n, :n])) * \
        jnp.eye(n, dtype=k.ntk.dtype)
    lam = float(jnp.linalg.eigvalsh(Ktr)[-1])
    eta = _step(cfg, lam, n)
    mean, _ = ntk_gp(k.ntk[n:, :n], Ktr, k.nngp[n:, :n], k.nngp[:n, :n], k.nngp[n:, n:],
                     task.y, steps=cfg.train.steps, learning_rate=eta,
                     loss_reduction=cfg.train.loss_reduction)
    res["ntk_t_out"] = np.asarray(mean)
    res["ntk_t_eta"] = np.asarray(eta)
    res["labels"] = np.asarray(task.labels_test)
    res["variants"] = np.asarray([variant_name(p, c) for p, c in variants(cfg)])
    return res


# --------------------------------------------------------------------------
# Summary and figure
# --------------------------------------------------------------------------


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def summarize(cfg, results):
    labels = np.asarray(results["limit_labels"])
    names = [str(v) for v in results["limit_variants"]]
    mu_t = np.asarray(results["limit_ntk_t_out"], np.float64)
    kernels = {
        "NNGP": _accuracy(results["limit_nngp_out"], labels),
        "NTK": _accuracy(results["limit_ntk_out"], labels),
        "NTK, t = T": _accuracy(mu_t, labels),
    }
    k = int(mu_t.shape[1])
    table, rows = [], []
    per_width = {}
    for wi, w in enumerate(results["widths"]):
        out = np.asarray(results["test_out"][wi, 0], np.float64)     # (K, V, m, k)
        acc = np.asarray(results["test_acc"][wi, 0], np.float64)     # (K, V)
        K = out.shape[0]
        pw = {}
        for vi, name in enumerate(names):
            ens = out[:, vi].mean(0)
            entry = {
                "single": float(acc[:, vi].mean()),
                "single_sd": float(acc[:, vi].std(ddof=1)) if K > 1 else 0.0,
                "ensemble": _accuracy(ens, labels),
                "ensemble_size": K,
                "rel_dist_to_ntk_t_single": float(np.mean([_rel(out[j, vi], mu_t)
                                                           for j in range(K)])),
                "rel_dist_to_ntk_t_ensemble": _rel(ens, mu_t),
                "eta": float(np.asarray(results["eta"][wi, 0, :, vi]).mean()),
                "final_train_loss": float(np.asarray(results["final_loss"][wi, 0, :, vi]).mean()),
            }
            pw[name] = entry
            table.append({"model": f"MLP {name}", "width": int(w), "single": entry["single"],
                          "ensemble": entry["ensemble"]})
            for j in range(K):
                rows.append({"width": int(w), "variant": name, "init": j,
                             "test_acc": float(acc[j, vi]),
                             "rel_dist_to_ntk_t": _rel(out[j, vi], mu_t)})
        per_width[str(int(w))] = pw
    for name, a in kernels.items():
        table.append({"model": name, "width": "inf", "single": a, "ensemble": a})
    summary = {
        "experiment": NAME,
        "n_train": int(cfg.data.n_train),
        "n_test": int(labels.shape[0]),
        "classes": k,
        "chance": 1.0 / k,
        "steps": int(cfg.train.steps),
        "optimizer": cfg.train.optimizer,
        "batch_size": cfg.train.batch_size,
        "kernels": kernels,
        "per_width": per_width,
        "table": table,
        "table_markdown": table_markdown(results["widths"], names, per_width, kernels),
        "metric_definitions": (
            "test accuracy (argmax); single: mean over inits; ensemble: accuracy of the "
            "outputs averaged over inits; +C: centred net f - f0; rel_dist_to_ntk_t: "
            "||f - mu_T|| / ||mu_T|| on the test set, mu_T the NTK-GP mean after the same "
            "steps; see ntkexp.experiments.lee2020"),
    }
    return summary, rows


def table_markdown(widths, names, per_width, kernels) -> str:
    """The accuracy table: one row per width, ``single / ensemble`` per variant."""
    head = "| width | " + " | ".join(names) + " |"
    sep = "|---" * (len(names) + 1) + "|"
    lines = [head, sep]
    for w in widths:
        pw = per_width[str(int(w))]
        cells = [f"{pw[n]['single']:.3f} / {pw[n]['ensemble']:.3f}" for n in names]
        lines.append(f"| {int(w)} | " + " | ".join(cells) + " |")
    lines.append("| inf | " + " | ".join(
        f"NNGP {kernels['NNGP']:.3f}, NTK {kernels['NTK']:.3f}, NTK(T) {kernels['NTK, t = T']:.3f}"
        if i == 0 else "" for i in range(len(names))) + " |")
    return "\n".join(lines)


def plot(results, summary, cfg_dict, fig_dir):
    """Test accuracy against width per variant (single and ensemble), kernels as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [int(w) for w in results["widths"]]
    names = [str(v) for v in results["limit_variants"]]
    colors = ("tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:green", "tab:purple")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    ax = axes[0]
    for vi, name in enumerate(names):
        c = colors[vi % len(colors)]
        pw = [summary["per_width"][str(w)][name] for w in widths]
        ax.plot(widths, [e["single"] for e in pw], "o-", color=c, ms=4, lw=1.3,
                label=f"{name} single")
        ax.plot(widths, [e["ensemble"] for e in pw], "s--", color=c, ms=4, lw=1.0,
                label=f"{name} ensemble of {pw[0]['ensemble_size']}")
    for (name, a), ls in zip(summary["kernels"].items(), ("-", ":", "-."), strict=False):
        ax.axhline(a, color="k", ls=ls, lw=1.2, label=f"{name} kernel ({a:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy, finite vs infinite", fontsize=9)
    ax.legend(fontsize=6.5, ncol=2)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for vi, name in enumerate(names):
        c = colors[vi % len(colors)]
        pw = [summary["per_width"][str(w)][name] for w in widths]
        ax.plot(widths, [e["rel_dist_to_ntk_t_single"] for e in pw], "o-", color=c, ms=4,
                label=f"{name} single")
        ax.plot(widths, [e["rel_dist_to_ntk_t_ensemble"] for e in pw], "s--", color=c, ms=4,
                label=f"{name} ensemble")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel(r"$\|f - \mu_T\| / \|\mu_T\|$ on test inputs")
    ax.set_title("distance to the NTK-GP mean after the same steps", fontsize=9)
    ax.legend(fontsize=6.5, ncol=2)
    ax.grid(alpha=0.3)
    m = cfg_dict["model"]
    fig.suptitle(f"Lee et al. 2020, finite vs infinite: {m['arch']} depth {m['depth']} "
                 f"({m['activation']}), n = {summary['n_train']}, {summary['steps']} steps of "
                 f"{summary['optimizer']}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, fig_dir, NAME)


def check(cfg):
    if ARCHITECTURES.get(cfg.model.arch).analytic is None:
        raise ConfigError(f"model.arch: {NAME} needs an architecture with an analytic "
                          f"kernel, and {cfg.model.arch!r} has none")
    if len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"train.learning_rate: {NAME} needs one learning rate")
    if cfg.data.n_test < 1 and cfg.data.name != "npz":
        raise ConfigError(f"data.n_test: {NAME} measures test accuracy, so n_test must be > 0")


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot,
    unit_work=lambda cfg: max(cfg.train.steps, 1) * len(variants(cfg)),
    check=check, main_figure=NAME, readout_from_targets=True))
