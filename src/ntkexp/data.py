"""Dataset and target registries.

A dataset is registered under the name used in YAML (``data.name``) as a
function ``(cfg: DataConfig, key, dtype) -> Dataset``. Built in:

* ``gaussian``: ``x ~ N(0, I_dim)`` (Jacot et al. 2018, Fig. 1 uses dim 2).
* ``circle``: points on the unit circle ``(cos g, sin g)``; training angles from
  ``data.angles`` or evenly spaced; test points evenly spaced on ``[-pi, pi]``
  (Jacot et al. 2018, Fig. 2).
* ``sphere``: uniform on the unit sphere ``S^{dim-1}`` (Du et al. 2019).
* ``digits``: scikit-learn's bundled 8x8 digits (no download), pixels / 16,
  one-hot targets centred to ``0.9 / -0.1`` (Arora et al. 2019b convention);
  ``data.classes`` keeps a subset of the classes.
* ``mnist1d``: MNIST-1D (Greydanus 2020, "Scaling down deep learning"; the
  ``mnist1d`` package's ``make_dataset``, generated locally, no download): 4000
  training and 1000 test signals of length 40, 10 classes, one-hot targets
  ``0.9 / -0.1``. The generator seed is ``data.seed``, default 42 (the
  published set, on which the paper's baselines were measured).
* ``npz``: a user file ``data.path`` with arrays ``x_train, y_train, x_test, y_test``.

``data.dim`` left out follows the data set (:func:`default_dim`): 64 for
``digits``, 40 for ``mnist1d``, the file's feature count for ``npz``, 2 for the
synthetic sets; a ``dim`` given that the data set cannot have is an error.

Targets (``data.target``) for the synthetic datasets: ``product`` (``x1 x2``,
Jacot et al. 2018), ``first`` (``x1``), ``sum`` (``sum_i x_i``), ``normal``
(independent ``N(0, 1)`` labels, Du et al. 2019), ``zero``. ``y`` is ``(n, 1)``.

Users register their own with ``@register_dataset("name")`` from a plugin module.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.registry import Registry

Array = jax.Array


class Dataset(NamedTuple):
    """Train and test arrays.

    Attributes:
      x_train: ``(n_train, d)``.
      y_train: ``(n_train, k)``.
      x_test: ``(n_test, d)`` (``n_test`` may be 0).
      y_test: ``(n_test, k)``.
    """

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array


class DataError(ValueError):
    """A dataset cannot be built from the config (bad file, bad shapes...)."""


DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")
TARGETS: Registry[Callable[[Array, Array], Array]] = Registry("target")


def register_dataset(name: str, *, overwrite: bool = False):
    """Decorator: register ``fn(cfg: DataConfig, key, dtype) -> Dataset``."""
    return DATASETS.register(name, overwrite=overwrite)


def register_target(name: str, *, overwrite: bool = False):
    """Decorator: register ``fn(x (n, d), key) -> y (n,)``."""
    return TARGETS.register(name, overwrite=overwrite)


@register_target("product")
def _product(x, key):
    if x.shape[1] < 2:
        raise DataError("target 'product' (x1 * x2) needs inputs of dimension >= 2")
    return x[:, 0] * x[:, 1]


@register_target("first")
def _first(x, key):
    return x[:, 0]


@register_target("sum")
def _sum(x, key):
    return jnp.sum(x, axis=1)


@register_target("normal")
def _normal(x, key):
    return jax.random.normal(key, (x.shape[0],), x.dtype)


@register_target("zero")
def _zero(x, key):
    return jnp.zeros((x.shape[0],), x.dtype)


#: Feature counts of the built-in data sets whose inputs have a fixed size.
FIXED_DIMS = {"digits": 64, "mnist1d": 40, "circle": 2}
#: ``data.dim`` of the synthetic data sets when the config gives none.
SYNTHETIC_DIM = 2


def default_dim(name: str, path: str | None = None) -> int:
    """``data.dim`` when the config leaves it out: the data set's own feature count.

    Args:
      name: the ``data.name``.
      path: the ``.npz`` file of ``npz`` (its ``x_train`` gives the count).

    Returns:
      ``FIXED_DIMS[name]``; for ``npz`` the width of ``x_train`` in the file (2
      when it cannot be read: loading the data then reports the file's problem);
      else :data:`SYNTHETIC_DIM`. A plug-in data set with an attribute ``dim``
      on its function gives that.
    """
    if name in FIXED_DIMS:
        return FIXED_DIMS[name]
    if name == "npz" and path:
        try:
            with np.load(path, allow_pickle=False) as z:
                shape = z["x_train"].shape
            if len(shape) == 2:
                return int(shape[1])
        except Exception:  # noqa: BLE001 - unreadable: load_dataset says why
            pass
        return SYNTHETIC_DIM
    fn = DATASETS._items.get(name)
    dim = getattr(fn, "dim", None)
    return int(dim) if isinstance(dim, int) and dim > 0 else SYNTHETIC_DIM


def _labels(cfg, x, key):
    kt, kn = jax.random.split(key)
    y = TARGETS.get(cfg.target)(x, kt)
    if cfg.noise > 0:
        y = y + cfg.noise * jax.random.normal(kn, y.shape, x.dtype)
    return y[:, None].astype(x.dtype)


def _split(cfg, x, key) -> Dataset:
    y = _labels(cfg, x, key)
    n = cfg.n_train
    return Dataset(x[:n], y[:n], x[n:], y[n:])


@register_dataset("gaussian")
def _gaussian(cfg, key, dtype) -> Dataset:
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (cfg.n_train + cfg.n_test, cfg.dim), dtype)
    return _split(cfg, x, ky)


def circle_points(gammas, dtype=jnp.float32) -> Array:
    """``(cos g, sin g)`` for angles ``gammas (n,)``: ``(n, 2)``."""
    g = jnp.asarray(gammas, dtype)
    return jnp.stack([jnp.cos(g), jnp.sin(g)], axis=1)


@register_dataset("circle")
def _circle(cfg, key, dtype) -> Dataset:
    if cfg.dim != 2:
        raise DataError(f"dataset 'circle' lives in dimension 2, but data.dim is {cfg.dim}")
    if cfg.angles is not None:
        if len(cfg.angles) != cfg.n_train:
            raise DataError(f"data.angles has {len(cfg.angles)} entries but data.n_train is "
                            f"{cfg.n_train}")
        g_train = np.asarray(cfg.angles, np.float64)
    else:
        g_train = np.linspace(-np.pi, np.pi, cfg.n_train, endpoint=False)
    g_test = np.linspace(-np.pi, np.pi, cfg.n_test) if cfg.n_test else np.zeros((0,))
    x = circle_points(np.concatenate([g_train, g_test]), dtype)
    return _split(cfg, x, key)


@register_dataset("sphere")
def _sphere(cfg, key, dtype) -> Dataset:
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (cfg.n_train + cfg.n_test, cfg.dim), dtype)
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    return _split(cfg, x, ky)


@register_dataset("digits")
def _digits(cfg, key, dtype) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - sklearn is a declared dependency
        raise DataError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") \
            from None
    d = load_digits()
    x, labels = d.data.astype(np.float64) / 16.0, d.target
    classes = tuple(range(10)) if cfg.classes is None else tuple(cfg.classes)
    bad = [c for c in classes if c not in range(10)]
    if bad:
        raise DataError(f"data.classes: digits has classes 0..9, got {bad}")
    keep = np.isin(labels, classes)
    x, labels = x[keep], labels[keep]
    if cfg.dim != x.shape[1]:
        raise DataError(f"dataset 'digits' has dimension 64, but data.dim is {cfg.dim}")
    if cfg.n_train + cfg.n_test > len(x):
        raise DataError(f"digits has {len(x)} images for classes {list(classes)}, fewer than "
                        f"n_train + n_test = {cfg.n_train + cfg.n_test}")
    perm = np.asarray(jax.random.permutation(key, len(x)))
    x, labels = x[perm], labels[perm]
    onehot = np.full((len(x), len(classes)), -0.1)
    onehot[np.arange(len(x)), np.searchsorted(classes, labels)] = 0.9
    n, m = cfg.n_train, cfg.n_train + cfg.n_test
    xs, ys = jnp.asarray(x, dtype), jnp.asarray(onehot, dtype)
    return Dataset(xs[:n], ys[:n], xs[n:m], ys[n:m])


MNIST1D_TRAIN, MNIST1D_TEST, MNIST1D_LENGTH = 4000, 1000, 40


def mnist1d_arrays(seed: int = 42) -> dict[str, np.ndarray]:
    """The MNIST-1D arrays ``x (4000, 40)``, ``y (4000,)``, ``x_test (1000, 40)``,
    ``y_test (1000,)`` from ``mnist1d.data.make_dataset`` with its default arguments
    (5000 signals, train split 0.8, length 40) and generator seed ``seed``.

    ``make_dataset`` seeds NumPy's and Python's global generators; their states are
    restored afterwards, so building the data changes no other random stream.
    """
    return {k: v.copy() for k, v in _mnist1d_cached(int(seed)).items()}


@functools.lru_cache(maxsize=4)
def _mnist1d_cached(seed: int) -> dict[str, np.ndarray]:
    import random

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:  # pragma: no cover - mnist1d is a declared dependency
        raise DataError("dataset 'mnist1d' needs the mnist1d package (pip install mnist1d)") \
            from None
    args = get_dataset_args()
    args.seed = seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}


@register_dataset("mnist1d")
def _mnist1d(cfg, key, dtype) -> Dataset:
    if cfg.dim != MNIST1D_LENGTH:
        raise DataError(f"dataset 'mnist1d' has signals of length {MNIST1D_LENGTH}, but "
                        f"data.dim is {cfg.dim}")
    if cfg.n_train > MNIST1D_TRAIN or cfg.n_test > MNIST1D_TEST:
        raise DataError(f"mnist1d has {MNIST1D_TRAIN} training and {MNIST1D_TEST} test signals; "
                        f"got n_train {cfg.n_train}, n_test {cfg.n_test}")
    d = mnist1d_arrays(42 if cfg.seed is None else cfg.seed)

    def onehot(labels):
        t = np.full((len(labels), 10), -0.1)
        t[np.arange(len(labels)), labels.astype(np.int64)] = 0.9
        return jnp.asarray(t, dtype)

    n, m = cfg.n_train, cfg.n_test
    return Dataset(jnp.asarray(d["x"][:n], dtype), onehot(d["y"][:n]),
                   jnp.asarray(d["x_test"][:m], dtype), onehot(d["y_test"][:m]))


def _npz_array(a, k: str, path: str, dtype):
    """Array ``k`` of the file as a 2-d finite ``(n, features)`` array; clear DataError."""
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"data.path: {k} in {path!r} is not numeric ({a.dtype})")
    if k.startswith("y") and a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise DataError(f"data.path: {k} in {path!r} must be 2-d (n, features), got shape "
                        f"{a.shape}")
    if not np.all(np.isfinite(a)):
        raise DataError(f"data.path: {k} in {path!r} contains NaN or inf")
    return jnp.asarray(a, dtype)


@register_dataset("npz")
def _npz(cfg, key, dtype) -> Dataset:
    path = cfg.path
    if not path:
        raise DataError("dataset 'npz' needs data.path, the .npz file with x_train, y_train, "
                        "x_test, y_test")
    if not os.path.isfile(path):
        raise DataError(f"data.path: no such file {path!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/pickle/ValueError: not a valid npz
        raise DataError(f"data.path: {path!r} is not a readable .npz file ({e})") from None
    names = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in names if k not in arrays]
    if missing:
        raise DataError(f"data.path: {path!r} lacks array(s) {', '.join(missing)}; it has "
                        f"{', '.join(sorted(arrays)) or 'none'}")
    out = [_npz_array(arrays[k], k, path, dtype) for k in names]
    xtr, ytr, xte, yte = out
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise DataError(f"data.path: {path!r} has mismatched numbers of inputs and targets "
                        f"(train {xtr.shape[0]} vs {ytr.shape[0]}, test {xte.shape[0]} vs "
                        f"{yte.shape[0]})")
    if xtr.shape[1] != xte.shape[1] or ytr.shape[1] != yte.shape[1]:
        raise DataError(f"data.path: {path!r} train and test arrays disagree in width")
    if xtr.shape[1] != cfg.dim:
        raise DataError(f"data.dim is {cfg.dim} but x_train in {path!r} has {xtr.shape[1]} "
                        "features")
    return Dataset(xtr, ytr, xte, yte)


def load_dataset(cfg, key, dtype=jnp.float32) -> Dataset:
    """Build the dataset described by ``cfg`` (a ``DataConfig``).

    Args:
      cfg: ``ntkexp.config.DataConfig``.
      key: PRNG key for sampling inputs and random targets.
      dtype: floating dtype of the arrays.

    Raises:
      DataError: the config or file cannot give a dataset (one readable line).
    """
    fn = DATASETS.get(cfg.name)
    out = fn(cfg, key, dtype)
    _check_dataset(cfg.name, fn, out)
    return out


def _check_dataset(name: str, fn, out) -> None:
    """A registered dataset must return a :class:`Dataset` of ``(n, ...)`` inputs
    and ``(n, k)`` targets; otherwise one :class:`DataError` naming it and its module."""
    who = f"dataset {name!r}"
    mod = getattr(fn, "__module__", "") or ""
    if not mod.startswith("ntkexp"):
        who += f" of plugin {mod!r}"
    if not (isinstance(out, tuple) and len(out) == 4):
        raise DataError(f"{who} must return a Dataset(x_train, y_train, x_test, y_test), got "
                        f"{type(out).__name__}")
    shapes = [getattr(a, "shape", None) for a in out]
    names = ("x_train", "y_train", "x_test", "y_test")
    for n, sh in zip(names, shapes, strict=True):
        if sh is None:
            raise DataError(f"{who}: {n} is not an array")
    (xtr, ytr, xte, yte) = shapes
    if (len(xtr) < 2 or len(ytr) != 2 or len(xte) != len(xtr) or len(yte) != 2
            or xtr[0] != ytr[0] or xte[0] != yte[0] or xtr[1:] != xte[1:]
            or ytr[1] != yte[1]):
        raise DataError(f"{who} returned arrays of inconsistent shapes x_train {tuple(xtr)}, "
                        f"y_train {tuple(ytr)}, x_test {tuple(xte)}, y_test {tuple(yte)}; "
                        "expected (n, d), (n, k), (m, d), (m, k)")
