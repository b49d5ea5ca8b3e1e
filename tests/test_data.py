"""Dataset registry: shapes, dtypes, targets against closed forms, clear errors."""

import jax
import numpy as np
import pytest

from ntkexp.config import DataConfig
from ntkexp.data import DATASETS, DataError, load_dataset

KEY = jax.random.key(3)


def test_gaussian_product_target(dtype):
    d = load_dataset(DataConfig(name="gaussian", n_train=50, n_test=7, dim=3), KEY, dtype)
    assert d.x_train.shape == (50, 3) and d.y_train.shape == (50, 1)
    assert d.x_test.shape == (7, 3) and d.x_train.dtype == dtype
    x = np.asarray(d.x_train, np.float64)
    np.testing.assert_allclose(np.asarray(d.y_train)[:, 0], x[:, 0] * x[:, 1], rtol=1e-6)
    again = load_dataset(DataConfig(name="gaussian", n_train=50, n_test=7, dim=3), KEY, dtype)
    np.testing.assert_array_equal(d.x_train, again.x_train)  # same key, same data
    # N(0, I): sample moments of 57 x 3 values are loose but not arbitrary
    allx = np.concatenate([x, np.asarray(d.x_test)])
    assert abs(allx.mean()) < 0.4 and 0.6 < allx.std() < 1.4


def test_circle_points_and_angles(dtype):
    cfg = DataConfig(name="circle", n_train=3, n_test=5, dim=2, angles=(0.0, 1.0, -2.0))
    d = load_dataset(cfg, KEY, dtype)
    g = np.array([0.0, 1.0, -2.0])
    np.testing.assert_allclose(d.x_train, np.stack([np.cos(g), np.sin(g)], 1), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(d.y_train)[:, 0], np.sin(2 * g) / 2, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(d.x_test), axis=1), 1, rtol=1e-6)
    with pytest.raises(DataError, match="angles has 3 entries but data.n_train is 4"):
        load_dataset(DataConfig(name="circle", n_train=4, angles=(0.0, 1.0, 2.0)), KEY)
    with pytest.raises(DataError, match="dimension 2"):
        load_dataset(DataConfig(name="circle", n_train=4, dim=3), KEY)


def test_sphere_is_unit_norm_with_normal_labels(dtype):
    d = load_dataset(DataConfig(name="sphere", n_train=200, dim=10, target="normal"), KEY, dtype)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(d.x_train, np.float64), axis=1), 1,
                               rtol=1e-5)
    y = np.asarray(d.y_train)
    assert 0.7 < y.std() < 1.3 and abs(y.mean()) < 0.3


def test_digits_bundled():
    cfg = DataConfig(name="digits", n_train=100, n_test=20, dim=64, classes=(0, 1))
    d = load_dataset(cfg, KEY)
    assert d.x_train.shape == (100, 64) and d.y_train.shape == (100, 2)
    assert float(d.x_train.min()) >= 0 and float(d.x_train.max()) <= 1
    y = np.asarray(d.y_train)
    np.testing.assert_allclose(np.sort(y, axis=1), np.tile([-0.1, 0.9], (100, 1)), atol=1e-6)
    with pytest.raises(DataError, match="fewer than"):
        load_dataset(DataConfig(name="digits", n_train=1000, dim=64, classes=(0, 1)), KEY)


def test_npz_round_trip_and_errors(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(6, 3)), y_train=rng.normal(size=6),
                  x_test=rng.normal(size=(2, 3)), y_test=rng.normal(size=(2, 1)))
    path = str(tmp_path / "d.npz")
    np.savez(path, **arrays)
    d = load_dataset(DataConfig(name="npz", path=path, dim=3, n_train=6), KEY, dtype)
    np.testing.assert_allclose(d.x_train, arrays["x_train"], rtol=1e-6)
    assert d.y_train.shape == (6, 1) and d.x_train.dtype == dtype

    def err(match, **kw):
        with pytest.raises(DataError, match=match):
            load_dataset(DataConfig(name="npz", dim=3, **kw), KEY)

    err("needs data.path")
    err("no such file", path=str(tmp_path / "missing.npz"))
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, x_train=arrays["x_train"])
    err("lacks array\\(s\\) y_train, x_test, y_test", path=bad)
    np.savez(bad, **{**arrays, "y_train": rng.normal(size=5)})
    err("mismatched numbers", path=bad)
    (tmp_path / "junk.npz").write_text("not a zip")
    err("not a readable .npz", path=str(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match="data.dim is 4"):
        load_dataset(DataConfig(name="npz", path=path, dim=4), KEY)


def test_registry_lists_builtins():
    assert {"gaussian", "circle", "sphere", "digits", "npz"} <= set(DATASETS.names())
