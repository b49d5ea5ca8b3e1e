"""Named, independent random streams: one PRNG key per (purpose, indices).

Every random draw of a run comes from :func:`key`::

    key(seed, purpose, *indices) = fold_in(...fold_in(fold_in(key(seed), PURPOSES[purpose]),
                                                      indices[0])..., indices[-1])

The first ``fold_in`` separates the purposes; the indices (initialisation
number, label draw, a per-purpose counter ...) are folded in only below it.
Two different purposes therefore start from different sub-keys, and no choice
of indices of one purpose can land on the key of another (the runner's
earlier scheme, ``fold_in(root, 1000 + init)`` beside
``fold_in(root, 0x4D43)`` for the Monte Carlo limit, gave initialisation 18779
the Monte Carlo key). ``tests/experiments/test_runner.py`` checks that keys
of different purposes never coincide.

The purposes (stable numbers: changing one changes every number a run
produces):

============== ==== =============================================================
purpose        id   what it draws
============== ==== =============================================================
``data``       1    the dataset (``data.seed`` if set, else ``seed``); no index
``init``       2    the initial parameters of initialisation ``k``: ``(k,)``;
                    the same key at every width, so init k of each width is
                    "the same draw" at another size
``minibatch``  3    SGD mini-batch order of initialisation ``k``, run ``r`` of
                    the unit (e.g. one per label fraction): ``(k, r)``
``monte_carlo`` 4   the initialisations of a Monte Carlo infinite-width limit
``labels``     5    random labels of draw ``k`` (Arora et al. 2019): ``(k,)``
``power``      6    the start vector of a power iteration for initialisation
                    ``k``: ``(k,)``
============== ==== =============================================================

A plug-in experiment uses the same function with these purposes or registers
its own with :func:`register_purpose` (a new, unused id).

Comparing with runs made before these streams (ntkexp 0.1.0 and earlier): with
the environment variable ``NTKEXP_LEGACY_STREAMS=1`` :func:`key` returns the
old keys (root key plus offsets, collisions included), so the same config
gives the old numbers; ``benchmarks/bench_runner.py`` uses it to check that
the faster runner computes the same summaries. Not for new work.
"""

from __future__ import annotations

import os

import jax

PURPOSES: dict[str, int] = {
    "data": 1,
    "init": 2,
    "minibatch": 3,
    "monte_carlo": 4,
    "labels": 5,
    "power": 6,
}


def register_purpose(name: str, ident: int) -> None:
    """Add a stream purpose ``name`` with the stable number ``ident`` (unused so far)."""
    if name in PURPOSES:
        raise ValueError(f"random stream purpose {name!r} is already registered")
    if ident in PURPOSES.values() or int(ident) < 1:
        raise ValueError(f"random stream id {ident} is taken or not positive")
    PURPOSES[name] = int(ident)


def key(seed: int, purpose: str, *indices: int):
    """The PRNG key of ``purpose`` and ``indices`` under ``seed`` (see the module docstring).

    Raises:
      ValueError: an unknown purpose or a negative index.
    """
    try:
        ident = PURPOSES[purpose]
    except KeyError:
        raise ValueError(f"unknown random stream purpose {purpose!r}; known: "
                         f"{', '.join(PURPOSES)}") from None
    if os.environ.get("NTKEXP_LEGACY_STREAMS") == "1" and purpose in _LEGACY:
        return _LEGACY[purpose](jax.random.key(int(seed)), *indices)
    k = jax.random.fold_in(jax.random.key(int(seed)), ident)
    for i in indices:
        if int(i) < 0:
            raise ValueError(f"random stream indices must be >= 0, got {i}")
        k = jax.random.fold_in(k, int(i))
    return k


def _fold(k, *v):
    for i in v:
        k = jax.random.fold_in(k, i)
    return k


# the keys of ntkexp 0.1.0 (root key plus magic offsets), for comparisons only
_LEGACY = {
    "data": lambda r: _fold(r, 0x0DA7A),
    "init": lambda r, k: _fold(r, 1000 + k),
    "minibatch": lambda r, k, run=0: _fold(r, 1000 + k, 7 + run),
    "monte_carlo": lambda r: _fold(r, 0x4D43),
    "labels": lambda r, k: _fold(r, 0x1ABE1, k),
    "power": lambda r, k: _fold(r, 1000 + k, 3),
}


def keys(seed: int, purpose: str, inits, *indices: int):
    """``(K,)`` stacked keys ``key(seed, purpose, k, *indices)`` for ``k`` in ``inits``."""
    import jax.numpy as jnp

    return jnp.stack([key(seed, purpose, k, *indices) for k in inits])


def data_key(cfg):
    """Key of the dataset: ``data.seed`` if set, else ``seed``."""
    s = cfg.data.seed if cfg.data.seed is not None else cfg.seed
    return key(s, "data")


def init_key(cfg, init: int):
    """Key of initialisation ``init`` (the same at every width and learning rate)."""
    return key(cfg.seed, "init", init)


def minibatch_key(cfg, init: int, run: int = 0):
    """Key of the mini-batch order of initialisation ``init``, training run ``run``."""
    return key(cfg.seed, "minibatch", init, run)


def monte_carlo_key(cfg):
    """Key of the Monte Carlo infinite-width limit's initialisations."""
    return key(cfg.seed, "monte_carlo")
