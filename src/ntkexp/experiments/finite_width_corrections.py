"""Finite-width corrections at initialisation: NTK fluctuations and the four-point vertex
(issue 22).

For every hidden width ``n`` (``model.width``, one runner unit each, its
``train.inits`` initialisations as one ensemble), every depth ``d``
(``params.depths``: the number of hidden layers, all of width ``n``) and every
activation of ``params.activations`` at its criticality (``relu``: ``C_W = 2``;
``tanh``: ``C_W = 1``; biases zero, ``W_std = sqrt(C_W)``), one input ``x``
(``data.x_train[0]``) goes through each initialisation, and one reverse pass gives:

* the NTK diagonal ``K(x, x) = sum over weights (df/dW)^2``, split per layer
  (``ntk_layers``: the squared gradient norm of each weight matrix in the NTK
  parameterization, ``z = W_std / sqrt(n_in) W a``, ``W ~ N(0, 1)``). No Jacobian
  is formed: for one input and a scalar output the diagonal is the squared norm
  of the parameter gradient (the jvp/structured path's ``Theta(x, x)``; the test
  checks it against ``ntkexp.empirical.empirical_ntk(method="structured")``).
  The biases are parameters set to zero (``df/db_l`` is layer ``l``'s backward
  vector). The default kernel (``params.ntk_weighting: weights_biases``) sums
  the weights in the NTK normalisation and the biases, which is Hanin & Nica's
  ``K_N`` if the net is written in the NTK normalisation (mean O(1) per layer);
  ``weights`` drops the biases; ``standard`` (the config's choice) takes the
  gradients of the He-parameterized weights ``W ~ N(0, 2 / n_in)`` as Hanin &
  Nica write the net, ``n_{l-1} / C_W`` times the NTK-normalised ones, plus the
  biases. The summary reports the coefficient for all three.
* the conditional variance of the output ``G_hat = C_W / n sum_j sigma(z_j)^2``
  (``ghat``): the squared gradient norm of the readout weights, since
  ``df/dW_out = W_std / sqrt(n) sigma(z)``. Its normalised variance is the
  four-point vertex ``V / (n G^2)`` of Roberts, Yaida & Hanin (2022)
  (:mod:`ntkexp.kernels.finite_width`).

Theory (:mod:`ntkexp.kernels.finite_width`): ``log E[K^2]/E[K]^2 = 5 beta`` to
first order, ``beta = d / n`` (Hanin & Nica 2019, Thm. 1), and the vertex from the
leading-order recursion, slope 5 (ReLU) and 2/3 asymptotically (tanh) in ``d / n``.

results.npz (W widths, K inits, A activations, D depths, Dmax = max depth):
``ntk_layers (W, 1, K, A, D, Dmax + 1, 2)`` (weights, biases; NaN past layer ``d``), ``ghat``,
``output (W, 1, K, A, D)``; ``limit_vertex_<act> (Dmax + 2,)`` (the recursion's
``V / G^2`` at layers ``1 .. Dmax + 1``), ``limit_slope_<act>`` (asymptotic).

summary.json: ``fluctuation_coefficient_relu`` (theory 5) with
``fluctuation_coefficient_relu_ci`` (95% percentile bootstrap), fitted through the
origin over the cells with ``beta <= params.fit_beta_max``; ``vertex_slope_relu``,
``vertex_slope_tanh`` with ``_ci``, ``_theory`` (asymptotic slope of the
recursion), ``_theory_cells`` (the recursion at the same cells, fitted the same
way) and ``_consistent`` (whether ``_theory_cells`` lies in the interval); per-cell
values in ``cells`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.config import ConfigError
from ntkexp.experiments import streams
from ntkexp.experiments.base import Experiment, register_experiment
from ntkexp.kernels.finite_width import (
    bootstrap_fit,
    fit_linear,
    fit_through_origin,
    moment_ratio,
    normalized_variance,
    ntk_sum_coefficient,
    relu_output_vertex_exact,
    vertex_recursion,
    vertex_slope,
)
from ntkexp.models import ARCHITECTURES
from ntkexp.models.mlp import MLPSpec
from ntkexp.plotting import save_figure

NAME = "finite_width_corrections"
#: ``C_W`` at criticality, zero bias (PDLT sec. 5.2: ReLU's scale-invariant class at
#: ``C_W = 2``; tanh's ``K* = 0`` class at ``C_W = 1``).
CRITICAL_CW = {"relu": 2.0, "tanh": 1.0}
THEORY_FLUCTUATION = 5.0


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``finite_width_corrections``.

    Attributes:
      depths: numbers of hidden layers (all of width ``model.width``).
      activations: ``relu`` and/or ``tanh``, each at its critical ``C_W``.
      ntk_weighting: which parameters the NTK sums (:func:`ntk_diagonal`; default
        ``weights_biases``, Hanin & Nica's kernel).
      fluctuation_fit: ``slope``: ``log ratio = c beta + a / n`` (``c`` the growth
        per hidden layer, ``a`` the O(1/n) end effects of the first and last layers,
        which the theorem's ``exp(5 beta)`` leaves in its error term); ``origin``:
        ``log ratio = c beta``.
      fit_beta_max: cells with ``beta = d / n`` up to this enter the fit of the
        fluctuation coefficient (the ratio's estimator has a relative variance of
        about ``exp(20 beta) / K`` for log-normal ``K``: large ``beta`` cannot be
        resolved with a few thousand inits).
      vertex_fit_max: cells with ``d / n`` up to this enter the vertex fits (the
        theory is first order in ``d / n``).
      bootstrap: bootstrap resamples.
      chunk_bytes: parameter memory per vmapped batch of members.
    """

    depths: tuple[int, ...] = dataclasses.field(default=(1, 2, 4, 8, 16),
                                                metadata={"min": 1, "nonempty": True})
    activations: tuple[Literal["relu", "tanh"], ...] = dataclasses.field(
        default=("relu", "tanh"), metadata={"nonempty": True})
    ntk_weighting: Literal["weights_biases", "weights", "standard"] = "weights_biases"
    fluctuation_fit: Literal["slope", "origin"] = "slope"
    fit_beta_max: float = dataclasses.field(default=0.25, metadata={"min": 0.0})
    vertex_fit_max: float = dataclasses.field(default=0.25, metadata={"min": 0.0})
    bootstrap: int = dataclasses.field(default=1000, metadata={"min": 10})
    chunk_bytes: int = dataclasses.field(default=256 * 2 ** 20, metadata={"min": 1})


def make_spec(activation: str, depth: int, width: int):
    """The critical MLP of ``activation`` (NTK parameterization) with bias parameters of
    multiplier 1 (``z = W_std / sqrt(n_in) W a + b``): :func:`cell_stats` sets them to
    zero, so the forward pass is the zero-bias net and ``df/db_l`` is the backward
    vector of layer ``l`` (the bias part of Hanin & Nica's kernel)."""
    return MLPSpec(depth=int(depth), width=int(width), activation=activation,
                   W_std=math.sqrt(CRITICAL_CW[activation]), b_std=1.0,
                   parameterization="ntk", out_dim=1)


def draw_params(template, key, depth: int):
    """One member's parameters in ``template``'s layout: weights ``N(0, 1)`` from
    ``key`` (split per layer), biases zero."""
    layers = template["layers"]
    ks = jax.random.split(key, depth + 1)
    return {"layers": {i: {"W": jax.random.normal(ks[i], layers[i]["W"].shape,
                                                  layers[i]["W"].dtype),
                           "b": jnp.zeros_like(layers[i]["b"])}
                       for i in range(depth + 1)}}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk_stats(apply_fn, depth: int, keys, x, template):
    """Per member: squared gradient norms of each layer's weights and biases
    ``(C, depth + 1, 2)``, and the output ``(C,)``; member ``c``'s weights are
    ``N(0, 1)`` from ``keys[c]``, its biases zero."""
    def one(k):
        p = draw_params(template, k, depth)
        f, g = jax.value_and_grad(lambda q: apply_fn(q, x[None, :])[0, 0])(p)
        sq = jnp.stack([jnp.stack([jnp.sum(g["layers"][i]["W"] ** 2),
                                   jnp.sum(g["layers"][i]["b"] ** 2)])
                        for i in range(depth + 1)])
        return sq, f

    return jax.vmap(one)(keys)


def cell_stats(cfg, activation: str, a_index: int, depth: int, d_index: int, width: int,
               inits, x, progress=lambda n: None):
    """``(layer squared gradient norms (K, depth + 1, 2), outputs (K,))`` of the
    initialisations ``inits`` of one (activation, depth, width) cell.

    Member ``i``'s key is ``init`` stream ``(i, a_index, d_index)``, so a member's
    numbers do not depend on the other members computed with it."""
    spec = make_spec(activation, depth, width)
    apply_fn, template = ARCHITECTURES.get("mlp").build(spec, x.shape[0],
                                                        jax.random.PRNGKey(0), x.dtype)
    nbytes = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(template))
    nbytes *= np.dtype(x.dtype).itemsize * 3  # parameters, gradient, temporaries
    chunk = int(max(1, min(len(inits), cfg.params.chunk_bytes // max(nbytes, 1))))
    keys = streams.keys(cfg.seed, "init", inits, a_index, d_index)
    sqs, outs = [], []
    for s in range(0, len(inits), chunk):
        k = keys[s:s + chunk]
        m = k.shape[0]
        if m < chunk:  # pad to one compiled shape
            k = jnp.concatenate([k, jnp.repeat(k[-1:], chunk - m, axis=0)])
        sq, f = _chunk_stats(apply_fn, int(depth), k, x, template)
        sqs.append(np.asarray(sq[:m]))
        outs.append(np.asarray(f[:m]))
        progress(m)
    return np.concatenate(sqs), np.concatenate(outs)


def compute_unit(cfg, data, unit, progress):
    x = jnp.asarray(data.x_train[0])
    p = cfg.params
    K, A, D, dmax = len(unit.inits), len(p.activations), len(p.depths), max(p.depths)
    layers = np.full((K, A, D, dmax + 1, 2), np.nan)
    ghat = np.full((K, A, D), np.nan)
    out = np.full((K, A, D), np.nan)
    for ai, act in enumerate(p.activations):
        for di, d in enumerate(p.depths):
            sq, f = cell_stats(cfg, act, ai, d, di, unit.width, unit.inits, x, progress)
            layers[:, ai, di, :d + 1] = sq
            ghat[:, ai, di] = sq[:, d, 0]
            out[:, ai, di] = f
    return {"ntk_layers": layers, "ghat": ghat, "output": out}


def _g1(activation: str, x) -> float:
    """First-layer kernel ``G^(1) = C_W |x|^2 / n_0`` (zero bias)."""
    x = np.asarray(x, np.float64)
    return CRITICAL_CW[activation] * float(x @ x) / x.shape[0]


def reference(cfg, data):
    x = np.asarray(data.x_train[0])
    res = {}
    for act in cfg.params.activations:
        _, r = vertex_recursion(act, CRITICAL_CW[act], 0.0, _g1(act, x),
                                max(cfg.params.depths) + 1)
        res[f"vertex_{act}"] = r
        res[f"slope_{act}"] = np.asarray(vertex_slope(act, CRITICAL_CW[act], 0.0,
                                                      _g1(act, x)))
    return res


def ntk_diagonal(layers, depth: int, width: int, in_dim: int, c_w: float,
                 weighting: str) -> np.ndarray:
    """The NTK diagonal from per-layer squared gradient norms ``(..., Dmax + 1, 2)``
    (weights, biases):

    * ``weights_biases``: weights in the NTK normalisation plus biases (Hanin & Nica
      2019, whose mean is ``E K = sum_l (1/2 ... )``-type, O(1) per layer);
    * ``weights``: the weights only, NTK normalisation;
    * ``standard``: the weights of the He parameterization, ``n_{l-1} / C_W`` times
      the NTK-normalised ones, plus the biases (Hanin & Nica's ``K_N`` for a net
      written with ``W ~ N(0, 2 / n_in)``; the biases are O(1/n) of it).
    """
    sq = np.asarray(layers, np.float64)[..., :depth + 1, :]
    if weighting == "weights_biases":
        return sq.sum((-2, -1))
    if weighting == "weights":
        return sq[..., 0].sum(-1)
    fan_in = np.asarray([in_dim] + [width] * depth, np.float64)
    return (sq[..., 0] * fan_in / c_w).sum(-1) + sq[..., 1].sum(-1)


def _fluctuation_summary(cfg, results, ntk_samples, mid_samples, betas, inv_widths):
    """The ReLU NTK fluctuation fits (see :func:`summarize`)."""
    p = cfg.params
    widths = [int(w) for w in results["widths"]]
    in_dim = int(cfg.data.dim)
    summary = {}
    ri = list(p.activations).index("relu")
    b = np.asarray(betas)
    inv_n = np.asarray(inv_widths)
    mask = b <= p.fit_beta_max
    X = np.stack([b, inv_n], 1) if p.fluctuation_fit == "slope" else b
    c, ci, _ = bootstrap_fit(np.stack(ntk_samples), X, moment_ratio, np.log, mask,
                             resamples=p.bootstrap, seed=cfg.seed)
    summary["fluctuation_origin_fit_relu"] = fit_through_origin(
        b, np.log(moment_ratio(np.stack(ntk_samples))), mask)
    other = {}
    for wname in ("weights_biases", "weights", "standard"):
        ks = [ntk_diagonal(np.asarray(results["ntk_layers"][wi, 0], np.float64)[:, ri, di],
                           d, w, in_dim, CRITICAL_CW["relu"], wname)
              for wi, w in enumerate(widths) for di, d in enumerate(p.depths)]
        other[wname] = float(fit_linear(X, np.log(moment_ratio(np.stack(ks))), mask)[0])
    summary["fluctuation_coefficient_by_weighting"] = other
    cm, cmi, _ = bootstrap_fit(np.stack(mid_samples), X, moment_ratio, np.log, mask,
                               resamples=p.bootstrap, seed=cfg.seed + 2)
    summary["fluctuation_coefficient_relu_mid_layer"] = cm
    summary["fluctuation_coefficient_relu_mid_layer_ci"] = list(cmi)
    th = ntk_sum_coefficient("relu", CRITICAL_CW["relu"])
    summary["fluctuation_coefficient_sum_derived"] = th["sum"]
    summary["fluctuation_coefficient_mid_layer_derived"] = th["single_mid"]
    summary["fluctuation_derived_moments"] = {k: th[k] for k in ("v_f", "v_b", "c")}
    summary.update(fluctuation_coefficient_relu=c, fluctuation_coefficient_relu_ci=list(ci),
                   fluctuation_coefficient_theory=THEORY_FLUCTUATION,
                   fluctuation_fit_cells=int(mask.sum()),
                   fluctuation_fit=p.fluctuation_fit)
    return summary


def _vertex_summary(cfg, results, per_act):
    """The four-point vertex fits per activation (see :func:`summarize`)."""
    p = cfg.params
    summary = {}
    for act in p.activations:
        x = np.asarray(per_act[act]["x"])
        mask = x <= p.vertex_fit_max
        s, ci, _ = bootstrap_fit(np.stack(per_act[act]["ghat"]), x, normalized_variance,
                                 lambda v: v, mask, resamples=p.bootstrap, seed=cfg.seed + 1)
        cells_theory = fit_through_origin(x, np.asarray(per_act[act]["theory"]), mask)
        summary[f"vertex_slope_{act}"] = s
        summary[f"vertex_slope_{act}_ci"] = list(ci)
        summary[f"vertex_slope_{act}_theory"] = float(np.asarray(results[f"limit_slope_{act}"]))
        summary[f"vertex_slope_{act}_theory_cells"] = cells_theory
        summary[f"vertex_slope_{act}_consistent"] = bool(ci[0] <= cells_theory <= ci[1])
        summary[f"vertex_fit_cells_{act}"] = int(mask.sum())
        if act == "relu":
            ex = fit_through_origin(x, np.asarray(per_act[act]["exact"]), mask)
            summary["vertex_slope_relu_exact_cells"] = ex
            summary["vertex_slope_relu_exact_consistent"] = bool(ci[0] <= ex <= ci[1])
    return summary


def summarize(cfg, results):
    p = cfg.params
    widths = [int(w) for w in results["widths"]]
    in_dim = int(cfg.data.dim)
    cells, rows = [], []
    per_act = {a: {"x": [], "ghat": [], "theory": [], "exact": []} for a in p.activations}
    ntk_samples, betas, inv_widths, mid_samples = [], [], [], []
    for wi, w in enumerate(widths):
        lay = np.asarray(results["ntk_layers"][wi, 0], np.float64)  # (K, A, D, Dmax+1)
        gh = np.asarray(results["ghat"][wi, 0], np.float64)         # (K, A, D)
        for ai, act in enumerate(p.activations):
            theory_r = np.asarray(results[f"limit_vertex_{act}"], np.float64)
            for di, d in enumerate(p.depths):
                beta = d / w
                vert = float(normalized_variance(gh[:, ai, di]))
                cell = {"activation": act, "depth": int(d), "width": w, "beta": beta,
                        "inits": int(gh.shape[0]), "vertex": vert,
                        "vertex_theory": float(theory_r[d] / w)}
                per_act[act]["x"].append(beta)
                per_act[act]["ghat"].append(gh[:, ai, di])
                per_act[act]["theory"].append(theory_r[d] / w)
                if act == "relu":
                    k = ntk_diagonal(lay[:, ai, di], d, w, in_dim, CRITICAL_CW[act],
                                     p.ntk_weighting)
                    ratio = float(moment_ratio(k))
                    mid = lay[:, ai, di, d // 2, 0]    # one weight term, mid-depth
                    mid_samples.append(mid)
                    cell["log_mid_layer_ratio"] = float(np.log(moment_ratio(mid)))
                    cell.update(ntk_mean=float(k.mean()), ntk_ratio=ratio,
                                log_ntk_ratio=float(np.log(ratio)),
                                theory_log_ratio=THEORY_FLUCTUATION * beta,
                                vertex_exact=relu_output_vertex_exact([w] * d))
                    per_act[act]["exact"].append(cell["vertex_exact"])
                    ntk_samples.append(k)
                    betas.append(beta)
                    inv_widths.append(1.0 / w)
                cells.append(cell)
                rows.append(dict(cell))
    summary = {"experiment": NAME, "ntk_weighting": p.ntk_weighting,
               "fit_beta_max": p.fit_beta_max, "vertex_fit_max": p.vertex_fit_max,
               "depths": [int(d) for d in p.depths], "widths": widths,
               "inits": int(np.asarray(results["ghat"]).shape[2]),
               "bootstrap": p.bootstrap}
    if ntk_samples:
        summary.update(_fluctuation_summary(cfg, results, ntk_samples, mid_samples, betas,
                                            inv_widths))
    summary.update(_vertex_summary(cfg, results, per_act))
    summary["cells"] = cells
    summary["metric_definitions"] = (
        "ntk_ratio: mean(K^2)/mean(K)^2 over inits of the NTK diagonal at one input; "
        "vertex: Var(G_hat)/mean(G_hat)^2 of the output's conditional variance (= the "
        "normalised four-point vertex V/(n G^2)); beta = depth/width; slopes fitted "
        "through the origin; intervals: 95% percentile bootstrap over inits; see "
        "ntkexp.experiments.finite_width_corrections")
    return summary, rows


def _plot_fluctuations(ax, relu, summary):
    """Panel 1: log NTK moment ratio against beta, per depth, with the laws."""
    import matplotlib.pyplot as plt

    depths = sorted({c["depth"] for c in relu})
    cmap = plt.get_cmap("viridis")
    for i, d in enumerate(depths):
        cs = [c for c in relu if c["depth"] == d]
        ax.plot([c["beta"] for c in cs], [c["log_ntk_ratio"] for c in cs], "o",
                color=cmap(i / max(len(depths) - 1, 1)), ms=4, label=f"depth {d}")
    bb = np.geomspace(min(c["beta"] for c in relu), max(c["beta"] for c in relu), 50)
    ax.plot(bb, THEORY_FLUCTUATION * bb, "k-", lw=1.2, label="5 beta (Hanin & Nica)")
    if "fluctuation_coefficient_sum_derived" in summary:
        cs = summary["fluctuation_coefficient_sum_derived"]
        ax.plot(bb, cs * bb, "k:", lw=1.2, label=f"{cs:.2f} beta (derived, NTK sum)")
        ax.plot([c["beta"] for c in relu], [c["log_mid_layer_ratio"] for c in relu],
                "x", color="tab:orange", ms=4, label="one mid-depth weight term")
    c = summary["fluctuation_coefficient_relu"]
    lo, hi = summary["fluctuation_coefficient_relu_ci"]
    ax.plot(bb, c * bb, "r--", lw=1.0, label=f"fitted slope {c:.2f} [{lo:.2f}, {hi:.2f}]")
    ax.axvline(summary["fit_beta_max"], color="0.6", ls=":", lw=1,
               label="fit range edge")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("beta = depth / width")
    ax.set_ylabel("log E[K(x,x)^2] / E[K(x,x)]^2")
    ax.set_title("ReLU NTK diagonal fluctuations", fontsize=9)
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3)


def plot(results, summary, cfg_dict, fig_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    acts = sorted({c["activation"] for c in cells}, key=["relu", "tanh"].index)
    fig, axes = plt.subplots(1, 1 + len(acts), figsize=(5.2 * (1 + len(acts)), 4.2))
    relu = [c for c in cells if c["activation"] == "relu"]
    if relu:
        _plot_fluctuations(axes[0], relu, summary)
    for ax, act in zip(axes[1:], acts, strict=True):
        cs = [c for c in cells if c["activation"] == act]
        xs = np.asarray([c["beta"] for c in cs])
        ax.plot(xs, [c["vertex"] for c in cs], "o", ms=4, label="measured")
        order = np.argsort(xs)
        ax.plot(xs[order], np.asarray([c["vertex_theory"] for c in cs])[order], "k.",
                ms=5, label="leading-order recursion")
        if act == "relu":
            ax.plot(xs[order], np.asarray([c["vertex_exact"] for c in cs])[order], "gx",
                    ms=5, label="exact prod(1 + 5/n) - 1")
        s = summary[f"vertex_slope_{act}"]
        lo, hi = summary[f"vertex_slope_{act}_ci"]
        xx = np.linspace(0, summary["vertex_fit_max"], 20)
        ax.plot(xx, s * xx, "r--", lw=1, label=f"fit {s:.3f} [{lo:.3f}, {hi:.3f}]")
        ax.plot(xx, summary[f"vertex_slope_{act}_theory"] * xx, "k-", lw=0.8,
                label=f"asymptotic slope {summary[f'vertex_slope_{act}_theory']:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("depth / width")
        ax.set_ylabel("V / (n G^2) = Var(G_hat) / E[G_hat]^2")
        ax.set_title(f"four-point vertex, {act} (C_W = {CRITICAL_CW[act]:g})", fontsize=9)
        ax.legend(fontsize=6.5)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Finite-width corrections at init, {summary['inits']} inits per cell",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, fig_dir, NAME)


def check(cfg):
    if cfg.model.arch != "mlp":
        raise ConfigError(f"model.arch: {NAME} builds critical MLPs (arch: mlp), got "
                          f"{cfg.model.arch!r}")
    if len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"train.learning_rate: {NAME} does not train; give one value")
    if cfg.train.inits < 2:
        raise ConfigError(f"train.inits: {NAME} estimates moments over initialisations; "
                          f"needs at least 2, got {cfg.train.inits}")


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot, check=check, main_figure=NAME,
    unit_work=lambda cfg: len(cfg.params.depths) * len(cfg.params.activations)))
