"""Bietti & Mairal (NeurIPS 2019), "On the Inductive Bias of Neural Tangent
Kernels": the Mercer spectrum of the two-layer ReLU NTK on the sphere, and the
Lipschitz constant of the kernel map for smooth activations (Proposition 9).

Kernel (Bietti & Mairal 2019, section 3.2, eq. 9; no bias): on ``S^{p-1}``,
``K(x, y) = kappa(<x, y>)`` with

    kappa(u)  = u kappa_0(u) + kappa_1(u),
    kappa_0(u) = (pi - arccos u) / pi,
    kappa_1(u) = (u (pi - arccos u) + sqrt(1 - u^2)) / pi

(``kappa_1`` alone is the kernel of the last layer only, the arc-cosine
kernel of degree 1). Its Mercer eigenvalues ``mu_k`` (each of multiplicity
``N(p, k)``; normalisation of ``ntkexp.kernels.spectra.mercer_eigenvalues``,
uniform probability measure) satisfy, by the paper's Theorem 2 / Prop. 5:
``mu_0, mu_1 > 0``, ``mu_k = 0`` for odd ``k >= 3``, and ``mu_k ~ C(p) k^(-p)``
for even ``k`` (``k^(-p-2)`` for ``kappa_1``). For each ``p`` in ``params.dims``
the experiment computes ``mu_0..mu_{k_max}`` by quadrature and fits the decay
exponent on the even ``k`` in ``[k_fit_min, k_max]``.

Lipschitz constants (Bietti & Mairal 2019, Proposition 9): for a smooth
activation, ``||Phi(x) - Phi(y)|| <= L ||x - y||`` on the unit sphere with
``L = sqrt((g0 + g1) max(1, (2 g1 + g2) / (g0 + g1)))``,
``g_j = E[(sigma^(j)(u))^2]``, ``u ~ N(0, 1)``
(``ntkexp.kernels.spectra.lipschitz_constant_prop9``).

This kind has no training: the runner's single unit is empty and everything is
in ``reference`` (stored as ``limit_*`` in results.npz): ``limit_dims (P,)``,
``limit_mu_ntk``/``limit_mu_k1`` ``(P, k_max + 1)``, ``limit_gammas (A, 3)``,
``limit_lipschitz (A,)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ntkexp.activations import get_activation
from ntkexp.config import ConfigError
from ntkexp.experiments.base import Experiment, register_experiment
from ntkexp.kernels.spectra import (
    fit_decay_exponent,
    lipschitz_constant_prop9,
    mercer_eigenvalues,
    smoothness_gammas,
)
from ntkexp.plotting import save_figure

NAME = "bietti2019_spectrum"


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``bietti2019_spectrum``.

    Attributes:
      dims: ambient dimensions p (the sphere is S^{p-1}).
      k_max: largest degree k.
      k_fit_min: the decay exponent is fitted on even k in [k_fit_min, k_max].
      nodes: quadrature nodes (Gauss-Legendre in the angle).
      activations: smooth activations for Proposition 9, each
        ``{name: <registered activation>, params: {...}}``.
    """

    dims: tuple[int, ...] = dataclasses.field(default=(3, 4, 5, 6),
                                              metadata={"min": 2, "nonempty": True})
    k_max: int = dataclasses.field(default=128, metadata={"min": 4})
    k_fit_min: int = dataclasses.field(default=64, metadata={"min": 2})
    nodes: int = dataclasses.field(default=600, metadata={"min": 16})
    activations: tuple[dict[str, Any], ...] = (
        {"name": "exp", "params": {"shift": 1.0}},
        {"name": "exp", "params": {"shift": 2.0}},
        {"name": "softplus"},
    )

    def check(self):
        if self.k_fit_min > self.k_max - 4:
            raise ConfigError(f"k_fit_min: must be at most k_max - 4 = {self.k_max - 4} so "
                              f"the fit has >= 3 even degrees, got {self.k_fit_min}")
        for i, a in enumerate(self.activations):
            extra = set(a) - {"name", "params"}
            if "name" not in a or extra:
                raise ConfigError(f"activations: entry {i} must be {{name: ..., params: "
                                  f"{{...}}}}, got {dict(a)}")


def kappa0(u):
    """``(pi - arccos u) / pi`` (arc-cosine kernel of degree 0), ``u`` clipped to [-1, 1]."""
    u = np.clip(np.asarray(u, np.float64), -1.0, 1.0)
    return (np.pi - np.arccos(u)) / np.pi


def kappa1(u):
    """``(u (pi - arccos u) + sqrt(1 - u^2)) / pi`` (arc-cosine kernel of degree 1)."""
    u = np.clip(np.asarray(u, np.float64), -1.0, 1.0)
    return (u * (np.pi - np.arccos(u)) + np.sqrt(np.maximum(1.0 - u * u, 0.0))) / np.pi


def kappa_ntk(u):
    """Two-layer ReLU NTK on the sphere, ``u kappa_0(u) + kappa_1(u)`` (Bietti & Mairal eq. 9)."""
    u = np.clip(np.asarray(u, np.float64), -1.0, 1.0)
    return u * kappa0(u) + kappa1(u)


def activation_label(entry) -> str:
    p = dict(entry.get("params") or {})
    if entry["name"] == "exp":
        return f"exp(u - {p.get('shift', 0.0):g})"
    args = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
    return f"{entry['name']}({args})" if args else entry["name"]


def compute_unit(cfg, data, unit, progress):
    progress(len(unit.inits))
    return {}


def reference(cfg, data):
    p = cfg.params
    mu_ntk = np.stack([mercer_eigenvalues(kappa_ntk, d, p.k_max, nodes=p.nodes) for d in p.dims])
    mu_k1 = np.stack([mercer_eigenvalues(kappa1, d, p.k_max, nodes=p.nodes) for d in p.dims])
    gam, lip = [], []
    for a in p.activations:  # float64 expectations when the config says dtype: float64
        act = get_activation(a["name"], a.get("params"))
        gam.append(smoothness_gammas(act))
        lip.append(lipschitz_constant_prop9(act))
    return {"dims": np.asarray(p.dims), "mu_ntk": mu_ntk, "mu_k1": mu_k1,
            "gammas": np.asarray(gam, np.float64).reshape(-1, 3),
            "lipschitz": np.asarray(lip, np.float64)}


def summarize(cfg, results):
    p = cfg.params
    ks = np.arange(p.k_max + 1)
    fit_ks = ks[(ks >= p.k_fit_min) & (ks % 2 == 0)]
    per_dim, rows = {}, []
    for i, d in enumerate(np.asarray(results["limit_dims"])):
        mu = np.asarray(results["limit_mu_ntk"][i], np.float64)
        mu1 = np.asarray(results["limit_mu_k1"][i], np.float64)
        fit = fit_decay_exponent(fit_ks, mu[fit_ks])
        fit1 = fit_decay_exponent(fit_ks, mu1[fit_ks])
        odd = np.abs(mu[3::2]).max() / mu[0]
        per_dim[str(int(d))] = {
            "p": int(d),
            "mu_0": float(mu[0]), "mu_1": float(mu[1]), "mu_2": float(mu[2]),
            "max_odd_k3_over_mu0": float(odd),
            "decay_exponent_ntk": fit.exponent,
            "decay_exponent_ntk_theory": float(d),
            "decay_exponent_relative_error": abs(fit.exponent - d) / d,
            "decay_prefactor_ntk": fit.prefactor,
            "decay_exponent_kappa1": fit1.exponent,
            "decay_exponent_kappa1_theory": float(d + 2),
        }
        rows.append({"p": int(d), "exponent_ntk": fit.exponent, "exponent_kappa1": fit1.exponent,
                     "max_odd_over_mu0": float(odd)})
    lips = {}
    g = np.asarray(results["limit_gammas"], np.float64)
    for j, a in enumerate(p.activations):
        g0, g1, g2 = (float(v) for v in g[j])
        lips[activation_label(a)] = {
            "gamma_0": g0, "gamma_1": g1, "gamma_2": g2,
            "lipschitz_prop9": float(results["limit_lipschitz"][j]),
            "sqrt_2g1_plus_g2": float(np.sqrt(2 * g1 + g2)),
        }
        rows.append({"activation": activation_label(a),
                     "lipschitz_prop9": float(results["limit_lipschitz"][j])})
    summary = {"experiment": NAME, "k_max": p.k_max, "fit_range": [int(fit_ks[0]), p.k_max],
               "nodes": p.nodes, "per_dim": per_dim, "lipschitz": lips}
    return summary, rows


def plot(results, summary, cfg_dict, fig_dir):
    import matplotlib.pyplot as plt

    dims = [int(d) for d in results["limit_dims"]]
    K = results["limit_mu_ntk"].shape[1]
    ks = np.arange(K)
    ev = ks[(ks >= 2) & (ks % 2 == 0)]
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(dims)))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6),
                                  gridspec_kw={"width_ratios": [1.6, 1]})
    for i, d in enumerate(dims):
        mu = np.asarray(results["limit_mu_ntk"][i], np.float64)
        mu1 = np.asarray(results["limit_mu_k1"][i], np.float64)
        s = summary["per_dim"][str(d)]
        ax.loglog(ev, mu[ev] / mu[0], "o-", ms=2.5, color=colors[i], lw=1.2,
                  label=f"NTK, p = {d}: fitted slope -{s['decay_exponent_ntk']:.2f}")
        ax.loglog(ev, mu1[ev] / mu[0], ":", color=colors[i], lw=1.2)
        odd = ks[(ks >= 3) & (ks % 2 == 1)]
        ax.loglog(odd, np.maximum(np.abs(mu[odd]) / mu[0], 1e-30), "x", ms=3, color=colors[i],
                  alpha=0.6)
        k0 = summary["fit_range"][0]
        ax.loglog(ev[ev >= k0], s["decay_prefactor_ntk"] * ev[ev >= k0] ** (-float(d)) / mu[0],
                  "k--", lw=0.8)
    ax.axhline(1e-10, color="tab:red", lw=0.8, ls="-.")
    ax.text(2.2, 2e-10, "1e-10 (odd k >= 3 must lie below)", fontsize=7, color="tab:red")
    ax.set_xlabel("degree k")
    ax.set_ylabel("$\\mu_k / \\mu_0$")
    ax.set_title("Mercer eigenvalues of the two-layer ReLU NTK on $S^{p-1}$: even k (o), "
                 "odd k >= 3 (x, |mu_k|),\n"
                 "dotted: last layer only ($\\kappa_1$, ~$k^{-p-2}$); dashed: $C k^{-p}$",
                 fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3, which="both")
    lip = summary["lipschitz"]
    names = list(lip)
    y = np.arange(len(names))
    ax2.barh(y, [lip[n]["lipschitz_prop9"] for n in names], color="tab:blue",
             label="Prop. 9: $\\sqrt{(\\gamma_0+\\gamma_1)\\max(1, "
                   "(2\\gamma_1+\\gamma_2)/(\\gamma_0+\\gamma_1))}$")
    for j, n in enumerate(names):
        ax2.text(lip[n]["lipschitz_prop9"], j, f" {lip[n]['lipschitz_prop9']:.3f}",
                 va="center", fontsize=8)
    ax2.set_yticks(y, names)
    ax2.set_xlabel("Lipschitz constant of the kernel map on the sphere")
    ax2.set_title("Bietti & Mairal 2019, Prop. 9 (from $\\gamma_j = E[\\sigma^{(j)}(u)^2]$)",
                  fontsize=8)
    ax2.legend(fontsize=7, loc="lower right")
    ax2.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return save_figure(fig, fig_dir, NAME)


def check(cfg):
    if cfg.dtype != "float64":
        raise ConfigError(f"dtype: {NAME} needs float64 (odd coefficients are checked "
                          "against 1e-10 of mu_0 and gamma_j to many digits)")
    if len(cfg.model.widths) != 1 or cfg.train.inits != 1 or len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"{NAME} trains nothing: give one model.width, one learning rate "
                          "and train.inits: 1")


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot, check=check, unit_work=lambda cfg: 1, main_figure=NAME))
