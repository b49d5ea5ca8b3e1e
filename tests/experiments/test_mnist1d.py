"""MNIST-1D: the dataset against the mnist1d package itself, and the experiment's tiny preset
end to end, its kernel-regression outputs checked against an untiled recomputation."""

import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_x64
from ntkexp import config as C
from ntkexp.data import DataError, load_dataset, mnist1d_arrays
from ntkexp.models import ARCHITECTURES

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "mnist1d_finite_vs_infinite.yaml")


def test_mnist1d_is_the_packages_make_dataset_and_leaves_global_rngs_alone():
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    random.seed(7)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    d = mnist1d_arrays()
    assert np.array_equal(np.random.get_state()[1], before_np)
    assert random.getstate() == before_py
    assert d["x"].shape == (4000, 40) and d["x_test"].shape == (1000, 40)
    assert sorted(np.unique(d["y"])) == list(range(10))
    ref = make_dataset(get_dataset_args())  # the package's own call, default args (seed 42)
    assert np.array_equal(d["x"], ref["x"]) and np.array_equal(d["y_test"], ref["y_test"])


@needs_x64  # float64 truth at float64 tolerances
def test_mnist1d_dataset_targets_and_errors():
    cfg = C.DataConfig(name="mnist1d", dim=40, n_train=50, n_test=20)
    ds = load_dataset(cfg, jax.random.key(0), jnp.float64)
    d = mnist1d_arrays()
    assert ds.x_train.shape == (50, 40) and ds.y_test.shape == (20, 10)
    np.testing.assert_array_equal(np.asarray(ds.x_train), d["x"][:50])
    np.testing.assert_array_equal(np.argmax(np.asarray(ds.y_test), 1), d["y_test"][:20])
    assert set(np.unique(np.asarray(ds.y_train))) == {-0.1, 0.9}
    with pytest.raises(DataError, match="length 40"):
        load_dataset(C.DataConfig(name="mnist1d", dim=8), jax.random.key(0))
    with pytest.raises(DataError, match="4000 training"):
        load_dataset(C.DataConfig(name="mnist1d", dim=40, n_train=4001, n_test=1),
                     jax.random.key(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset in float64 (the CNN-GAP NNGP has condition number ~1e7 here, so
    float32 kernels would differ from the untiled ones by ~1e-7 x 1e7 after the solve)."""
    import json

    from ntkexp.cli import main

    d = str(tmp_path_factory.mktemp("mnist1d") / "run")
    with jax.numpy_rank_promotion("allow"):
        assert main(["run", CONFIG, "--preset", "tiny", "--out", d, "--quiet",
                     "--set", "dtype=float64"]) == 0
    with open(os.path.join(d, "summary.json")) as f:
        return d, json.load(f)


def test_tiny_run_kernels_match_untiled_regression(tiny):
    """The tiled-kernel regression of the run equals kernel regression on the kernels
    computed in one untiled call (float64)."""
    from ntkexp.experiments.mnist1d import arch_spec

    run_dir, summary = tiny
    res = np.load(os.path.join(run_dir, "results.npz"))
    cfg = C.load(CONFIG, preset="tiny", overrides=["dtype=float64"])
    d = mnist1d_arrays()
    n, m = cfg.data.n_train, cfg.data.n_test
    x = jnp.asarray(d["x"][:n], jnp.float64)
    xt = jnp.asarray(d["x_test"][:m], jnp.float64)
    y = np.full((n, 10), -0.1)
    y[np.arange(n), d["y"][:n]] = 0.9
    for arch in ("mlp", "cnn"):
        k = ARCHITECTURES.get(arch).analytic(arch_spec(cfg, arch, 1), jnp.concatenate([x, xt]))
        for name in ("nngp", "ntk"):
            K = np.asarray(getattr(k, name), np.float64)
            A = K[:n, :n] + cfg.params.kernel_ridge * np.mean(np.diag(K[:n, :n])) * np.eye(n)
            pred = K[n:, :n] @ np.linalg.solve(A, y)
            got = res[f"limit_{arch}_{name}_out"]
            assert np.max(np.abs(got - pred)) / np.max(np.abs(pred)) < 1e-6, (arch, name)
    assert set(summary["kernels"]) == {"mlp", "cnn"}
    assert summary["published"] == {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94}
    diag = summary["kernel_diagnostics"]["cnn"]
    assert diag["nngp_cond"] > 1 and diag["ntk_f32_gap"] >= 0
    assert os.path.exists(os.path.join(run_dir, "figures", "mnist1d_finite_vs_infinite.png"))
    # every trained variant is in the table (MLP and CNN, raw and centred, both widths)
    finite = [r for r in summary["table"] if r["width"] != "inf"]
    assert len(finite) == 2 * 2 * 2


def test_config_errors():
    with pytest.raises(C.ConfigError, match="cnn_channels"):
        C.load(CONFIG, preset="tiny", overrides=["params.cnn_channels=[4]"])
    with pytest.raises(C.ConfigError, match="kernels.memory_budget"):
        C.load(CONFIG, overrides=["kernels.memory_budget=lots"])
