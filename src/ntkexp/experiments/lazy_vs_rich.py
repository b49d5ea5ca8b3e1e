"""Lazy vs rich: how far training moves the kernel, the weights and the hidden
features as width grows, under NTK, muP and standard parameterization, and
whether the best learning rate transfers across widths (issue 21).

Task: ``data`` (default: Gaussian inputs, the target ``x1 * x2``, a product
that a fixed random-feature kernel fits poorly), squared loss, full-batch GD
for ``train.steps`` steps. For each width one unit takes the ``train.inits``
initialisations, and for every parameterization in ``params.parameterizations``
(:mod:`ntkexp.models.parameterization`) and every learning rate
``base_lr[p] * m`` for ``m`` in ``params.lr_multipliers``, trains them as one
vmapped ensemble (a member that diverges records NaN and does not stop the
others). At the learning rate ``base_lr[p]`` (multiplier 1) it also measures:

* relative kernel movement ``||Theta_T - Theta_0||_F / ||Theta_0||_F`` of the
  empirical NTK on the first ``params.kernel_points`` training inputs;
* relative weight movement ``||w_T - w_0|| / ||w_0||`` (all layers);
* relative change of the last hidden features ``||h_T - h_0||_F / ||h_0||_F``.

Theory: under NTK parameterization the kernel and the features move by
``O(n^-1/2)`` (Jacot et al. 2018; Lee et al. 2019, Thm. 2.1: slope -1/2 in
log-log); under muP features move by ``Theta(1)`` and so does the kernel
(Yang & Hu 2021, Thm. 6.1: slope 0). Hyperparameter transfer (Yang et al. 2021,
"Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer", Fig. 1):
the learning rate minimising the training loss after T steps stays put across
widths under muP and drifts (like ``1/n`` at the stability edge) under SP.

results.npz (W widths, K inits, P parameterizations, L learning rates):
``final_loss``, ``test_error (W, 1, K, P, L)``, ``kernel_movement``,
``weight_movement``, ``feature_movement`` ``(W, 1, K, P)``, ``widths``.

summary.json: ``parameterizations``, ``learning_rates`` (per parameterization);
per parameterization and width the means over inits; the fitted slopes
``kernel_movement_slope_<p>``, ``weight_movement_slope_<p>``,
``feature_movement_slope_<p>``; the best learning rate per width
(``best_lr_<p>``) and ``best_lr_spread_<p>`` = max / min over widths; with the
short names ``kernel_movement_slope_ntk``, ``kernel_movement_slope_mup``,
``best_lr_spread_mup`` and ``best_lr_spread_sp`` (= ``standard``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.config import ConfigError
from ntkexp.empirical import empirical_ntk
from ntkexp.experiments.base import Experiment, register_experiment
from ntkexp.experiments.common import build_ensemble, fit_exponent
from ntkexp.members import member as take_member
from ntkexp.models import parameterization as P
from ntkexp.plotting import save_figure

NAME = "lazy_vs_rich"
SHORT = {"standard": "sp", "ntk": "ntk", "mup": "mup", "mean_field": "mf"}
THEORY = {"ntk": -0.5, "mup": 0.0, "mean_field": 0.0}


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``lazy_vs_rich``.

    Attributes:
      parameterizations: presets compared (``model.parameterization`` is ignored).
      base_lr_standard, base_lr_ntk, base_lr_mup, base_lr_mean_field: the
        learning rate of each parameterization at multiplier 1 (where the
        movements are measured).
      lr_multipliers: the learning-rate grid, relative to the base rate.
      kernel_points: training inputs the empirical NTK is evaluated on.
    """

    parameterizations: tuple[str, ...] = ("ntk", "mup", "standard")
    base_lr_standard: float = dataclasses.field(default=0.05, metadata={"min_exclusive": 0.0})
    base_lr_ntk: float = dataclasses.field(default=1.0, metadata={"min_exclusive": 0.0})
    base_lr_mup: float = dataclasses.field(default=1.0, metadata={"min_exclusive": 0.0})
    base_lr_mean_field: float = dataclasses.field(default=1.0, metadata={"min_exclusive": 0.0})
    lr_multipliers: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    kernel_points: int = dataclasses.field(default=32, metadata={"min": 2})


def learning_rates(cfg, name: str) -> np.ndarray:
    """The learning-rate grid of parameterization ``name`` ``(L,)``."""
    base = getattr(cfg.params, f"base_lr_{name}")
    return base * np.asarray(cfg.params.lr_multipliers, np.float64)


@functools.partial(jax.jit, static_argnames=("f", "steps"))
def train_members(f, params, lrs, x, y, *, steps: int):
    """Full-batch GD on ``L = 1/(2n) ||f(w, x) - y||^2`` for stacked members, each with
    its own rate; a member whose loss turns non-finite stays NaN (no exception).

    Args:
      f: the apply function (hashable); params: stacked ``(M, ...)``; lrs: ``(M,)``.

    Returns:
      ``(params (M, ...), final loss (M,))``.
    """

    def loss(p):
        r = f(p, x) - y
        return 0.5 * jnp.mean(jnp.sum(r * r, axis=-1))

    def one(p, lr):
        def body(q, _):
            g = jax.grad(loss)(q)
            return jax.tree_util.tree_map(lambda a, b: a - lr * b, q, g), None

        q, _ = jax.lax.scan(body, p, None, length=steps)
        return q, loss(q)

    return jax.vmap(one)(params, lrs)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _tree_rel(p, p0) -> float:
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(
        jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p0), strict=True))
    den = sum(float(jnp.sum(b**2)) for b in jax.tree_util.tree_leaves(p0))
    return float(np.sqrt(num / den))


def compute_unit(cfg, data, unit, progress):
    x, y = data.x_train, data.y_train.reshape(data.x_train.shape[0], -1)
    xt, yt = data.x_test, data.y_test.reshape(data.x_test.shape[0], -1)
    xk = x[: cfg.params.kernel_points]
    K = len(unit.inits)
    names = cfg.params.parameterizations
    L = len(cfg.params.lr_multipliers)
    i_base = list(cfg.params.lr_multipliers).index(1.0)
    out = {k: np.full((K, len(names), L), np.nan) for k in ("final_loss", "test_error")}
    for k in ("kernel_movement", "weight_movement", "feature_movement"):
        out[k] = np.full((K, len(names)), np.nan)
    for pi, name in enumerate(names):
        spec = cfg.model.spec(unit.width).replace(parameterization=name)
        f, p0 = build_ensemble(cfg, unit, x.shape[1], x.dtype, spec=spec)
        lrs = learning_rates(cfg, name)
        # members: init-major, then learning rate
        stacked = jax.tree_util.tree_map(lambda a: jnp.repeat(a, L, axis=0), p0)
        lr_m = jnp.asarray(np.tile(lrs, K), x.dtype)
        pt, loss = train_members(f, stacked, lr_m, x, y, steps=cfg.train.steps)
        loss = np.asarray(loss).reshape(K, L)
        out["final_loss"][:, pi] = loss
        if xt.shape[0]:
            pred = jax.vmap(f, in_axes=(0, None))(pt, xt)
            err = np.mean(np.sum((np.asarray(pred) - np.asarray(yt)[None]) ** 2, -1), -1)
            out["test_error"][:, pi] = err.reshape(K, L)
        for k in range(K):
            w0, wt = take_member(p0, k), take_member(pt, k * L + i_base)
            if not np.isfinite(loss[k, i_base]):
                continue
            k0, kt = empirical_ntk(f, w0, xk), empirical_ntk(f, wt, xk)
            h0, ht = f.forward(w0, x)[1][-1], f.forward(wt, x)[1][-1]
            out["kernel_movement"][k, pi] = _rel(kt, k0)
            out["weight_movement"][k, pi] = _tree_rel(wt, w0)
            out["feature_movement"][k, pi] = _rel(ht, h0)
        progress(K * cfg.train.steps)
    return out


def reference(cfg, data):
    return {}


def _best_lr(lrs, losses) -> float:
    """The learning rate of the smallest finite mean loss (NaN if none is finite)."""
    m = np.where(np.isfinite(losses), losses, np.inf)
    return float("nan") if not np.isfinite(m).any() else float(lrs[int(np.argmin(m))])


def summarize(cfg, results):
    widths = [int(w) for w in results["widths"]]
    names = list(cfg.params.parameterizations)
    summary = {"experiment": NAME, "widths": widths, "parameterizations": names,
               "steps": int(cfg.train.steps), "inits": int(cfg.train.inits),
               "lr_multipliers": list(cfg.params.lr_multipliers),
               "theory_slopes": {p: THEORY.get(p) for p in names}}
    rows = []
    per = {}
    for pi, name in enumerate(names):
        lrs = learning_rates(cfg, name)
        fl = np.asarray(results["final_loss"][:, 0, :, pi], np.float64)   # (W, K, L)
        te = np.asarray(results["test_error"][:, 0, :, pi], np.float64)
        mean_loss = np.where(np.isfinite(fl).all(1), fl.mean(1), np.nan)  # (W, L)
        best = [_best_lr(lrs, mean_loss[wi]) for wi in range(len(widths))]
        rec = {"learning_rates": [float(v) for v in lrs], "best_lr": best,
               "final_loss": [[float(v) for v in r] for r in mean_loss],
               "test_error": [[float(v) for v in r]
                              for r in np.where(np.isfinite(te).all(1), te.mean(1), np.nan)]
               if np.isfinite(te).any() else None}
        for key in ("kernel_movement", "weight_movement", "feature_movement"):
            v = np.asarray(results[key][:, 0, :, pi], np.float64)          # (W, K)
            m = v.mean(1)
            rec[key] = [float(a) for a in m]
            slope = fit_exponent(widths, m)
            rec[f"{key}_slope"] = slope
            summary[f"{key}_slope_{name}"] = slope
        b = np.asarray(best)
        spread = float(np.nanmax(b) / np.nanmin(b)) if np.isfinite(b).any() else float("nan")
        rec["best_lr_spread"] = spread
        summary[f"best_lr_spread_{name}"] = spread
        short = SHORT[name]
        if short != name:
            summary[f"kernel_movement_slope_{short}"] = summary[f"kernel_movement_slope_{name}"]
            summary[f"best_lr_spread_{short}"] = spread
        per[name] = rec
        for wi, w in enumerate(widths):
            rows.append({"parameterization": name, "width": w,
                         "kernel_movement": rec["kernel_movement"][wi],
                         "feature_movement": rec["feature_movement"][wi],
                         "best_lr": best[wi]})
    summary["per_parameterization"] = per
    summary = _finite(summary)
    return summary, rows


def _finite(obj):
    """NaN / inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def plot(results, summary, cfg_dict, fig_dir):
    import matplotlib.pyplot as plt

    widths = np.asarray(summary["widths"])
    names = summary["parameterizations"]
    per = summary["per_parameterization"]
    colors = {"ntk": "tab:blue", "mup": "tab:red", "standard": "tab:green",
              "mean_field": "tab:purple"}
    fig, axes = plt.subplots(1, 2 + min(2, len(names)), figsize=(4.2 * (2 + min(2, len(names))),
                                                                   3.8))
    for ax, key, title in ((axes[0], "kernel_movement", r"$\|\Theta_T-\Theta_0\|/\|\Theta_0\|$"),
                           (axes[1], "feature_movement", r"$\|h_T-h_0\|/\|h_0\|$")):
        for name in names:
            v = np.asarray([np.nan if a is None else a for a in per[name][key]], float)
            s = per[name][f"{key}_slope"]
            ax.loglog(widths, v, "o-", color=colors.get(name),
                      label=f"{name}: slope {s:.2f}" if s is not None else name)
        for name in names:  # theory guides through the first point
            t = THEORY.get(name)
            v0 = per[name][key][0]
            if t is not None and v0 is not None:
                ax.loglog(widths, v0 * (widths / widths[0]) ** t, ":", color=colors.get(name),
                          alpha=0.6)
        ax.set_xlabel("width n")
        ax.set_title(title + " (dotted: theory)")
        ax.legend(fontsize=8)
    shown = [n for n in ("mup", "standard") if n in names] or names[:2]
    cmap = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
    for ax, name in zip(axes[2:], shown[:2], strict=False):
        lrs = np.asarray(per[name]["learning_rates"])
        for wi, w in enumerate(widths):
            v = np.asarray([np.nan if a is None else a for a in per[name]["final_loss"][wi]])
            ax.loglog(lrs, v, "o-", color=cmap[wi], label=f"n={w}")
        sp = per[name]["best_lr_spread"]
        ax.set_title(f"{name}: train loss after T={summary['steps']}; best-lr spread "
                     f"{sp:.1f}" if sp is not None else name, fontsize=9)
        ax.set_xlabel("learning rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, fig_dir, NAME)


def check(cfg):
    if cfg.model.arch != "mlp":
        raise ConfigError(f"model.arch: {NAME} compares parameterizations of the MLP; got "
                          f"{cfg.model.arch!r}")
    if cfg.model.depth < 1:
        raise ConfigError(f"model.depth: {NAME} needs hidden layers (>= 1), got "
                          f"{cfg.model.depth}")
    if not cfg.model.W_std > 0:
        raise ConfigError(f"model.W_std: {NAME} measures movements relative to the "
                          f"initial kernel and features; W_std must be > 0, got "
                          f"{cfg.model.W_std}")
    if cfg.data.n_test < 1:
        raise ConfigError(f"data.n_test: {NAME} measures test error; n_test must be > 0")
    if len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"train.learning_rate: {NAME} sweeps params.lr_multipliers; give "
                          "one learning rate (unused)")
    if 1.0 not in cfg.params.lr_multipliers:
        raise ConfigError("params.lr_multipliers: must contain 1.0 (the base rate, where the "
                          "movements are measured)")
    if not cfg.params.parameterizations:
        raise ConfigError("params.parameterizations: give at least one")
    for name in cfg.params.parameterizations:
        try:
            P.check(name, cfg.model.depth)
        except P.ParameterizationError as e:
            raise ConfigError(f"params.parameterizations: {e}") from None
    if cfg.params.kernel_points > cfg.data.n_train:
        raise ConfigError(f"params.kernel_points: at most data.n_train ({cfg.data.n_train}), "
                          f"got {cfg.params.kernel_points}")
    if cfg.train.steps < 1:
        raise ConfigError("train.steps: must be >= 1")


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot, check=check, main_figure=NAME,
    unit_work=lambda cfg: len(cfg.params.parameterizations) * cfg.train.steps))
