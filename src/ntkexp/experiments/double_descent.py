"""Double descent in width, ending at the kernel limit (issue 22).

Two-layer ReLU networks ``f(x) = W_std / sqrt(w) * relu(W_std / sqrt(d) * x W0) W1``
(``model``: ``depth: 1``, no biases, NTK parameterization) on an MNIST-1D subset
(``data``: one-hot targets ``e_c - 1/k``, squared loss), for widths ``w`` from 1 to
far past the interpolation threshold:

* **random features** (the classic control: the first layer ``W0`` frozen at its
  initialisation, only ``W1`` learnt): gradient flow on the squared loss from
  ``W1 = 0`` converges to the minimum-norm least-squares readout, computed exactly
  here from the SVD of the feature matrix ``Phi (n, w)`` in float64 (no training
  loop; pseudo-inverse cutoff ``s > s_max max(n, w) eps``). It interpolates once
  its ``w k`` parameters reach the ``n k`` targets, at ``w = n`` (the
  threshold). The same SVD gives the ridge solution
  ``(Phi^T Phi + lambda I)^-1 Phi^T Y`` with ``lambda = params.ridge`` times the
  mean diagonal of ``Phi Phi^T``.
* **trained two-layer nets** (both layers, at ``params.trained_widths``): full-batch
  GD on the centred net ``f - f0`` (Lee et al. 2020's ``+C``: the limit is then the
  NTK regression itself, not plus a random initial function) for ``train.steps``
  steps at ``eta = train.learning_rate / lambda_max(Theta_0 / n)``; its threshold
  is ``w (d + k) = n k``. GD does not reach zero loss near the threshold within a
  CPU budget: the summary records each width's final training loss.

Infinite width (:func:`reference`): ridgeless NNGP regression (the random-feature
model's limit: ``Phi Phi^T / w -> NNGP / W_std^2``) and NTK regression (the trained
net's limit), from the analytic kernels, solved in float64 with the relative
jitter ``params.kernel_ridge`` (default ``1e-10``, "no ridge").

Averaging an ensemble of initialisations (Geiger et al. 2020, "Scaling description
of generalization with number of parameters in deep learning") removes the
variance that diverges at the threshold, and so does a small ridge.

results.npz (W widths, K inits, m test points, k classes): ``rf_test``,
``rf_ridge_test``, ``nn_test (W, 1, K, m, k)`` (NaN where not trained),
``rf_train_mse``, ``nn_train_loss (W, 1, K)``; ``limit_{nngp,ntk}_test (m, k)``,
``limit_nngp_ridge_test``, ``limit_y_test``, ``limit_labels_test``.

summary.json: per width the test error (mean over inits of the test MSE,
``mean_i ||f(x_i) - y_i||^2``) of single nets, its standard error over inits and
the ensemble's; ``peak_width`` and ``peak_test_error`` (random features, single),
``widest_test_error``, ``ntk_limit_test_error``, ``nngp_limit_test_error``,
``ensemble_peak_test_error`` (the ensemble's largest error), ``ridge_peak_test_error``,
``threshold_width``.
"""

from __future__ import annotations

import dataclasses
import math
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
    ntk_lambda_max,
    per_member,
    train_ensemble,
)
from ntkexp.models.analytic import analytic_kernel
from ntkexp.plotting import save_figure
from ntkexp.theory import kernel_regression

NAME = "double_descent"


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``double_descent``.

    Attributes:
      ridge: the ridge of the random-feature control, relative to the mean diagonal
        of ``Phi Phi^T`` (and of the NNGP kernel for its limit line).
      kernel_ridge: relative jitter of the ridgeless kernel regressions.
      trained_widths: widths at which two-layer nets are trained by GD (each must be
        one of ``model.width``; empty: random features only).
      preprocess: ``none``, ``center`` or ``standardize`` (training statistics).
      power_iterations: for ``lambda_max`` of the trained nets' NTK.
    """

    ridge: float = dataclasses.field(default=1e-2, metadata={"min": 0.0})
    kernel_ridge: float = dataclasses.field(default=1e-10, metadata={"min": 0.0})
    trained_widths: tuple[int, ...] = ()
    preprocess: Literal["none", "center", "standardize"] = "none"
    power_iterations: int = dataclasses.field(default=30, metadata={"min": 1})


def features(cfg, W0, x) -> np.ndarray:
    """Random features ``relu(W_std / sqrt(d) x W0) / sqrt(w)``: ``(n, w)`` float64
    (the hidden layer of ``ntkexp.models.mlp`` at depth 1 without biases, scaled so
    that ``Phi Phi^T`` tends to the NNGP kernel over ``W_std^2``)."""
    x = np.asarray(x, np.float64)
    W0 = np.asarray(W0, np.float64)
    z = cfg.model.W_std / math.sqrt(x.shape[1]) * (x @ W0)
    return np.maximum(z, 0.0) / math.sqrt(W0.shape[1])


def min_norm_fit(phi, phi_test, y, ridges=(0.0,)):
    """Minimum-norm least-squares (``ridge = 0``: the pseudo-inverse, the gradient
    flow limit from a zero readout) and ridge readouts of the features ``phi (n, w)``.

    Returns ``[(test predictions (m, k), train predictions (n, k)) per ridge]``; a
    ridge is absolute (on ``Phi^T Phi``).

    For ``w >= 2 n`` the SVD comes from the eigendecomposition of the Gram matrix
    ``Phi Phi^T = U S^2 U^T`` (``n^2 w`` flops in a matmul instead of a slow wide SVD;
    the Gram is then well conditioned, so squaring loses no accuracy that matters),
    with ``Phi_test V = Phi_test Phi^T U S^-1``."""
    n, w = phi.shape
    eps = np.finfo(np.float64).eps
    if w >= 2 * n:
        lam, U = np.linalg.eigh(phi @ phi.T)
        lam, U = lam[::-1], U[:, ::-1]
        keep = lam > lam[0] * (max(n, w) * eps) ** 2 * 1e6
        U, s = U[:, keep], np.sqrt(lam[keep])
        tv = (phi_test @ phi.T) @ U / s
    else:
        U, s, Vh = np.linalg.svd(phi, full_matrices=False)
        keep = s > s.max() * max(n, w) * eps
        U, s, Vh = U[:, keep], s[keep], Vh[keep]
        tv = phi_test @ Vh.T
    uy = U.T @ np.asarray(y, np.float64)
    out = []
    for lam in ridges:
        g = 1.0 / s if lam == 0 else s / (s * s + lam)
        out.append((tv @ (g[:, None] * uy), U @ ((s * g)[:, None] * uy)))
    return out


def _test_mse(f, y) -> np.ndarray:
    """``mean_i ||f_i - y_i||^2`` over the last two axes."""
    d = np.asarray(f, np.float64) - np.asarray(y, np.float64)
    return np.mean(np.sum(d * d, axis=-1), axis=-1)


def _train_nets(cfg, task, unit, progress):
    """GD on the centred two-layer nets of ``unit``: test outputs ``(K, m, k)`` of
    ``f - f0`` and the final training losses ``(K,)``."""
    apply_fn, params = build_ensemble(cfg, unit, task.x.shape[1], task.dtype)
    n = task.x.shape[0]
    lam = np.asarray([float(ntk_lambda_max(apply_fn, jax.tree_util.tree_map(
        lambda a, i=i: a[i], params), task.x, streams.key(cfg.seed, "power", init),
        cfg.params.power_iterations)) for i, init in enumerate(unit.inits)])
    lr = unit.learning_rate
    eta = lr / (lam / n) if cfg.train.loss_reduction == "mean" else lr / lam
    f0 = per_member(apply_fn, params, task.x)            # (K, n, k)
    f0_test = per_member(apply_fn, params, task.x_test)
    y = jnp.asarray(task.y)[None] + f0
    res = train_ensemble(cfg, apply_fn, params, task.x, y, unit, progress,
                         learning_rate=eta, targets_per_member=True)
    f = np.asarray(per_member(apply_fn, res.params, task.x_test) - f0_test)
    return f, np.asarray(res.losses)[:, -1]


def compute_unit(cfg, data, unit, progress):
    task = Task(cfg, data, NAME)
    K = len(unit.inits)
    y = np.asarray(task.y, np.float64)
    m, k = task.x_test.shape[0], task.k
    apply_fn, params = build_ensemble(cfg, unit, task.x.shape[1], task.dtype)
    W0 = np.asarray(params["layers"][0]["W"])             # (K, d, w)
    rf, rfr = np.empty((K, m, k)), np.empty((K, m, k))
    rf_train = np.empty(K)
    for i in range(K):
        phi = features(cfg, W0[i], task.x)
        phi_t = features(cfg, W0[i], task.x_test)
        lam = cfg.params.ridge * float(np.mean(np.sum(phi * phi, 1)))
        (ft, ftr), (fr, _) = min_norm_fit(phi, phi_t, y, (0.0, lam))
        rf[i], rfr[i] = ft, fr
        rf_train[i] = float(_test_mse(ftr, y))
        progress(1)
    nn = np.full((K, m, k), np.nan)
    nn_loss = np.full(K, np.nan)
    if unit.width in cfg.params.trained_widths:
        steps = max(cfg.train.steps, 1)
        nn, nn_loss = _train_nets(cfg, task, unit, lambda s: progress(s / steps))
    else:
        progress(K)
    return {"rf_test": rf, "rf_ridge_test": rfr, "rf_train_mse": rf_train,
            "nn_test": nn, "nn_train_loss": nn_loss}


def reference(cfg, data):
    task = Task(cfg, data, NAME)
    spec = cfg.model.spec(1)
    x, xt = np.asarray(task.x, np.float64), np.asarray(task.x_test, np.float64)
    ktr, kte = analytic_kernel(spec, x), analytic_kernel(spec, xt, x)
    y = np.asarray(task.y, np.float64)
    res = {}
    for name in ("nngp", "ntk"):
        K, Kt = np.asarray(getattr(ktr, name), np.float64), np.asarray(getattr(kte, name),
                                                                         np.float64)
        scale = float(np.mean(np.diag(K)))
        res[f"{name}_test"] = np.asarray(kernel_regression(
            Kt, K, y, ridge=cfg.params.kernel_ridge * scale), np.float64)
        if name == "nngp":
            res["nngp_ridge_test"] = np.asarray(kernel_regression(
                Kt, K, y, ridge=cfg.params.ridge * scale), np.float64)
    res["y_test"] = np.asarray(task.y_test, np.float64)
    res["labels_test"] = np.asarray(task.labels_test)
    return res


def _err(f, labels) -> float:
    return float(np.mean(np.argmax(f, -1) != labels))


def summarize(cfg, results):
    yt = np.asarray(results["limit_y_test"], np.float64)
    labels = np.asarray(results["limit_labels_test"])
    widths = [int(w) for w in results["widths"]]
    n, d, k = int(cfg.data.n_train), int(cfg.data.dim), yt.shape[1]
    per_width, rows = {}, []
    curves = {key: [] for key in ("rf", "rf_se", "rf_ens", "rf_ridge", "nn", "nn_se",
                                  "nn_ens")}
    for wi, w in enumerate(widths):
        e = {}
        for key, name in (("rf_test", "rf"), ("rf_ridge_test", "rf_ridge"), ("nn_test", "nn")):
            f = np.asarray(results[key][wi, 0], np.float64)      # (K, m, k)
            if np.all(np.isnan(f)):
                e[name] = None
                continue
            errs = _test_mse(f, yt)
            K = len(errs)
            e[name] = {"test_error": float(errs.mean()),
                       "test_error_se": float(errs.std(ddof=1) / np.sqrt(K)) if K > 1 else 0.0,
                       "ensemble_test_error": float(_test_mse(f.mean(0), yt)),
                       "test_class_error": float(np.mean([_err(fi, labels) for fi in f])),
                       "ensemble_class_error": _err(f.mean(0), labels), "inits": K}
            for j, v in enumerate(errs):
                rows.append({"width": w, "model": name, "init": j, "test_error": float(v)})
        e["rf_train_mse"] = float(np.mean(results["rf_train_mse"][wi, 0]))
        nl = np.asarray(results["nn_train_loss"][wi, 0], np.float64)
        e["nn_final_train_loss"] = None if np.all(np.isnan(nl)) else float(np.nanmean(nl))
        per_width[str(w)] = e
        curves["rf"].append(e["rf"]["test_error"])
        curves["rf_se"].append(e["rf"]["test_error_se"])
        curves["rf_ens"].append(e["rf"]["ensemble_test_error"])
        curves["rf_ridge"].append(e["rf_ridge"]["test_error"])
    rf = np.asarray(curves["rf"])
    ip = int(np.argmax(rf))
    ntk_err = float(_test_mse(results["limit_ntk_test"], yt))
    nngp_err = float(_test_mse(results["limit_nngp_test"], yt))
    widest = widths[-1]
    se_w = curves["rf_se"][-1]
    trained = {w: per_width[str(w)]["nn"] for w in widths if per_width[str(w)]["nn"]}
    summary = {
        "experiment": NAME, "n_train": n, "n_test": int(yt.shape[0]), "classes": k,
        "dim": d, "inits": int(np.asarray(results["rf_test"]).shape[2]),
        "threshold_width": n,
        "threshold_width_trained": n * k / (d + k),
        "peak_width": widths[ip],
        "peak_over_threshold": widths[ip] / n,
        "peak_test_error": float(rf[ip]),
        "peak_test_error_se": float(curves["rf_se"][ip]),
        "widest_width": widest,
        "widest_test_error": float(rf[-1]),
        "widest_test_error_se": float(se_w),
        "widest_ensemble_test_error": float(curves["rf_ens"][-1]),
        "ntk_limit_test_error": ntk_err,
        "nngp_limit_test_error": nngp_err,
        "nngp_ridge_limit_test_error": float(_test_mse(results["limit_nngp_ridge_test"], yt)),
        "widest_minus_nngp_in_se": float((rf[-1] - nngp_err) / se_w) if se_w > 0 else None,
        "widest_minus_ntk_in_se": float((rf[-1] - ntk_err) / se_w) if se_w > 0 else None,
        "ensemble_peak_test_error": float(np.max(curves["rf_ens"])),
        "ensemble_at_peak_width_test_error": float(curves["rf_ens"][ip]),
        "ridge_peak_test_error": float(np.max(curves["rf_ridge"])),
        "ntk_limit_class_error": _err(results["limit_ntk_test"], labels),
        "nngp_limit_class_error": _err(results["limit_nngp_test"], labels),
        "ridge": cfg.params.ridge,
        "per_width": per_width,
        "metric_definitions": (
            "test_error: mean over test points of ||f(x) - y||^2 (one-hot targets "
            "e_c - 1/k), averaged over inits (se: over inits); ensemble: of the "
            "init-averaged outputs; rf: random features (min-norm readout, exact); nn: "
            "two-layer net trained by GD (centred f - f0); see "
            "ntkexp.experiments.double_descent"),
    }
    if trained:
        tw = sorted(trained)
        summary["trained_widest_width"] = tw[-1]
        summary["trained_widest_test_error"] = trained[tw[-1]]["test_error"]
        summary["trained_widest_test_error_se"] = trained[tw[-1]]["test_error_se"]
        summary["trained_peak_width"] = max(tw, key=lambda w: trained[w]["test_error"])
        summary["trained_peak_test_error"] = max(t["test_error"] for t in trained.values())
    return summary, rows


def plot(results, summary, cfg_dict, fig_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pw = summary["per_width"]
    widths = [int(w) for w in results["widths"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    rf = np.asarray([pw[str(w)]["rf"]["test_error"] for w in widths])
    se = np.asarray([pw[str(w)]["rf"]["test_error_se"] for w in widths])
    ax.errorbar(widths, rf, yerr=se, fmt="o-", color="tab:blue", ms=3.5, capsize=2,
                label="random features (min-norm), single")
    ax.plot(widths, [pw[str(w)]["rf"]["ensemble_test_error"] for w in widths], "s--",
            color="tab:blue", ms=3.5,
            label=f"random features, ensemble of {summary['inits']}")
    ax.plot(widths, [pw[str(w)]["rf_ridge"]["test_error"] for w in widths], "^:",
            color="tab:green", ms=3.5, label=f"random features, ridge {summary['ridge']:g}")
    tw = [w for w in widths if pw[str(w)]["nn"]]
    if tw:
        ax.errorbar(tw, [pw[str(w)]["nn"]["test_error"] for w in tw],
                    yerr=[pw[str(w)]["nn"]["test_error_se"] for w in tw], fmt="D-",
                    color="tab:red", ms=3.5, capsize=2, label="two-layer net, GD (centred)")
        ax.axvline(summary["threshold_width_trained"], color="tab:red", ls=":", lw=1,
                   label="threshold, trained net: w (d + k) = n k")
    ax.axhline(summary["ntk_limit_test_error"], color="k", lw=1.2,
               label=f"NTK regression ({summary['ntk_limit_test_error']:.3f})")
    ax.axhline(summary["nngp_limit_test_error"], color="k", ls="--", lw=1.2,
               label=f"NNGP regression ({summary['nngp_limit_test_error']:.3f})")
    ax.axvline(summary["threshold_width"], color="tab:blue", ls=":", lw=1,
               label="threshold, random features: w = n")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width w (hidden units)")
    ax.set_ylabel("test MSE")
    ax.set_title(f"Double descent in width, MNIST-1D n = {summary['n_train']}", fontsize=10)
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, fig_dir, NAME)


def check(cfg):
    m = cfg.model
    if m.arch != "mlp" or m.depth != 1:
        raise ConfigError(f"model: {NAME} uses two-layer nets (arch: mlp, depth: 1), got "
                          f"arch {m.arch!r}, depth {m.depth}")
    if m.activation != "relu" or m.b_std != 0 or m.parameterization != "ntk":
        raise ConfigError(f"model: {NAME} needs activation relu, b_std 0 and "
                          "parameterization ntk (the random features have no bias)")
    if not m.W_std > 0:
        raise ConfigError(f"model.W_std: {NAME} needs W_std > 0 (W_std = 0 gives zero "
                          f"features and a zero kernel), got {m.W_std}")
    if len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"train.learning_rate: {NAME} needs one learning rate")
    if cfg.data.n_test < 1:
        raise ConfigError(f"data.n_test: {NAME} measures test error; n_test must be > 0")
    bad = [w for w in cfg.params.trained_widths if w not in m.widths]
    if bad:
        raise ConfigError(f"params.trained_widths: {bad} not in model.width")


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot, check=check, main_figure=NAME,
    unit_work=lambda cfg: 2))
