"""Woodworth et al. (COLT 2020), "Kernel and Rich Regimes in Overparametrized Models",
section 4 and Figure 1: the diagonal linear net trained from scale alpha, against
the exact implicit bias ``argmin Q_alpha(beta) s.t. X beta = y``.

Set-up: ``X (n, d)`` with ``n < d`` i.i.d. ``N(0, 1)`` entries (``data.name:
gaussian``, ``data.n_train = n``, ``data.dim = d = model.width``); for each
initialisation number k (the ``train.inits`` problem instances) a sparse
``beta*`` with ``params.sparsity`` entries ``+-1`` on a random support
(stream ``init``, key k) and ``y = X beta*`` (noiseless). The model
(:mod:`ntkexp.models.diagonal`) is ``beta = w_plus^2 - w_minus^2`` with
``w_plus(0) = w_minus(0) = alpha``; for every ``alpha`` in ``params.alphas`` it is
trained by full-batch gradient descent on ``L = 1/(2n) ||X beta - y||^2`` for
``train.steps`` steps (small steps approximating gradient flow). All alphas are
one vmapped program; the step of each is ``train.learning_rate`` (a fraction
of the stability limit) divided by ``lambda_max(X X^T / n) * 4 sqrt(B^2 + 4
alpha^4)``, with ``B = 2 max|beta*|``: ``4 sqrt(beta_i^2 + 4 alpha^4) = 4 (w_plus_i^2 +
w_minus_i^2)`` is the curvature the loss has along coordinate i (``w_plus
w_minus = alpha^2`` is conserved by the flow).

Theory, solved independently of the training (:func:`ntkexp.models.diagonal.
solve_q_alpha`, damped Newton on the dual, float64): ``beta_alpha``, the
minimiser of ``Q_alpha`` on ``{X beta = y}`` (Woodworth et al. 2020, Thm. 1), and
its limits, the minimum-l1 (``scipy.optimize.linprog``) and minimum-l2
(pseudo-inverse) interpolators (Thm. 2: alpha -> 0 and alpha -> inf).

results.npz (K instances, A alphas, d coordinates): ``beta_trained``,
``beta_theory (1, 1, K, A, d)``, ``beta_star``, ``beta_l1``, ``beta_l2 (1, 1,
K, d)``, ``loss_final (1, 1, K, A)``, ``widths``.

summary.json: ``alphas``; per alpha (max over instances) ``rel_gap`` =
``||beta_trained - beta_alpha|| / ||beta_alpha||`` and (means) the population
test error ``||beta - beta*||^2 / ||beta*||^2`` (for ``x ~ N(0, I)``, trained and
theory) and the final loss; ``max_rel_gap`` (over alphas and instances);
``l1_gap`` = ``||beta_alpha_min - beta_l1|| / ||beta_l1||`` and ``l2_gap`` =
``||beta_alpha_max - beta_l2|| / ||beta_l2||`` for the theory and
(``trained_l1_gap``, ``trained_l2_gap``) for the trained nets (max over
instances); ``test_error_l1``, ``test_error_l2``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.config import ConfigError
from ntkexp.experiments.base import Experiment, init_key, register_experiment
from ntkexp.models.diagonal import (
    DiagonalApply,
    DiagonalSpec,
    beta_of,
    min_l1_interpolator,
    min_l2_interpolator,
    solve_q_alpha,
)
from ntkexp.plotting import save_figure

NAME = "woodworth2020"


@dataclasses.dataclass(frozen=True)
class Params:
    """``params:`` section of ``woodworth2020``.

    Attributes:
      alphas: the initialisation scales swept (each > 0).
      sparsity: number of nonzero entries of ``beta*`` (>= 1, <= d).
    """

    alphas: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
    sparsity: int = dataclasses.field(default=5, metadata={"min": 1})


def sparse_target(key, d: int, k: int, dtype=jnp.float64):
    """``beta* (d,)``: ``k`` entries ``+-1`` on a uniformly random support, zeros elsewhere."""
    ks, kv = jax.random.split(key)
    support = jax.random.permutation(ks, d)[:k]
    signs = jnp.where(jax.random.bernoulli(kv, 0.5, (k,)), 1.0, -1.0).astype(dtype)
    return jnp.zeros((d,), dtype).at[support].set(signs)


def step_sizes(X, beta_star, alphas, fraction: float) -> np.ndarray:
    """Per-alpha GD steps ``(A,)``:
    ``fraction / (lambda_max(X X^T / n) 4 sqrt(B^2 + 4 alpha^4))``."""
    X = np.asarray(X, np.float64)
    lam = float(np.linalg.eigvalsh(X @ X.T / X.shape[0]).max())
    B = 2.0 * float(np.max(np.abs(np.asarray(beta_star))))
    a = np.asarray(alphas, np.float64)
    return fraction / (lam * 4.0 * np.sqrt(B**2 + 4.0 * a**4))


@functools.partial(jax.jit, static_argnames=("d", "steps"))
def train_alphas(X, y, alphas, lrs, *, d: int, steps: int):
    """Full-batch GD of the diagonal net for every alpha at once.

    Args:
      X: ``(n, d)``; y: ``(n,)``; alphas, lrs: ``(A,)``.

    Returns:
      ``(beta (A, d), final loss (A,))``.
    """
    apply_fn = DiagonalApply(DiagonalSpec(width=d))

    def loss(p):
        r = apply_fn(p, X)[:, 0] - y
        return 0.5 * jnp.mean(r * r)

    def one(alpha, lr):
        w = jnp.full((d,), 1.0, X.dtype) * alpha
        p0 = {"w_plus": w, "w_minus": w}

        def body(p, _):
            g = jax.grad(loss)(p)
            return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g), None

        p, _ = jax.lax.scan(body, p0, None, length=steps)
        return beta_of(p), loss(p)

    return jax.vmap(one)(alphas, lrs)


def theory_path(X, y, alphas) -> np.ndarray:
    """``beta_alpha`` for every alpha ``(A, d)``, from the largest alpha down (each
    solve warm-started at the previous one's dual point)."""
    out = {}
    nu = None
    for a in sorted(alphas, reverse=True):
        beta, nu = solve_q_alpha(X, y, a, nu0=nu)
        out[a] = beta
    return np.stack([out[a] for a in alphas])


def compute_unit(cfg, data, unit, progress):
    p = cfg.params
    X = data.x_train
    d = X.shape[1]
    alphas = jnp.asarray(p.alphas, X.dtype)
    res = {k: [] for k in ("beta_trained", "beta_theory", "beta_star", "beta_l1", "beta_l2",
                           "loss_final")}
    for k in unit.inits:
        bstar = sparse_target(init_key(cfg, k), d, p.sparsity, X.dtype)
        y = X @ bstar
        lrs = jnp.asarray(step_sizes(X, bstar, p.alphas, unit.learning_rate), X.dtype)
        beta, loss = train_alphas(X, y, alphas, lrs, d=d, steps=cfg.train.steps)
        Xn, yn = np.asarray(X, np.float64), np.asarray(y, np.float64)
        res["beta_trained"].append(np.asarray(beta))
        res["beta_theory"].append(theory_path(Xn, yn, p.alphas))
        res["beta_star"].append(np.asarray(bstar))
        res["beta_l1"].append(min_l1_interpolator(Xn, yn))
        res["beta_l2"].append(min_l2_interpolator(Xn, yn))
        res["loss_final"].append(np.asarray(loss))
        progress(cfg.train.steps)
    return {k: np.stack(v) for k, v in res.items()}


def reference(cfg, data):
    return {}


def _rel(a, b, axis=-1):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=axis) / np.linalg.norm(b, axis=axis)


def summarize(cfg, results):
    alphas = [float(a) for a in cfg.params.alphas]
    bt = np.asarray(results["beta_trained"][0, 0], np.float64)   # (K, A, d)
    bq = np.asarray(results["beta_theory"][0, 0], np.float64)
    bs = np.asarray(results["beta_star"][0, 0], np.float64)      # (K, d)
    b1 = np.asarray(results["beta_l1"][0, 0], np.float64)
    b2 = np.asarray(results["beta_l2"][0, 0], np.float64)
    loss = np.asarray(results["loss_final"][0, 0], np.float64)   # (K, A)
    gap = _rel(bt, bq)                                           # (K, A)

    def test_error(b):  # population risk for x ~ N(0, I), relative to ||beta*||^2
        ref = bs if b.ndim == 2 else bs[:, None]
        return np.sum((b - ref) ** 2, -1) / np.sum(ref**2, -1)

    err_t, err_q = test_error(bt), test_error(bq)
    i_lo, i_hi = int(np.argmin(alphas)), int(np.argmax(alphas))
    per_alpha = [{"alpha": a, "rel_gap": float(gap[:, i].max()),
                  "test_error_trained": float(err_t[:, i].mean()),
                  "test_error_theory": float(err_q[:, i].mean()),
                  "final_loss": float(loss[:, i].mean())}
                 for i, a in enumerate(alphas)]
    summary = {
        "experiment": NAME,
        "alphas": alphas,
        "instances": int(bt.shape[0]),
        "n": int(cfg.data.n_train),
        "d": int(bt.shape[-1]),
        "sparsity": int(cfg.params.sparsity),
        "steps": int(cfg.train.steps),
        "max_rel_gap": float(gap.max()),
        "l1_gap": float(_rel(bq[:, i_lo], b1).max()),
        "l2_gap": float(_rel(bq[:, i_hi], b2).max()),
        "trained_l1_gap": float(_rel(bt[:, i_lo], b1).max()),
        "trained_l2_gap": float(_rel(bt[:, i_hi], b2).max()),
        "test_error_l1": float(test_error(b1).mean()),
        "test_error_l2": float(test_error(b2).mean()),
        "per_alpha": per_alpha,
        "metric_definitions": "relative l2 distances of beta; test error ||beta - beta*||^2 / "
                              "||beta*||^2 (x ~ N(0, I)); see ntkexp.experiments.woodworth2020",
    }
    rows = [{"instance": k, "alpha": a, "rel_gap": float(gap[k, i]),
             "test_error_trained": float(err_t[k, i]), "final_loss": float(loss[k, i])}
            for k in range(bt.shape[0]) for i, a in enumerate(alphas)]
    return summary, rows


def plot(results, summary, cfg_dict, fig_dir):
    import matplotlib.pyplot as plt

    a = np.asarray(summary["alphas"])
    pa = summary["per_alpha"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(a, [r["test_error_theory"] for r in pa], "-", color="k",
             label=r"theory: argmin $Q_\alpha$")
    ax1.plot(a, [r["test_error_trained"] for r in pa], "o", color="tab:red",
             label=f"trained ({summary['steps']} GD steps)")
    ax1.axhline(summary["test_error_l1"], ls="--", color="tab:green", label="min-l1")
    ax1.axhline(summary["test_error_l2"], ls=":", color="tab:blue", label="min-l2")
    ax1.set_xscale("log")
    ax1.set_xlabel(r"initialisation scale $\alpha$")
    ax1.set_ylabel(r"test error $\|\beta-\beta^*\|^2/\|\beta^*\|^2$")
    ax1.set_title(f"n={summary['n']}, d={summary['d']}, k={summary['sparsity']}, "
                  f"{summary['instances']} instances")
    ax1.legend(fontsize=8)
    ax2.loglog(a, [max(r["rel_gap"], 1e-16) for r in pa], "o-", color="tab:red")
    ax2.set_xlabel(r"$\alpha$")
    ax2.set_ylabel(r"$\|\beta_{trained}-\beta_\alpha\|/\|\beta_\alpha\|$ (max)")
    ax2.set_title(f"trained vs exact theory: max gap {summary['max_rel_gap']:.1e}")
    fig.suptitle("Woodworth et al. 2020: kernel (large alpha) to rich (small alpha)")
    return save_figure(fig, fig_dir, NAME)


def check(cfg):
    if cfg.model.arch != "diagonal":
        raise ConfigError(f"model.arch: {NAME} trains the diagonal net; set model.arch: "
                          f"diagonal, got {cfg.model.arch!r}")
    if len(cfg.model.widths) != 1 or len(cfg.train.learning_rates) != 1:
        raise ConfigError(f"model.width / train.learning_rate: {NAME} sweeps alpha only; give "
                          "one width (= data.dim) and one learning rate")
    d = cfg.model.widths[0]
    if cfg.data.dim != d:
        raise ConfigError(f"data.dim: must equal model.width ({d}), got {cfg.data.dim}")
    if cfg.data.n_train >= d:
        raise ConfigError(f"data.n_train: the regression must be underdetermined (n < d = "
                          f"{d}), got {cfg.data.n_train}")
    if cfg.data.name != "gaussian":
        raise ConfigError(f"data.name: {NAME} uses gaussian inputs (its test error assumes "
                          f"x ~ N(0, I)), got {cfg.data.name!r}")
    if cfg.params.sparsity > d:
        raise ConfigError(f"params.sparsity: at most d = {d}, got {cfg.params.sparsity}")
    if not cfg.params.alphas or any(not a > 0 for a in cfg.params.alphas):
        raise ConfigError(f"params.alphas: give positive scales, got {list(cfg.params.alphas)}")
    if cfg.train.steps < 1:
        raise ConfigError("train.steps: must be >= 1")


EXPERIMENT = register_experiment(Experiment(
    name=NAME, params=Params, compute_unit=compute_unit, reference=reference,
    summarize=summarize, plot=plot, check=check, main_figure=NAME))
