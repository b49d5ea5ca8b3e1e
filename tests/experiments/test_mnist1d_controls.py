"""The MNIST-1D controls (``ntkexp.experiments.mnist1d``, ``params.rigour``) against
independent truths: the CV ridge against a brute-force per-fold solve, the duplicate
check against planted duplicates, the shuffled-label control at chance, and the trained
baseline's early stopping on a separable problem."""

import numpy as np
import pytest

from ntkexp import config as C
from ntkexp.experiments import mnist1d
from ntkexp.kernels.base import Kernel

CONFIG = "configs/mnist1d_finite_vs_infinite.yaml"


def _blobs(n, k=10, d=6, seed=0, sep=3.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * sep
    labels = np.arange(n) % k
    return centres[labels] + rng.normal(size=(n, d)), labels


def _rbf(a, b, ell=2.0):
    d2 = ((a[:, None, :] - b[None]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * ell**2))


def test_cv_ridge_equals_brute_force_solves_on_training_folds_only():
    x, y = _blobs(90)
    K = _rbf(x, x)
    grid = (1e-6, 1e-3, 1e-1, 1.0, 10.0)
    got = mnist1d.cv_ridge(K, y, grid, folds=3, seed=5)
    perm = np.random.default_rng(5).permutation(90)
    scale = np.mean(np.diag(K))
    want = []
    for r in grid:
        acc = 0.0
        for f in range(3):
            va = perm[f::3]
            tr = np.setdiff1d(perm, va)
            alpha = np.linalg.solve(K[np.ix_(tr, tr)] + r * scale * np.eye(len(tr)),
                                    mnist1d._onehot(y[tr]))
            acc += np.mean(np.argmax(K[np.ix_(va, tr)] @ alpha, 1) == y[va]) / 3
        want.append(acc)
    assert [got["cv_accuracy"][f"{r:.0e}"] for r in grid] == pytest.approx(want, abs=1e-12)
    best = max(range(len(grid)), key=lambda i: (round(want[i], 12), grid[i]))
    assert got["ridge"] == grid[best]


def test_kernel_controls_shuffled_labels_fall_to_chance_and_true_labels_do_not():
    x, y = _blobs(400, seed=1)
    # same centres: draw test points from the training generator's centres
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(10, 6)) * 3.0
    yt = np.arange(300) % 10
    xt = centres[yt] + np.random.default_rng(9).normal(size=(300, 6))
    ktr = Kernel(nngp=_rbf(x, x), ntk=_rbf(x, x, 3.0))
    kte = Kernel(nngp=_rbf(xt, x), ntk=_rbf(xt, x, 3.0))
    out = mnist1d.kernel_controls(ktr, kte, y, yt, (1e-4, 1e-2, 1.0), folds=3, seed=0)
    for q in ("nngp", "ntk"):
        assert out[q]["test_accuracy"] > 0.9
        # 300 test points at chance 0.1: 4 standard errors is 0.07
        assert abs(out[q]["shuffled_test_accuracy"] - 0.1) < 0.07
        assert out[q]["test_accuracy"] == out[q]["test_accuracy_by_ridge"][
            f"{out[q]['cv_ridge']:.0e}"]


def test_duplicates_finds_planted_copies():
    x, _ = _blobs(50)
    xt, _ = _blobs(20, seed=3)
    assert mnist1d.duplicates(x, xt)["duplicates"] == 0
    xt[[2, 7]] = x[[10, 11]]
    xt[5] = x[3] + 1e-9
    got = mnist1d.duplicates(x, xt)
    assert got["duplicates"] == 3 and got["exact_duplicates"] == 2


def test_mnist1d_test_signals_are_not_training_signals():
    from ntkexp.data import mnist1d_arrays

    d = mnist1d_arrays(42)
    got = mnist1d.duplicates(d["x"], d["x_test"])
    assert got["duplicates"] == 0 and got["min_nn_distance_rel"] > 0.05


def test_trained_baseline_fits_a_separable_problem_and_stops_early():
    cfg = C.load(CONFIG, preset="tiny", overrides=[
        "params.trained_epochs=200", "params.trained_patience=5", "params.trained_lr=0.01",
        "params.trained_batch_size=32"])
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 40)) * 2
    y = np.arange(300) % 10
    x = centres[y] + 0.3 * rng.normal(size=(300, 40))
    yt = np.arange(100) % 10
    xt = centres[yt] + 0.3 * rng.normal(size=(100, 40))
    r = mnist1d.train_converged(cfg, "mlp", 32, x, y, xt, yt, seed=0)
    assert r["test_accuracy"] > 0.95 and r["val_accuracy"] > 0.95
    assert r["epochs_run"] < 200 and r["epochs_run"] - r["best_epoch"] == 5
    assert r["n_train"] + r["n_val"] == 300


def test_trained_cnn_baseline_fits_a_separable_problem_at_its_own_step():
    """The CNN-GAP baseline (same code path as the MLP, ``trained_cnn_lr``) fits
    class-dependent signals: train and test accuracy near 1 on a separable set."""
    cfg = C.load(CONFIG, preset="tiny", overrides=[
        "params.trained_epochs=150", "params.trained_patience=10", "params.trained_lr=0.0",
        "params.trained_cnn_lr=0.03", "params.trained_batch_size=32"])
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(10, 40)) * 2
    y = np.arange(200) % 10
    x = centres[y] + 0.3 * rng.normal(size=(200, 40))
    yt = np.arange(100) % 10
    xt = centres[yt] + 0.3 * rng.normal(size=(100, 40))
    r = mnist1d.train_converged(cfg, "cnn", 16, x, y, xt, yt, seed=0)
    # the MLP step (0) would not move the net: the CNN used its own
    assert r["lr"] == 0.03
    assert r["train_accuracy"] > 0.95 and r["test_accuracy"] > 0.9
    assert r["epochs_run"] - r["best_epoch"] == 10 or r["epochs_run"] == 150


def test_rigour_end_to_end_compares_the_cnn_kernels_with_the_trained_cnn():
    """rigour() on a small slice: the comparison is the kernel's test accuracy minus the
    best trained CNN's mean, and the trained CNN ran at its own step."""
    cfg = C.load(CONFIG, preset="tiny", overrides=[
        "params.rigour=true", "params.rigour_architectures=[cnn]", "params.data_seeds=[42]",
        "params.cv_folds=2", "params.cnn_n_train=40", "params.trained_cnn_channels=[4]",
        "params.trained_epochs=3", "params.trained_seeds=2", "params.trained_cnn_lr=0.03"])
    out = mnist1d.rigour(cfg)
    net = out["trained"]["cnn_4"]
    assert net["n_train"] == 40 and all(r["lr"] == 0.03 for r in net["runs"])
    assert net["test_accuracy_mean"] == pytest.approx(
        np.mean([r["test_accuracy"] for r in net["runs"]]))
    for q in ("nngp", "ntk"):
        assert out["comparison"][f"cnn_{q}_minus_best_trained_cnn"] == pytest.approx(
            out["per_seed"]["42"]["cnn"][q]["test_accuracy"] - net["test_accuracy_mean"])
