"""MNIST-1D, finite versus infinite: MLPs and 1-D CNNs (GAP readout) beside their kernels.

Greydanus (2020), "Scaling down deep learning" (arXiv:2011.14439) introduced
MNIST-1D (4000 training / 1000 test signals of length 40, 10 classes) and
reports test accuracies of 32% (logistic regression), 68% (MLP) and 94% (CNN)
(the table of the ``mnist1d`` package's README). This experiment puts finite
networks trained by GD/SGD beside their infinite-width limits, in the setting
of Lee et al. (NeurIPS 2020), "Finite Versus Infinite Neural Networks"
(:mod:`ntkexp.experiments.lee2020`: one-hot targets ``0.9 / -0.1``, MSE,
learning rate relative to ``lambda_max`` of the net's own NTK, ensembles
``+U`` over ``train.inits`` initialisations, centring ``+C``):

* finite: for each width ``w`` (``model.width``), an MLP (``model``: its
  depth, activation, ``W_std``, ``b_std``) and a 1-D CNN with a global average
  pooling readout (``params.cnn_depth`` convolutions of size
  ``params.cnn_filter_size`` with ``params.cnn_channels[i]`` channels, default
  ``w``; the same activation and multipliers; NTK parameterization);
* infinite: NNGP and NTK kernel regression (``K(x, X) (K + ridge I)^-1 y``)
  and the NTK-GP mean after the same steps (``NTK, t = T``), for both
  architectures, with the analytic kernels of the architecture registry
  computed in tiles under ``kernels.memory_budget``
  (:func:`ntkexp.kernels.tiling.tiled_kernel`; ``kernels.cache_dir`` streams
  them to resumable ``.npy`` files) and solved in float64 by Cholesky
  (:func:`ntkexp.theory.kernel_regression`), with each system's condition
  number and the float32-vs-float64 gap of its predictions
  (:func:`ntkexp.theory.precision_gap`; Lee et al. 2020, sec. 3.4).

results.npz (W widths, K inits, A architectures, V variants, m test points,
k classes): ``test_out (W, 1, K, A, V, m, k)``, ``test_acc``, ``eta``,
``final_loss (W, 1, K, A, V)`` (NaN where a variant does not apply: the CNN has
only the NTK parameterization); ``limit_<arch>_{nngp,ntk,ntk_t}_out (m, k)``,
``limit_<arch>_{nngp,ntk}_cond``, ``limit_<arch>_{nngp,ntk}_f32_gap``,
``limit_labels``, ``limit_variants``, ``limit_archs``.

The training part (:func:`train_variant`) is thin and isolated from the kernel
part (:func:`reference`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkexp.config import ConfigError
from ntkexp.data import mnist1d_arrays
from ntkexp.experiments import streams
from ntkexp.experiments.base import Experiment, register_experiment
from ntkexp.experiments.common import (
    Task,
    make_optimizer,
    ntk_lambda_max,
    progress_callback,
    variant_name,
    variants,
)
from ntkexp.kernels.tiling import tiled_kernel
from ntkexp.models import ARCHITECTURES
from ntkexp.models.cnn import CNNSpec
from ntkexp.plotting import save_figure
from ntkexp.theory import kernel_regression, ntk_predict, precision_gap
from ntkexp.tiles import analytic_tiles
from ntkexp.training import train

NAME = "mnist1d_finite_vs_infinite"
TRAINED_STREAM = "mnist1d_trained"  # initialisations of the trained Adam baselines
if TRAINED_STREAM not in streams.PURPOSES:
    streams.register_purpose(TRAINED_STREAM, 2301)
ARCHS = ("mlp", "cnn")

#: Published MNIST-1D test accuracies (Greydanus 2020, arXiv:2011.14439; the table
#: in the README of the ``mnist1d`` package).
PUBLISHED = {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94}
PUBLISHED_SOURCE = ("Greydanus 2020, 'Scaling down deep learning', arXiv:2011.14439 "
                    "(table in the mnist1d package README)")


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``mnist1d_finite_vs_infinite``.

    Attributes:
      architectures: which of ``mlp`` and ``cnn`` to run (finite and infinite).
      cnn_depth, cnn_filter_size: the 1-D CNN (GAP readout).
      cnn_channels: CNN channels per width of ``model.width`` (default: the width).
      parameterizations: for the MLP, ``ntk`` and/or ``standard`` (the CNN is NTK only).
      centering: raw (``false``) and/or centred (``true``) nets.
      preprocess: ``none`` (default: the generator already standardises the
        signals), ``center`` or ``standardize`` (see ``lee2020``).
      lr_mode: ``relative`` (``eta = learning_rate / lambda_max(Theta_0 / n)``) or
        ``absolute``.
      kernel_ridge: ridge of kernel regression relative to the mean diagonal.
      power_iterations: for ``lambda_max``.
      rigour: also run the controls of :func:`rigour` (ridge by k-fold CV on the
        training split, shuffled labels, duplicate check, data-set seeds, trained
        Adam/cross-entropy baselines) into ``summary['rigour']``.
      rigour_architectures: the kernels of the controls (independent of
        ``architectures``, which sets the GD nets and the main kernels).
      ridge_grid: relative ridges (times the mean diagonal) the CV chooses from.
      cv_folds: folds of the cross-validation (training split only).
      data_seeds: ``make_dataset`` seeds of the kernel seed spread.
      cnn_n_train: training signals for the CNN-GAP kernels and trained CNNs of the
        controls (the first ones of each seed's split; default all ``data.n_train``).
      trained_mlp_widths, trained_cnn_channels: widths of the trained baselines.
      trained_seeds: initialisations per trained width (data seed 42).
      trained_epochs, trained_patience: Adam epochs at most; early stopping after
        ``patience`` epochs without a better validation accuracy (best restored).
      trained_lr, trained_batch_size, trained_val_fraction: Adam step, mini-batch,
        and the validation share carved from the training split.
      trained_cnn_lr: the Adam step of the trained CNN-GAP (default ``trained_lr``).
        On the controls' 500-signal subset a mini-batch epoch is only 3 Adam steps
        (28 for the MLP on 4000): at step 1e-3 the CNN-GAP is still far from fitting
        its training signals (train accuracy 0.44 at 32 channels) when early
        stopping ends it; at 3e-2 it fits them (0.99).
    """

    architectures: tuple[Literal["mlp", "cnn"], ...] = dataclasses.field(
        default=("mlp", "cnn"), metadata={"nonempty": True})
    cnn_depth: int = dataclasses.field(default=3, metadata={"min": 1})
    cnn_filter_size: int = dataclasses.field(default=5, metadata={"min": 1})
    cnn_channels: tuple[int, ...] | None = None
    parameterizations: tuple[Literal["ntk", "standard"], ...] = dataclasses.field(
        default=("ntk",), metadata={"nonempty": True})
    centering: tuple[bool, ...] = dataclasses.field(default=(False, True),
                                                    metadata={"nonempty": True})
    preprocess: Literal["none", "center", "standardize"] = "none"
    lr_mode: Literal["relative", "absolute"] = "relative"
    kernel_ridge: float = dataclasses.field(default=1e-6, metadata={"min": 0.0})
    power_iterations: int = dataclasses.field(default=30, metadata={"min": 1})
    rigour: bool = False
    rigour_architectures: tuple[Literal["mlp", "cnn"], ...] = ("mlp", "cnn")
    ridge_grid: tuple[float, ...] = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    cv_folds: int = dataclasses.field(default=5, metadata={"min": 2})
    data_seeds: tuple[int, ...] = (42,)
    cnn_n_train: int | None = None
    trained_mlp_widths: tuple[int, ...] = ()
    trained_cnn_channels: tuple[int, ...] = ()
    trained_seeds: int = dataclasses.field(default=2, metadata={"min": 1})
    trained_epochs: int = dataclasses.field(default=300, metadata={"min": 1})
    trained_patience: int = dataclasses.field(default=30, metadata={"min": 1})
    trained_lr: float = dataclasses.field(default=1e-3, metadata={"min": 0.0})
    trained_batch_size: int = dataclasses.field(default=128, metadata={"min": 1})
    trained_val_fraction: float = dataclasses.field(default=0.1, metadata={"min": 0.0})
    trained_cnn_lr: float | None = dataclasses.field(default=None, metadata={"min": 0.0})


def arch_spec(cfg, arch: str, width: int, parameterization: str = "ntk", out_dim: int = 1):
    """The finite (``width``) or infinite (``width=1``, any) spec of ``arch``."""

    m = cfg.model
    if arch == "mlp":
        return dataclasses.replace(m.spec(width), parameterization=parameterization,
                                   out_dim=out_dim)
    return CNNSpec(depth=cfg.params.cnn_depth, width=int(width),
                   filter_size=cfg.params.cnn_filter_size, readout="gap",
                   activation=m.activation, W_std=m.W_std, b_std=m.b_std, out_dim=out_dim,
                   activation_params=dict(m.activation_params))


def _accuracy(out, labels) -> float:
    return float(np.mean(np.argmax(np.asarray(out), axis=1) == np.asarray(labels)))


def _eta(cfg, lam: float, n: int) -> float:
    lr = cfg.train.learning_rates[0]
    if cfg.params.lr_mode == "absolute":
        return float(lr)
    return float(lr / (lam / n if cfg.train.loss_reduction == "mean" else lam))


# --------------------------------------------------------------------------
# Finite nets (thin: one variant of one architecture from one initialisation)
# --------------------------------------------------------------------------


def train_variant(cfg, task, arch: str, spec, init: int, run: int, centred: bool, progress):
    """Train one net of initialisation ``init`` (variant number ``run``); return
    ``(test outputs (m, k), eta, final loss)``.

    Random streams (:mod:`ntkexp.experiments.streams`): parameters from
    ``init`` ``(init, run)``-folded, the power iteration from ``power``, the
    mini-batches from ``minibatch (init, run)``.

    Centred (``+C``): the net ``f - f0``, trained as the raw net on the targets
    ``y + f0(X)`` (the same loss as a function of the parameters).
    """

    key = jax.random.fold_in(streams.key(cfg.seed, "init", init), run)
    apply_fn, params = ARCHITECTURES.get(arch).build(spec, task.x.shape[1], key, task.dtype)
    lam = float(ntk_lambda_max(apply_fn, params, task.x,
                               streams.key(cfg.seed, "power", init, run),
                               cfg.params.power_iterations))
    eta = _eta(cfg, lam, task.x.shape[0])
    f0_train, f0_test = apply_fn(params, task.x), apply_fn(params, task.x_test)
    y = task.y + f0_train if centred else task.y
    callback, finish = progress_callback(progress)
    res = train(apply_fn, params, task.x, y, optimizer=make_optimizer(cfg, eta),
                steps=cfg.train.steps, loss_reduction=cfg.train.loss_reduction,
                batch_size=cfg.train.batch_size,
                key=streams.key(cfg.seed, "minibatch", init, run), callback=callback)
    finish(cfg.train.steps)
    f = apply_fn(res.params, task.x_test)
    if centred:
        f = f - f0_test
    return np.asarray(f), eta, float(np.asarray(res.losses)[-1])


def compute_unit(cfg, data, member, progress):
    """One initialisation (``per_init``): every architecture and variant."""
    task = Task(cfg, data, NAME)
    vs = variants(cfg)
    A, V, m, k = len(ARCHS), len(vs), task.x_test.shape[0], task.k
    out = np.full((A, V, m, k), np.nan)
    acc, eta, loss = (np.full((A, V), np.nan) for _ in range(3))
    for ai, arch in enumerate(ARCHS):
        if arch not in cfg.params.architectures:
            continue
        width = member.width
        if arch == "cnn" and cfg.params.cnn_channels is not None:
            width = cfg.params.cnn_channels[member.w_index]
        for vi, (p, centred) in enumerate(vs):
            if arch == "cnn" and p != "ntk":
                progress(cfg.train.steps)
                continue
            spec = arch_spec(cfg, arch, width, p, task.k)
            f, eta[ai, vi], loss[ai, vi] = train_variant(cfg, task, arch, spec, member.init,
                                                         ai * V + vi, centred, progress)
            out[ai, vi] = f
            acc[ai, vi] = _accuracy(f, task.labels_test)
    return {"test_out": out, "test_acc": acc, "eta": eta, "final_loss": loss}


# --------------------------------------------------------------------------
# Infinite width: tiled kernels, float64 solves
# --------------------------------------------------------------------------


def limit_kernels(cfg, arch: str, x, x_test, *, quiet: bool = True):
    """``(train Kernel (n, n), test Kernel (m, n))`` of ``arch`` in tiles."""

    fn = analytic_tiles(arch_spec(cfg, arch, 1), arch)
    kc = cfg.kernels
    devices = "all" if kc.devices == "all" else None
    outs = []
    for name, a, b in (("train", x, None), ("test", x_test, x)):
        path = None
        if kc.cache_dir:
            path = os.path.join(kc.cache_dir, f"{NAME}_{arch}_{name}_{np.dtype(a.dtype)}.npy")
        outs.append(tiled_kernel(fn, np.asarray(a), None if b is None else np.asarray(b),
                                 memory_budget=kc.memory_budget, out=path, devices=devices,
                                 quiet=quiet, desc=f"{arch} {name} kernel"))
    return outs


def reference(cfg, data):

    task = Task(cfg, data, NAME)
    n = task.x.shape[0]
    y = np.asarray(task.y, np.float64)
    res = {}
    for arch in cfg.params.architectures:
        ktr, kte = limit_kernels(cfg, arch, task.x, task.x_test)
        for name in ("nngp", "ntk"):
            K, Kt = np.asarray(getattr(ktr, name)), np.asarray(getattr(kte, name))
            ridge = cfg.params.kernel_ridge * float(np.mean(np.diag(K)))
            pred, info = kernel_regression(Kt, K, y, ridge=ridge, return_info=True)
            res[f"{arch}_{name}_out"] = np.asarray(pred, np.float64)
            res[f"{arch}_{name}_cond"] = np.asarray(info.condition_number)
            gap = precision_gap(Kt, K, y, ridge=ridge)
            res[f"{arch}_{name}_f32_gap"] = np.asarray(gap["relative_gap"])
            res[f"{arch}_{name}_f32_argmax_agreement"] = np.asarray(gap["argmax_agreement"])
        Th = np.asarray(ktr.ntk, np.float64)
        ridge = cfg.params.kernel_ridge * float(np.mean(np.diag(Th)))
        lam = float(np.linalg.eigvalsh(Th)[-1]) + ridge
        eta = _eta(cfg, lam, n)
        mean = ntk_predict(np.asarray(kte.ntk), Th, y, np.zeros((kte.ntk.shape[0], y.shape[1])),
                           np.zeros_like(y), steps=cfg.train.steps, learning_rate=eta,
                           loss_reduction=cfg.train.loss_reduction, ridge=ridge)
        res[f"{arch}_ntk_t_out"] = np.asarray(mean, np.float64)
        res[f"{arch}_ntk_t_eta"] = np.asarray(eta)
        del ktr, kte
    if cfg.params.rigour:
        res["rigour_json"] = np.asarray(json.dumps(rigour(cfg)))
    res["labels"] = np.asarray(task.labels_test)
    res["variants"] = np.asarray([variant_name(p, c) for p, c in variants(cfg)])
    res["archs"] = np.asarray(list(cfg.params.architectures))
    return res


# --------------------------------------------------------------------------
# Controls (params.rigour): CV ridge, shuffled labels, duplicates, seeds,
# trained Adam / cross-entropy baselines with early stopping
# --------------------------------------------------------------------------


def _onehot(labels, k: int = 10) -> np.ndarray:
    t = np.full((len(labels), k), -0.1)
    t[np.arange(len(labels)), np.asarray(labels, np.int64)] = 0.9
    return t


class _EigenRidge:
    """Kernel ridge regression at many ridges from one eigendecomposition.

    ``K = V diag(s) V^T``; the predictions at ridge ``r`` are
    ``Kt V diag(1 / (s + r)) V^T Y`` (the same as ``Kt (K + r I)^-1 Y``).
    """

    def __init__(self, K, Y):
        s, V = np.linalg.eigh(np.asarray(K, np.float64))
        self.s, self.V = s, V
        self.VtY = V.T @ np.asarray(Y, np.float64)

    def with_targets(self, Y) -> _EigenRidge:
        """The same eigendecomposition with other targets (no new ``eigh``)."""
        new = object.__new__(_EigenRidge)
        new.s, new.V, new.VtY = self.s, self.V, self.V.T @ np.asarray(Y, np.float64)
        return new

    def predict(self, Kt, r: float):
        return (np.asarray(Kt, np.float64) @ self.V) @ (self.VtY / (self.s + r)[:, None])


def cv_ridge(K, labels, grid, folds: int, seed: int = 0) -> dict:
    """Choose the ridge of kernel regression by ``folds``-fold cross-validation on the
    training kernel ``K (n, n)`` with labels ``(n,)`` only (one-hot 0.9 / -0.1 targets).

    ``grid``: ridges relative to ``mean(diag K)``. Returns ``{"ridge": best relative
    ridge, "cv_accuracy": {ridge: mean validation accuracy}}``; ties go to the larger
    ridge.
    """
    K = np.asarray(K, np.float64)
    labels = np.asarray(labels)
    n = K.shape[0]
    scale = float(np.mean(np.diag(K)))
    perm = np.random.default_rng(seed).permutation(n)
    acc = np.zeros(len(grid))
    for f in range(folds):
        va = perm[f::folds]
        tr = np.setdiff1d(perm, va)
        er = _EigenRidge(K[np.ix_(tr, tr)], _onehot(labels[tr]))
        Kt = K[np.ix_(va, tr)]
        for i, r in enumerate(grid):
            acc[i] += _accuracy(er.predict(Kt, r * scale), labels[va]) / folds
    best = max(range(len(grid)), key=lambda i: (round(acc[i], 12), grid[i]))
    return {"ridge": float(grid[best]),
            "cv_accuracy": {f"{r:.0e}": float(a) for r, a in zip(grid, acc, strict=True)}}


def duplicates(x, x_test, tol: float = 1e-6) -> dict:
    """Nearest training signal of each test signal: how many test signals duplicate a
    training one (Euclidean distance ``<= tol * rms(x)``), and the smallest distance
    relative to the median nearest-neighbour distance."""
    x = np.asarray(x, np.float64)
    xt = np.asarray(x_test, np.float64)
    d2 = (np.sum(xt**2, 1)[:, None] + np.sum(x**2, 1)[None] - 2 * xt @ x.T)
    nn = np.sqrt(np.maximum(d2.min(1), 0.0))
    scale = float(np.sqrt(np.mean(x**2)) * np.sqrt(x.shape[1]))
    return {"duplicates": int(np.sum(nn <= tol * scale)),
            "min_nn_distance_rel": float(nn.min() / np.median(nn)),
            "exact_duplicates": int(sum(1 for row in xt if np.any(np.all(x == row, 1))))}


def kernel_controls(ktr, kte, labels, labels_test, grid, folds: int, seed: int) -> dict:
    """For each of NNGP and NTK: CV ridge (training split only), test accuracy at it,
    test accuracy over the whole grid (for the record, not for choosing), and the
    shuffled-label control (training labels permuted, CV-chosen ridge)."""
    out = {}
    for name in ("nngp", "ntk"):
        K, Kt = np.asarray(getattr(ktr, name)), np.asarray(getattr(kte, name))
        cv = cv_ridge(K, labels, grid, folds, seed)
        scale = float(np.mean(np.diag(K)))
        er = _EigenRidge(K, _onehot(labels))
        test = {f"{r:.0e}": _accuracy(er.predict(Kt, r * scale), labels_test) for r in grid}
        shuf = np.random.default_rng(seed + 1).permutation(np.asarray(labels))
        er_s = er.with_targets(_onehot(shuf))
        out[name] = {"cv_ridge": cv["ridge"], "cv_accuracy": cv["cv_accuracy"],
                     "test_accuracy": test[f"{cv['ridge']:.0e}"], "test_accuracy_by_ridge": test,
                     "shuffled_test_accuracy": _accuracy(er_s.predict(Kt, cv["ridge"] * scale),
                                                         labels_test)}
    return out


def train_converged(cfg, arch: str, width: int, x, labels, x_test, labels_test, seed: int
                    ) -> dict:
    """A finite net trained to convergence: Adam on the softmax cross-entropy,
    mini-batches, at most ``params.trained_epochs`` epochs, early stopping on a
    validation split carved from the training split (``trained_val_fraction``): stops
    after ``trained_patience`` epochs without a better validation accuracy and restores
    the best parameters. Same architecture as the kernels (:func:`arch_spec`, 10
    outputs, NTK parameterization). Returns test/validation accuracy, best epoch."""

    p = cfg.params
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    perm = rng.permutation(n)
    n_val = max(1, int(round(p.trained_val_fraction * n)))
    va, tr = perm[:n_val], perm[n_val:]
    X, Y = jnp.asarray(x[tr], jnp.float32), jnp.asarray(labels[tr], jnp.int32)
    Xv, Yv = jnp.asarray(x[va], jnp.float32), np.asarray(labels[va])
    Xt = jnp.asarray(x_test, jnp.float32)
    spec = arch_spec(cfg, arch, width, "ntk", 10)
    key = streams.key(cfg.seed, TRAINED_STREAM, seed, width, ARCHS.index(arch))
    apply_fn, params = ARCHITECTURES.get(arch).build(spec, x.shape[1], key, jnp.float32)
    lr = p.trained_cnn_lr if arch == "cnn" and p.trained_cnn_lr is not None else p.trained_lr
    opt = optax.adam(lr)
    state = opt.init(params)

    def loss_fn(prm, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(prm, xb), yb).mean()

    @jax.jit
    def epoch(prm, st, order):
        bs = min(p.trained_batch_size, order.shape[0])
        nb = order.shape[0] // bs

        def body(i, carry):
            prm, st = carry
            idx = jax.lax.dynamic_slice(order, (i * bs,), (bs,))
            g = jax.grad(loss_fn)(prm, X[idx], Y[idx])
            upd, st = opt.update(g, st, prm)
            return optax.apply_updates(prm, upd), st

        return jax.lax.fori_loop(0, nb, body, (prm, st))

    predict = jax.jit(apply_fn)
    best, best_params, best_epoch, since = -1.0, params, 0, 0
    ep = 0
    for ep in range(1, p.trained_epochs + 1):
        params, state = epoch(params, state, jnp.asarray(rng.permutation(len(tr)), jnp.int32))
        acc = _accuracy(predict(params, Xv), Yv)
        if acc > best:
            best, best_params, best_epoch, since = acc, params, ep, 0
        else:
            since += 1
            if since >= p.trained_patience:
                break
    train_acc = _accuracy(predict(best_params, X), np.asarray(Y))
    return {"test_accuracy": _accuracy(predict(best_params, Xt), labels_test),
            "val_accuracy": best, "train_accuracy": train_acc, "best_epoch": best_epoch,
            "epochs_run": ep, "n_train": int(len(tr)), "n_val": int(n_val), "lr": float(lr),
            "adam_steps_per_epoch": int(len(tr)) // min(p.trained_batch_size, int(len(tr)))}


def _comparison(p, per_seed, trained) -> dict:
    """Seed-42 kernel test accuracy minus the best trained net's mean, per architecture
    with both kernels and trained nets (``<arch>_<q>_minus_best_trained_<arch>``), and the
    best net's name, mean and sd of the test accuracy and lowest train accuracy."""
    out = {}
    for arch, widths in (("cnn", p.trained_cnn_channels), ("mlp", p.trained_mlp_widths)):
        if arch not in p.rigour_architectures or not widths or 42 not in p.data_seeds:
            continue
        best = max((v for v in trained.values() if v["arch"] == arch),
                   key=lambda v: v["test_accuracy_mean"])
        for q in ("nngp", "ntk"):
            out[f"{arch}_{q}_minus_best_trained_{arch}"] = float(
                per_seed["42"][arch][q]["test_accuracy"] - best["test_accuracy_mean"])
        out[f"best_trained_{arch}"] = f"{arch}_{best['width']}"
        out[f"best_trained_{arch}_accuracy"] = best["test_accuracy_mean"]
        out[f"best_trained_{arch}_sd"] = best["test_accuracy_sd"]
        out[f"best_trained_{arch}_train_accuracy_min"] = float(
            min(r["train_accuracy"] for r in best["runs"]))
    return out


def rigour(cfg, *, log=None) -> dict:
    """The controls behind the MNIST-1D claims (``summary['rigour']``).

    For each data-set seed of ``params.data_seeds`` (``make_dataset`` seed): the
    duplicate check, and for the MLP kernels (``data.n_train`` signals) and the CNN-GAP
    kernels (``params.cnn_n_train`` signals, default the same) :func:`kernel_controls`
    (ridge by k-fold CV on the training split, test accuracy at it, shuffled labels).
    Mean and sample standard deviation over the seeds. Then the trained finite
    baselines (:func:`train_converged`) on seed 42: the MLP at
    ``trained_mlp_widths`` and the CNN-GAP at ``trained_cnn_channels``, each on the
    kernels' training set, ``trained_seeds`` initialisations each.
    """

    p = cfg.params
    n, m = int(cfg.data.n_train), int(cfg.data.n_test)
    sizes = {"mlp": n, "cnn": min(n, p.cnn_n_train or n)}
    per_seed = {}
    for seed in p.data_seeds:
        d = mnist1d_arrays(seed)
        x, y, xt, yt = d["x"][:n], d["y"][:n], d["x_test"][:m], d["y_test"][:m]
        entry = {"duplicates": duplicates(x, xt)}
        for arch in p.rigour_architectures:
            k = sizes[arch]
            fn = analytic_tiles(arch_spec(cfg, arch, 1), arch)
            ktr = tiled_kernel(fn, x[:k].astype(np.float64), None,
                               memory_budget=cfg.kernels.memory_budget, quiet=True)
            kte = tiled_kernel(fn, xt.astype(np.float64), x[:k].astype(np.float64),
                               memory_budget=cfg.kernels.memory_budget, quiet=True)
            entry[arch] = {"n_train": k, **kernel_controls(ktr, kte, y[:k], yt, p.ridge_grid,
                                                           p.cv_folds, seed)}
            if log:
                log(f"rigour seed {seed} {arch}: " + ", ".join(
                    f"{q} {entry[arch][q]['test_accuracy']:.3f}" for q in ("nngp", "ntk")))
        per_seed[str(seed)] = entry
    spread = {}
    for arch in p.rigour_architectures:
        for q in ("nngp", "ntk"):
            for field in ("test_accuracy", "shuffled_test_accuracy"):
                v = np.array([per_seed[str(s)][arch][q][field] for s in p.data_seeds])
                spread[f"{arch}_{q}_{field}"] = {
                    "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "min": float(v.min()), "max": float(v.max()), "seeds": len(v)}
    trained = {}
    d = mnist1d_arrays(42)
    for arch, widths in (("mlp", p.trained_mlp_widths), ("cnn", p.trained_cnn_channels)):
        k = sizes.get(arch, n)
        for w in widths:
            runs = [train_converged(cfg, arch, int(w), d["x"][:k], d["y"][:k], d["x_test"][:m],
                                    d["y_test"][:m], s) for s in range(p.trained_seeds)]
            acc = np.array([r["test_accuracy"] for r in runs])
            trained[f"{arch}_{int(w)}"] = {
                "arch": arch, "width": int(w), "n_train": k, "runs": runs,
                "test_accuracy_mean": float(acc.mean()),
                "test_accuracy_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "best_epoch_max": int(max(r["best_epoch"] for r in runs)),
                "epochs_run_max": int(max(r["epochs_run"] for r in runs))}
            if log:
                log(f"trained {arch} {w}: {acc.mean():.3f}")
    comparison = _comparison(p, per_seed, trained)
    return {"per_seed": per_seed, "seed_spread": spread, "trained": trained,
            "comparison": comparison, "ridge_grid": list(p.ridge_grid), "cv_folds": p.cv_folds,
            "data_seeds": list(p.data_seeds), "n_train": sizes, "n_test": m}


# --------------------------------------------------------------------------
# Summary and figure
# --------------------------------------------------------------------------


def summarize(cfg, results):
    labels = np.asarray(results["limit_labels"])
    names = [str(v) for v in results["limit_variants"]]
    archs = [str(a) for a in results["limit_archs"]]
    kernels, diagnostics, per_width, table, rows = {}, {}, {}, [], []
    for arch in archs:
        kernels[arch] = {
            "NNGP": _accuracy(results[f"limit_{arch}_nngp_out"], labels),
            "NTK": _accuracy(results[f"limit_{arch}_ntk_out"], labels),
            "NTK, t = T": _accuracy(results[f"limit_{arch}_ntk_t_out"], labels),
        }
        diagnostics[arch] = {
            f"{k}_{q}": float(np.asarray(results[f"limit_{arch}_{k}_{q}"]))
            for k in ("nngp", "ntk") for q in ("cond", "f32_gap", "f32_argmax_agreement")}
        for name, a in kernels[arch].items():
            table.append({"model": f"{arch.upper()} {name}", "width": "inf", "single": a,
                          "ensemble": a})
    for wi, w in enumerate(results["widths"]):
        out = np.asarray(results["test_out"][wi, 0], np.float64)  # (K, A, V, m, k)
        acc = np.asarray(results["test_acc"][wi, 0], np.float64)  # (K, A, V)
        K = out.shape[0]
        pw = {}
        for ai, arch in enumerate(ARCHS):
            if arch not in archs:
                continue
            for vi, name in enumerate(names):
                if np.all(np.isnan(acc[:, ai, vi])):
                    continue
                ens = out[:, ai, vi].mean(0)
                e = {"single": float(acc[:, ai, vi].mean()),
                     "single_sd": float(acc[:, ai, vi].std(ddof=1)) if K > 1 else 0.0,
                     "ensemble": _accuracy(ens, labels), "ensemble_size": K,
                     "eta": float(np.nanmean(results["eta"][wi, 0, :, ai, vi])),
                     "final_train_loss": float(np.nanmean(results["final_loss"][wi, 0, :, ai,
                                                                                 vi]))}
                pw[f"{arch} {name}"] = e
                table.append({"model": f"{arch.upper()} {name}", "width": int(w),
                              "single": e["single"], "ensemble": e["ensemble"]})
                for j in range(K):
                    rows.append({"width": int(w), "arch": arch, "variant": name, "init": j,
                                 "test_acc": float(acc[j, ai, vi])})
        per_width[str(int(w))] = pw
    summary = {
        "experiment": NAME,
        "n_train": int(cfg.data.n_train),
        "n_test": int(labels.shape[0]),
        "classes": int(np.asarray(results["limit_" + archs[0] + "_nngp_out"]).shape[1]),
        "steps": int(cfg.train.steps),
        "optimizer": cfg.train.optimizer,
        "batch_size": cfg.train.batch_size,
        "kernels": kernels,
        "kernel_diagnostics": diagnostics,
        "per_width": per_width,
        "rigour": (json.loads(str(np.asarray(results["limit_rigour_json"])))
                   if "limit_rigour_json" in results else None),
        "published": PUBLISHED,
        "published_source": PUBLISHED_SOURCE,
        "table": table,
        "table_markdown": table_markdown(table),
        "metric_definitions": (
            "test accuracy (argmax); single: mean over inits; ensemble: accuracy of the "
            "outputs averaged over inits; +C: centred net f - f0; NTK, t = T: NTK-GP mean "
            "after the same steps; cond: condition number of K + ridge I; f32_gap: "
            "||p32 - p64|| / ||p64|| of the kernel-regression predictions; see "
            "ntkexp.experiments.mnist1d"),
    }
    return summary, rows


def table_markdown(table) -> str:
    lines = ["| model | width | single | ensemble |", "|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['model']} | {r['width']} | {r['single']:.3f} | "
                     f"{r['ensemble']:.3f} |")
    for k, v in PUBLISHED.items():
        lines.append(f"| {k} (published) | - | {v:.2f} | - |")
    return "\n".join(lines)


def plot(results, summary, cfg_dict, fig_dir):
    """Test accuracy against width per architecture and variant; kernels and the
    published baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [int(w) for w in results["widths"]]
    archs = [str(a) for a in results["limit_archs"]]
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.3), squeeze=False)
    colors = ("tab:blue", "tab:red", "tab:green", "tab:purple")
    for ax, arch in zip(axes[0], archs, strict=True):
        keys = sorted({k for w in widths for k in summary["per_width"][str(w)]
                       if k.startswith(arch + " ")})
        for i, key in enumerate(keys):
            c = colors[i % len(colors)]
            pw = [summary["per_width"][str(w)].get(key) for w in widths]
            xs = widths
            ch = (cfg_dict.get("params") or {}).get("cnn_channels")
            if arch == "cnn" and ch:
                xs = [int(c) for c in ch]
            ws = [w for w, e in zip(xs, pw, strict=True) if e]
            pw = [e for e in pw if e]
            ax.plot(ws, [e["single"] for e in pw], "o-", color=c, ms=4, label=f"{key} single")
            ax.plot(ws, [e["ensemble"] for e in pw], "s--", color=c, ms=4,
                    label=f"{key} ensemble of {pw[0]['ensemble_size']}")
        for (name, a), ls in zip(summary["kernels"][arch].items(), ("-", ":", "-."),
                                 strict=False):
            ax.axhline(a, color="k", ls=ls, lw=1.2, label=f"{name} ({a:.3f})")
        pub = summary["published"]["CNN" if arch == "cnn" else "MLP"]
        ax.axhline(pub, color="0.5", ls="--", lw=1.0,
                   label=f"published {arch.upper()} ({pub:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden units" if arch == "mlp" else "channels")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{arch.upper()}: finite vs infinite", fontsize=9)
        ax.legend(fontsize=6.5)
        ax.grid(alpha=0.3)
    fig.suptitle(f"MNIST-1D, n = {summary['n_train']}, {summary['steps']} steps of "
                 f"{summary['optimizer']}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, fig_dir, NAME)


def check(cfg):
    if cfg.model.arch != "mlp":
        raise ConfigError(f"model.arch: {NAME} takes the MLP from model (arch: mlp) and "
                          "builds the CNN from params.cnn_*")
    if len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"train.learning_rate: {NAME} needs one learning rate")
    ch = cfg.params.cnn_channels
    if ch is not None and len(ch) != len(cfg.model.widths):
        raise ConfigError(f"params.cnn_channels: give one channel count per model.width "
                          f"({len(cfg.model.widths)}), got {len(ch)}")
    if cfg.data.n_test < 1:
        raise ConfigError(f"data.n_test: {NAME} measures test accuracy, so n_test must be > 0")


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot,
    unit_work=lambda cfg: max(cfg.train.steps, 1) * len(variants(cfg))
    * len(cfg.params.architectures),
    check=check, main_figure=NAME, per_init=True, readout_from_targets=True))

__all__ = ["NAME", "PUBLISHED", "arch_spec", "compute_unit", "limit_kernels", "reference",
           "train_variant"]
