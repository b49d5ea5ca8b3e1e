"""Arora, Du, Hu, Li & Wang (ICML 2019), fine-grained analysis of GD on real data.

Setting (Arora et al. 2019, section 3): the two-layer ReLU net
``f(x) = m^-1/2 sum_r a_r relu(w_r . x)`` with ``a_r`` uniform on ``{-1, +1}``
and fixed, ``w_r ~ N(0, kappa^2 I)``, only ``W`` trained by full-batch GD on
``1/2 sum_i (f(x_i) - y_i)^2``; binary labels ``y_i in {-1, +1}``; inputs
scaled to unit norm. ``H`` is the infinite-width Gram matrix
``H_ij = x_i . x_j (pi - arccos(x_i . x_j)) / (2 pi)`` (their eq. 4).

For each width, one unit trains its initialisations as one ensemble per entry
of ``params.random_fractions`` (the same initial ``W`` for all of them): fraction
``p`` of the training labels is replaced by uniform random signs (nested sets:
the randomised points for ``p`` contain those for any smaller ``p``; the draw
depends on the initialisation number). The three panels of the figure:

(a) the training loss ``L(k)`` beside the prediction of Theorem 4.1,
    ``1/2 ||(I - eta H)^k (y - u0)||^2`` (``u0`` the initial outputs; with
    ``params.init: symmetric`` the hidden units come in pairs with equal
    ``w_r`` and opposite ``a_r``, so ``u0 = 0`` up to rounding and the prediction is
    Arora et al.'s ``1/2 ||(I - eta H)^k y||^2``; Arora et al. instead take
    ``kappa`` small so that ``u0 ~ 0``);
(b) the eigenvalues ``lambda_i`` of ``H`` and the projections ``(v_i^T y)^2``
    of true and of random labels on its eigenvectors (Theorem 4.1: the loss
    is ``1/2 sum_i (1 - eta lambda_i)^(2k) (v_i^T y)^2``, so labels on the top
    eigenvectors train fast);
(c) the test error of the trained nets as the random fraction grows, next to
    the bound's leading term ``sqrt(2 y^T H^-1 y / n)`` (Theorem 5.1).

Labels: ``params.positive_classes`` are +1, every other class -1 (the digits
default is even vs odd). A dataset whose targets already are +-1 (one
column) is used as is; one column of integers is read as class ids; several
columns (one-hot) as ``argmax`` (mapped through ``data.classes`` for digits).
``learning_rate`` is relative (``params.lr_mode: relative``, the default):
``eta = learning_rate / lambda_max(H_eff)``, ``H_eff = H`` for the "sum"
loss and ``H / n`` for "mean", so 1 is the fastest rate for the top
eigenvector and 2 the edge of stability at every ``n``.

results.npz (W widths, K inits, F fractions, S = steps + 1):
``loss``, ``pred`` (Theorem 4.1 with ``H^inf`` and ``u0``), ``pred_h0`` (with
the empirical Gram matrix ``H(0)`` of the unit's own initialisation):
``(W, 1, K, F, S)``; ``test_error``, ``train_error``: ``(W, 1, K, F)``;
``limit_eigvals (n,)`` (descending), ``limit_proj_true (n,)``,
``limit_proj_random (K, n)``, ``limit_bound (K, F)``,
``limit_kernel_test_error (K, F)`` (the infinite-width net after the same
GD steps from ``u0 = 0``), ``limit_pred0 (K, F, S)``
(``1/2 ||(I - eta H)^k y||^2``), ``limit_eta``, ``limit_fractions (F,)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.config import ConfigError
from ntkexp.data import DataError
from ntkexp.experiments import streams
from ntkexp.experiments.base import Experiment, register_experiment
from ntkexp.experiments.common import (
    build_ensemble,
    gram_two_layer,
    h_infinity,
    per_member,
    train_ensemble,
)
from ntkexp.models.two_layer import TwoLayerApply, TwoLayerSpec, init_two_layer
from ntkexp.plotting import save_figure
from ntkexp.theory import gd_loss_curve, generalization_bound, ntk_predict

NAME = "arora2019_finegrained"


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``arora2019_finegrained``.

    Attributes:
      kappa: standard deviation of the first-layer weights at initialisation.
      init: ``symmetric`` (pairs of units with equal ``w_r`` and opposite
        ``a_r``, so ``u0 = 0`` up to rounding) or ``standard`` (independent units).
      positive_classes: class ids labelled +1 (the rest are -1).
      random_fractions: fractions of training labels replaced by random signs.
      lr_mode: ``relative`` (``eta = learning_rate / lambda_max(H_eff)``) or
        ``absolute`` (``eta = learning_rate``).
      normalize: scale every input to unit norm (Arora et al.'s assumption).
    """

    kappa: float = dataclasses.field(default=1.0, metadata={"min_exclusive": 0.0})
    init: Literal["symmetric", "standard"] = "symmetric"
    positive_classes: tuple[int, ...] = (0, 2, 4, 6, 8)
    random_fractions: tuple[float, ...] = dataclasses.field(
        default=(0.0, 0.25, 0.5, 0.75, 1.0), metadata={"min": 0.0, "max": 1.0, "nonempty": True})
    lr_mode: Literal["relative", "absolute"] = "relative"
    normalize: bool = True


# --------------------------------------------------------------------------
# Data: +-1 labels, unit-norm inputs, randomised labels
# --------------------------------------------------------------------------


def class_ids(y, data_cfg=None) -> np.ndarray:
    """Integer class ids ``(n,)`` from targets ``y (n, k)``.

    ``k >= 2`` (one-hot, any centring): ``argmax`` over columns, mapped
    through ``data.classes`` when the digits set keeps a subset of classes.
    ``k == 1``: the values, which must be integers.

    Raises:
      DataError: one column of non-integer values.
    """
    y = np.asarray(y, np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape[1] >= 2:
        ids = np.argmax(y, axis=1)
        classes = getattr(data_cfg, "classes", None)
        if classes is not None and getattr(data_cfg, "name", None) == "digits":
            ids = np.asarray(classes)[ids]
        return ids.astype(np.int64)
    v = y[:, 0]
    if not np.all(v == np.round(v)):
        raise DataError("targets with one column must be class ids (integers) or +-1 labels")
    return v.astype(np.int64)


def binary_labels(y, positive_classes, data_cfg=None) -> np.ndarray:
    """``+-1`` labels ``(n,)``: +1 for ``positive_classes``, -1 otherwise.

    A single column that already holds only -1 and +1 is returned as is.
    """
    y = np.asarray(y, np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape[1] == 1 and y.shape[0] and np.all(np.isin(y[:, 0], (-1.0, 1.0))):
        return y[:, 0].copy()
    ids = class_ids(y, data_cfg)
    return np.where(np.isin(ids, np.asarray(positive_classes)), 1.0, -1.0)


def unit_norm(x):
    """Rows of ``x (n, d)`` scaled to unit Euclidean norm (zero rows stay zero)."""
    x = jnp.asarray(x)
    nrm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    return x / jnp.where(nrm > 0, nrm, 1.0)


def randomized_labels(y, fractions, key) -> np.ndarray:
    """Labels with a fraction of entries replaced by uniform random signs.

    One permutation ``pi`` and one sign vector ``s`` are drawn from ``key``;
    for fraction ``p`` the first ``round(p n)`` points of ``pi`` get their
    sign from ``s`` (so the randomised sets are nested in ``p``).

    Args:
      y: ``(n,)`` +-1 labels.
      fractions: ``(F,)`` numbers in ``[0, 1]``.
      key: PRNG key.

    Returns:
      ``(F, n)`` float64 labels.
    """
    y = np.asarray(y, np.float64)
    n = y.shape[0]
    kp, ks = jax.random.split(key)
    perm = np.asarray(jax.random.permutation(kp, n))
    signs = np.where(np.asarray(jax.random.bernoulli(ks, 0.5, (n,))), 1.0, -1.0)
    out = np.tile(y, (len(fractions), 1))
    for i, p in enumerate(fractions):
        idx = perm[: int(round(p * n))]
        out[i, idx] = signs[idx]
    return out


def label_key(cfg, draw: int):
    """PRNG key of the random labels of initialisation ``draw`` (shared by all widths):
    stream ``labels``."""
    return streams.key(cfg.seed, "labels", draw)


class Task:
    """The prepared binary task: unit-norm inputs and +-1 labels as jax arrays."""

    def __init__(self, cfg, data):
        dtype = data.x_train.dtype
        prep = unit_norm if cfg.params.normalize else jnp.asarray
        self.x = prep(data.x_train).astype(dtype)
        self.x_test = prep(data.x_test).astype(dtype)
        self.y = binary_labels(data.y_train, cfg.params.positive_classes, cfg.data)
        self.y_test = (binary_labels(data.y_test, cfg.params.positive_classes, cfg.data)
                       if data.x_test.shape[0] else np.zeros((0,)))
        if len(np.unique(self.y)) < 2:
            raise DataError(f"params.positive_classes {list(cfg.params.positive_classes)} puts "
                            "every training point in one class; the binary task needs both")
        self.dtype = dtype

    def labels(self, cfg, draw: int) -> np.ndarray:
        return randomized_labels(self.y, cfg.params.random_fractions, label_key(cfg, draw))


# --------------------------------------------------------------------------
# Gram matrices and the learning rate
# --------------------------------------------------------------------------


gram_inf = h_infinity  # H^inf of the two-layer ReLU net (Arora et al. 2019, eq. 4)
gram_at = gram_two_layer  # its finite-width Gram H(W)


def learning_rate(cfg, H) -> float:
    """GD step ``eta``: absolute, or ``learning_rate / lambda_max(H_eff)``."""
    lr = cfg.train.learning_rates[0]
    if cfg.params.lr_mode == "absolute":
        return float(lr)
    lam = float(jnp.linalg.eigvalsh(H)[-1])
    if cfg.train.loss_reduction == "mean":
        lam /= H.shape[0]
    return float(lr / lam)


# --------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------


def init_params(cfg, width: int, in_dim: int, key, dtype):
    """``(apply_fn, params)`` of the two-layer net (symmetric or standard init)."""
    spec = TwoLayerSpec(int(width), cfg.params.kappa)
    if cfg.params.init == "standard":
        return TwoLayerApply(spec), init_two_layer(spec, in_dim, key, dtype)
    half = init_two_layer(TwoLayerSpec(width // 2, cfg.params.kappa), in_dim, key, dtype)
    params = {"W": jnp.concatenate([half["W"], half["W"]], axis=1),
              "a": jnp.concatenate([half["a"], -half["a"]])}
    return TwoLayerApply(spec), params


def _error(f, y) -> float:
    if y.shape[0] == 0:
        return float("nan")
    return float(np.mean(np.where(np.asarray(f).reshape(-1) > 0, 1.0, -1.0) != y))


def compute_unit(cfg, data, unit, progress):
    task = Task(cfg, data)
    x, dt = task.x, task.dtype
    H = gram_inf(x)
    eta = learning_rate(cfg, H)
    apply_fn, params = build_ensemble(
        cfg, unit, x.shape[1], dt,
        builder=lambda k: init_params(cfg, unit.width, x.shape[1], k, dt))
    u0 = per_member(apply_fn, params, x)[..., 0]                      # (K, n)
    H0 = jax.vmap(gram_at, in_axes=(0, None))(params["W"], x)          # (K, n, n)
    labels = np.stack([task.labels(cfg, k) for k in unit.inits])       # (K, F, n)
    steps, red = cfg.train.steps, cfg.train.loss_reduction

    def curve(h, u, y):
        return gd_loss_curve(h, u, y, steps, learning_rate=eta, loss_reduction=red)

    out = {k: [] for k in ("loss", "pred", "pred_h0", "test_error", "train_error")}
    for i in range(labels.shape[1]):  # one ensemble per label fraction
        y = jnp.asarray(labels[:, i], dt)                             # (K, n)
        res = train_ensemble(cfg, apply_fn, params, x, y, unit, progress, learning_rate=eta,
                             run=i, targets_per_member=True)
        out["loss"].append(np.asarray(res.losses))
        out["pred"].append(np.asarray(jax.vmap(curve, in_axes=(None, 0, 0))(H, u0, y)))
        out["pred_h0"].append(np.asarray(jax.vmap(curve)(H0, u0, y)))
        f_tr = np.asarray(per_member(apply_fn, res.params, x))
        f_te = (np.asarray(per_member(apply_fn, res.params, task.x_test))
                if task.y_test.shape[0] else None)
        out["train_error"].append([_error(f_tr[j], labels[j, i]) for j in range(len(f_tr))])
        out["test_error"].append([_error(f_te[j], task.y_test) if f_te is not None
                                  else float("nan") for j in range(len(f_tr))])
    return {k: np.stack([np.asarray(a) for a in v], axis=1) for k, v in out.items()}


def reference(cfg, data):
    task = Task(cfg, data)
    x, dt = task.x, task.dtype
    H = gram_inf(x)
    eta = learning_rate(cfg, H)
    lam, V = jnp.linalg.eigh(H)
    lam, V = lam[::-1], V[:, ::-1]
    K, F = cfg.train.inits, len(cfg.params.random_fractions)
    ntest = task.x_test.shape[0]
    k_test = (gram_inf(jnp.concatenate([x, task.x_test]))[x.shape[0]:, : x.shape[0]]
              if ntest else None)
    proj_random, bound, kerr, pred0 = [], np.zeros((K, F)), np.full((K, F), np.nan), []
    for k in range(K):
        labels = task.labels(cfg, k)
        proj_random.append(np.asarray((V.T @ jnp.asarray(labels[-1], dt)) ** 2))
        pk = []
        for i, yf in enumerate(labels):
            y = jnp.asarray(yf, dt)
            bound[k, i] = float(generalization_bound(H, y))
            pk.append(np.asarray(gd_loss_curve(H, jnp.zeros_like(y), y, cfg.train.steps,
                                               learning_rate=eta,
                                               loss_reduction=cfg.train.loss_reduction)))
            if ntest:
                f = ntk_predict(k_test, H, y, jnp.zeros((ntest,), dt), jnp.zeros_like(y),
                                steps=cfg.train.steps, learning_rate=eta,
                                loss_reduction=cfg.train.loss_reduction)
                kerr[k, i] = _error(f, task.y_test)
        pred0.append(pk)
    return {
        "eigvals": np.asarray(lam),
        "proj_true": np.asarray((V.T @ jnp.asarray(task.y, dt)) ** 2),
        "proj_random": np.asarray(proj_random),
        "bound": bound,
        "kernel_test_error": kerr,
        "pred0": np.asarray(pred0),
        "eta": np.asarray(eta),
        "fractions": np.asarray(cfg.params.random_fractions, np.float64),
    }


def _top_share(proj, top: int) -> float:
    proj = np.asarray(proj, np.float64)
    return float(proj[..., :top].sum(-1).mean() / proj.sum(-1).mean())


def summarize(cfg, results):
    fr = [float(f) for f in results["limit_fractions"]]
    i_true = int(np.argmin(fr))
    i_rand = int(np.argmax(fr))
    bound = np.asarray(results["limit_bound"], np.float64)          # (K, F)
    kerr = np.asarray(results["limit_kernel_test_error"], np.float64)
    n = int(results["limit_eigvals"].shape[0])
    top = max(1, min(10, n // 10))
    per_width, rows = {}, []
    for wi, w in enumerate(results["widths"]):
        loss = np.asarray(results["loss"][wi, 0], np.float64)       # (K, F, S)
        pred = np.asarray(results["pred"][wi, 0], np.float64)
        ph0 = np.asarray(results["pred_h0"][wi, 0], np.float64)
        dev = np.max(np.abs(loss - pred), axis=-1) / pred[..., 0]   # (K, F)
        dev_h0 = np.max(np.abs(loss - ph0), axis=-1) / ph0[..., 0]
        ratio = loss[..., -1] / loss[..., 0]                        # (K, F)
        terr = np.asarray(results["test_error"][wi, 0], np.float64)
        per_width[str(int(w))] = {
            "width": int(w),
            "max_rel_dev_true": float(dev[:, i_true].max()),
            "max_rel_dev_random": float(dev[:, i_rand].max()),
            "max_rel_dev_h0_true": float(dev_h0[:, i_true].max()),
            "max_rel_dev_h0_random": float(dev_h0[:, i_rand].max()),
            "final_loss_ratio_true": float(ratio[:, i_true].mean()),
            "final_loss_ratio_random": float(ratio[:, i_rand].mean()),
            "test_error": [float(v) for v in terr.mean(0)],
            "train_error": [float(v) for v in
                            np.asarray(results["train_error"][wi, 0], np.float64).mean(0)],
        }
        for k in range(loss.shape[0]):
            for i, f in enumerate(fr):
                rows.append({"width": int(w), "init": k, "random_fraction": f,
                             "max_rel_dev": float(dev[k, i]), "max_rel_dev_h0": float(dev_h0[k, i]),
                             "final_loss_ratio": float(ratio[k, i]),
                             "test_error": float(terr[k, i]), "bound": float(bound[k, i])})
    widest = per_width[str(int(max(results["widths"])))]
    lam = np.asarray(results["limit_eigvals"], np.float64)
    summary = {
        "experiment": NAME,
        "n_train": n,
        "eta": float(results["limit_eta"]),
        "steps": int(cfg.train.steps),
        "lambda_max": float(lam[0]),
        "lambda_min": float(lam[-1]),
        "random_fractions": fr,
        "bound": [float(v) for v in bound.mean(0)],
        "kernel_test_error": [float(v) for v in np.nanmean(kerr, 0)]
        if np.isfinite(kerr).any() else None,
        "top_eigvec_share": {"top": top,
                             "true": _top_share(results["limit_proj_true"], top),
                             "random": _top_share(results["limit_proj_random"], top)},
        "widest": widest,
        "random_trains_slower": bool(widest["final_loss_ratio_random"]
                                     > widest["final_loss_ratio_true"]),
        "per_width": per_width,
        "metric_definitions": (
            "max_rel_dev: max over steps k of |L(k) - P(k)| / P(0), P the Theorem 4.1 "
            "prediction 1/2||(I - eta H)^k (y - u0)||^2 with H = H^inf (_h0: with the "
            "empirical H(0)); final_loss_ratio: L(steps) / L(0); test_error, bound, "
            "kernel_test_error: one entry per random fraction; top_eigvec_share: share of "
            "||y||^2 on the top eigenvectors of H; see ntkexp.experiments.arora2019"),
    }
    return summary, rows


_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def plot(results, summary, cfg_dict, fig_dir):
    """Four panels: (a) loss vs prediction, (b) spectrum and label projections, (c) bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = np.asarray(results["limit_fractions"], np.float64)
    widths = [int(w) for w in results["widths"]]
    lam = np.asarray(results["limit_eigvals"])
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    _plot_loss(axes[0], results, fr, widths)
    _plot_spectrum(axes[1], lam)
    _plot_projections(axes[2], results, np.arange(1, lam.shape[0] + 1))
    _plot_bound(axes[3], results, fr, widths)
    fig.suptitle("Arora et al. 2019, fine-grained analysis: two-layer ReLU net, "
                 f"n = {lam.shape[0]}, eta = {float(results['limit_eta']):.3g}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, fig_dir, NAME)


def _plot_loss(ax, results, fr, widths) -> None:
    """(a) GD's training loss at the largest width beside Theorem 4.1's prediction, for
    the true labels and the most randomised ones."""
    colors = _COLORS
    i_true, i_rand = int(np.argmin(fr)), int(np.argmax(fr))
    wi = int(np.argmax(widths))
    for j, (i, name) in enumerate(((i_true, "true"), (i_rand, f"random ({fr[i_rand]:g})"))):
        loss = np.asarray(results["loss"][wi, 0, 0, i])
        pred = np.asarray(results["pred"][wi, 0, 0, i])
        ks = np.arange(loss.shape[0])
        ax.plot(ks, loss, color=colors[j], lw=1.6, label=f"{name} labels: GD, m = {widths[wi]}")
        ax.plot(ks, pred, color="k" if j == 0 else "0.4", lw=1.0, ls="--",
                label=r"$\frac{1}{2}\|(I-\eta H^\infty)^k (y - u_0)\|^2$" if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("GD step k")
    ax.set_ylabel("training loss")
    ax.set_title("(a) loss vs Theorem 4.1 prediction", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _plot_spectrum(ax, lam) -> None:
    """(b) the eigenvalues of ``H^inf``, descending."""
    idx = np.arange(1, lam.shape[0] + 1)
    ax.plot(idx, lam, color="k", lw=1.4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel(r"eigenvalue $\lambda_i$ of $H^\infty$")
    ax.set_title("(b) spectrum of $H^\\infty$", fontsize=9)
    ax.grid(alpha=0.3)


def _plot_projections(ax, results, idx) -> None:
    """(b) the labels' squared projections on the eigenvectors of ``H^inf`` and their
    cumulative share."""
    colors = _COLORS
    pt = np.asarray(results["limit_proj_true"], np.float64)
    pr = np.asarray(results["limit_proj_random"], np.float64)[0]
    ax.plot(idx, pt, ".", ms=2.5, alpha=0.45, color=colors[0])
    ax.plot(idx, pr, ".", ms=2.5, alpha=0.45, color=colors[1])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(1e-6, 1e-3 * max(pt.max(), pr.max())))
    ax.set_xlabel(r"index i (eigenvalues descending)")
    ax.set_ylabel(r"$(v_i^\top y)^2$ (dots)")
    ax2 = ax.twinx()
    ax2.plot(idx, np.cumsum(pt) / pt.sum(), color=colors[0], lw=1.6, label="true labels")
    ax2.plot(idx, np.cumsum(pr) / pr.sum(), color=colors[1], lw=1.6, label="random labels")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel(r"cumulative share $\sum_{j\leq i}(v_j^\top y)^2/\|y\|^2$ (lines)")
    ax2.legend(fontsize=7, loc="lower right")
    ax.set_title("(b) label projections on eigenvectors of $H^\\infty$", fontsize=9)
    ax.grid(alpha=0.3)


def _plot_bound(ax, results, fr, widths) -> None:
    """(c) test error against the fraction of random labels, beside the bound."""
    colors = _COLORS
    terr = np.asarray(results["test_error"][:, 0], np.float64).mean(axis=1)   # (W, F)
    for j, w in enumerate(widths):
        ax.plot(fr, terr[j], "o-", color=colors[(j + 2) % len(colors)], ms=4, lw=1.2,
                label=f"test error, m = {w}")
    kerr = np.asarray(results["limit_kernel_test_error"], np.float64)
    if np.isfinite(kerr).any():
        ax.plot(fr, np.nanmean(kerr, 0), "s:", color="0.3", ms=3, lw=1,
                label=r"test error, $m\to\infty$")
    ax.set_xlabel("fraction of labels randomised")
    ax.set_ylabel("test error")
    ax2 = ax.twinx()
    ax2.plot(fr, np.asarray(results["limit_bound"], np.float64).mean(0), "^--", color="k",
             ms=4, label=r"$\sqrt{2 y^\top H^{-1} y / n}$")
    ax2.set_ylabel("bound")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax.set_title("(c) test error and generalization bound", fontsize=9)
    ax.grid(alpha=0.3)


def check(cfg):
    if cfg.model.arch != "two_layer_relu":
        raise ConfigError(f"model.arch: {NAME} trains the two-layer ReLU net "
                          f"'two_layer_relu', got {cfg.model.arch!r}")
    if len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"train.learning_rate: {NAME} needs one learning rate")
    if cfg.params.init == "symmetric" and any(w % 2 for w in cfg.model.widths):
        raise ConfigError(f"model.width: params.init symmetric pairs the hidden units, so "
                          f"every width must be even, got {list(cfg.model.widths)}")
    if cfg.data.n_train < 2:
        raise ConfigError("data.n_train: the binary task needs at least 2 training points")
    if not all(math.isfinite(f) for f in cfg.params.random_fractions):
        raise ConfigError("params.random_fractions: must be finite numbers in [0, 1]")


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot,
    unit_work=lambda cfg: max(cfg.train.steps, 1) * len(cfg.params.random_fractions),
    check=check, main_figure=NAME, readout_from_targets=True))
