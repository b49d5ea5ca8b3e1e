"""Figures drawn from saved run outputs only (``results.npz``, ``summary.json``,
``config.yaml``), so ``ntkexp plot RUN_DIR`` redraws without recomputing.

This module knows no experiment: it holds the drawing functions, each taking the
saved arrays, and an experiment's ``plot`` calls them; the runner's
:func:`ntkexp.experiments.plot_run` finds the run's experiment and calls its ``plot``.

Matplotlib runs on the non-interactive Agg backend. Each figure is saved as
``figures/<name>.png`` and ``.pdf``, each file written atomically.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from ntkexp import io  # noqa: E402

Z90 = 1.2815515655446004
_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def save_figure(fig, fig_dir: str, name: str, *, dpi: int = 150) -> list[str]:
    """Save ``fig`` as ``fig_dir/name.png`` and ``.pdf`` (atomically); close it."""
    os.makedirs(fig_dir, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = os.path.join(fig_dir, f"{name}.{ext}")
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _widths_title(cfg: dict) -> str:
    m = dict(cfg["model"])
    arch = m.pop("arch", "?")
    m.pop("width", None)
    if {"depth", "activation", "W_std", "b_std"} <= set(m):
        param = f", {m['parameterization']} param." if "parameterization" in m else ""
        return (f"{arch} depth {m['depth']} ({m['activation']}, W_std={m['W_std']:g}, "
                f"b_std={m['b_std']:g}{param})")
    keys = ", ".join(f"{k}={v}" for k, v in m.items() if not isinstance(v, (dict, list)))
    return f"{arch} ({keys})" if keys else str(arch)


def _limit_label(summary) -> str:
    lim = summary.get("limit") or {}
    if lim.get("method") == "monte_carlo":
        return f"Monte Carlo, n = {lim.get('width')}, {lim.get('samples')} inits"
    return "analytic"


def jacot_fig1_figure(results, summary, cfg, fig_dir) -> list[str]:
    """Jacot et al. (2018) Fig. 1: Theta(x0, x) over g for each (width, t), with the limit.

    Thin solid lines: the ``K`` initialisations at t = 0; thin dashed: at
    t = steps x lr; one colour per width; thick black: the analytic limit.
    """
    g = np.asarray(results["limit_gammas"])
    lim = np.asarray(results["limit_ntk"])
    widths = [int(w) for w in results["widths"]]
    t = summary["t"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for wi, w in enumerate(widths):
        c = _COLORS[wi % len(_COLORS)]
        k0 = np.asarray(results["ntk_init"][wi, 0])
        kt = np.asarray(results["ntk_trained"][wi, 0])
        for k in range(k0.shape[0]):
            ax.plot(g, k0[k], color=c, lw=0.8, alpha=0.7,
                    label=f"n = {w}, t = 0" if k == 0 else None)
            ax.plot(g, kt[k], color=c, lw=0.8, alpha=0.7, ls="--",
                    label=f"n = {w}, t = {t:g}" if k == 0 else None)
    ax.plot(g, lim, color="k", lw=2.2, label=r"$n \to \infty$ " + f"({_limit_label(summary)})")
    ax.set_xlabel(r"$\gamma$")
    ax.set_ylabel(r"$\Theta^{(L)}(x_0, x)$,  $x_0=(1,0)$, $x=(\cos\gamma, \sin\gamma)$")
    ax.set_xlim(-np.pi, np.pi)
    ax.set_xticks([-np.pi, -np.pi / 2, 0, np.pi / 2, np.pi],
                  [r"$-\pi$", r"$-\pi/2$", "0", r"$\pi/2$", r"$\pi$"])
    ax.set_title("NTK at init and after training (Jacot et al. 2018, Fig. 1)\n"
                 + _widths_title(cfg), fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return save_figure(fig, fig_dir, "jacot_fig1")


def jacot_fig2_figure(results, summary, cfg, fig_dir) -> list[str]:
    """Jacot et al. (2018) Fig. 2: trained functions on the circle and the limit's
    P10 / P50 / P90, training points marked."""
    g = np.asarray(results["limit_gammas"])
    mu, sd = np.asarray(results["limit_mean"]), np.asarray(results["limit_sd"])
    widths = [int(w) for w in results["widths"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for wi, w in enumerate(widths):
        c = _COLORS[wi % len(_COLORS)]
        f = np.asarray(results["f_trained"][wi, 0])
        for k in range(f.shape[0]):
            ax.plot(g, f[k], color=c, lw=0.8, alpha=0.6, label=f"n = {w}" if k == 0 else None)
    ax.plot(g, mu, color="k", lw=2,
            label=r"$n\to\infty$: $P_{50}$" + f" ({_limit_label(summary)})")
    ax.plot(g, mu - Z90 * sd, color="k", lw=1.3, ls="--", label=r"$P_{10}$, $P_{90}$")
    ax.plot(g, mu + Z90 * sd, color="k", lw=1.3, ls="--")
    xtr = np.asarray(results["limit_x_train"])
    ytr = np.asarray(results["limit_y_train"])
    ax.scatter(np.arctan2(xtr[:, 1], xtr[:, 0]), ytr, color="k", zorder=5, s=30,
               marker="o", label="training points")
    ax.set_xlabel(r"$\gamma$")
    ax.set_ylabel(r"$f(\cos\gamma, \sin\gamma)$")
    ax.set_xlim(-np.pi, np.pi)
    ax.set_xticks([-np.pi, -np.pi / 2, 0, np.pi / 2, np.pi],
                  [r"$-\pi$", r"$-\pi/2$", "0", r"$\pi/2$", r"$\pi$"])
    ax.set_title(f"Trained functions at t = {summary['t']:g} vs the limiting Gaussian "
                 "(Jacot et al. 2018, Fig. 2)\n" + _widths_title(cfg), fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, fig_dir, "jacot_fig2")


def kernel_convergence_figure(results, summary, cfg, fig_dir) -> list[str]:
    """Relative error of the empirical NTK at init vs width (log-log), each init a
    dot, the mean a line, the fitted slope and the theory's ``n^-1/2``; beside it,
    when the run trained, the relative kernel drift vs width."""
    widths = np.asarray(results["widths"], np.float64)
    lim = np.asarray(results["limit_ntk"], np.float64)
    k0 = np.asarray(results["ntk_init"][:, 0], np.float64)          # (W, K, n, n)
    err = (np.linalg.norm(k0 - lim, axis=(-2, -1)) / np.linalg.norm(lim))  # (W, K)
    trained = bool(summary.get("trained"))
    fig, axes = plt.subplots(1, 2 if trained else 1, figsize=(10 if trained else 5.5, 4.2))
    axes = np.atleast_1d(axes)

    def panel(ax, vals, slope, name):
        for k in range(vals.shape[1]):
            ax.scatter(widths, vals[:, k], color="tab:blue", s=12, alpha=0.5,
                       label="each init" if k == 0 else None)
        mean = vals.mean(axis=1)
        ax.plot(widths, mean, "o-", color="tab:blue", lw=1.8, label="mean over inits")
        if len(widths) > 1 and np.all(mean > 0):
            ref = mean[0] * (widths / widths[0]) ** summary["theory_slope"]
            ax.plot(widths, ref, "k--", lw=1, label=r"theory $\propto n^{-1/2}$")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(widths, [str(int(w)) for w in widths])
        ax.set_xlabel("width n")
        ax.set_ylabel(name)
        fit = f"fitted slope {slope:.2f}" if slope is not None else "one width: no slope"
        ax.set_title(fit, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)

    panel(axes[0], err, summary.get("slope_error"),
          r"$\|\Theta_n - \Theta_\infty\|_F / \|\Theta_\infty\|_F$ at init")
    if trained:
        kt = np.asarray(results["ntk_trained"][:, 0], np.float64)
        drift = np.linalg.norm(kt - k0, axis=(-2, -1)) / np.linalg.norm(k0, axis=(-2, -1))
        panel(axes[1], drift, summary.get("slope_drift"),
              r"$\|\Theta_t - \Theta_0\|_F / \|\Theta_0\|_F$" + f", t = {summary['t']:g}")
    fig.suptitle(f"Empirical NTK vs its limit ({_limit_label(summary)})\n"
                 + _widths_title(cfg), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, fig_dir, "kernel_convergence")
