"""The runner: units as ensembles (equal to one-by-one training), traced learning
rates (one compile per shape), named random streams, a cache keyed on the code,
and deterministic resume after a stop between chunks."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkexp import config as C
from ntkexp.experiments import base, common, provenance, streams
from ntkexp.experiments.base import EXPERIMENTS, Unit, run

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIG2 = os.path.join(ROOT, "configs", "jacot_fig2.yaml")
SMALL = ["model.width=[8, 16]", "train.steps=6", "train.inits=3", "params.n_gamma=9"]


def small_cfg(*extra):
    return C.load(FIG2, preset="tiny", overrides=SMALL + list(extra))


# --------------------------------------------------------------------------
# Named random streams
# --------------------------------------------------------------------------


def _key_ints(k):
    return tuple(int(v) for v in np.asarray(jax.random.key_data(k)).reshape(-1))


def test_streams_of_different_purposes_never_share_a_key():
    """Every purpose's keys for indices 0..N-1 are disjoint from every other
    purpose's (and from the index-free data / Monte Carlo keys); the old scheme
    gave initialisation 18779 the Monte Carlo key."""
    n = 20000
    seen: dict[tuple, str] = {}
    for purpose, ident in streams.PURPOSES.items():
        root = jax.random.fold_in(jax.random.key(0), ident)
        assert _key_ints(root) == _key_ints(streams.key(0, purpose))
        ks = np.asarray(jax.random.key_data(
            jax.vmap(lambda i, r=root: jax.random.fold_in(r, i))(jnp.arange(n))))
        keyset = {tuple(row) for row in ks.reshape(n, -1)} | {_key_ints(root)}
        assert len(keyset) == n + 1, purpose
        for kk in keyset:
            assert kk not in seen, (purpose, seen.get(kk))
            seen[kk] = purpose
    # spot checks against the public helpers
    assert _key_ints(streams.key(0, "init", 5)) == tuple(
        np.asarray(jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(
            jax.random.fold_in(jax.random.key(0), streams.PURPOSES["init"]), i))(
            jnp.arange(6))))[5])
    cfg = small_cfg()
    assert _key_ints(streams.init_key(cfg, 18779)) != _key_ints(streams.monte_carlo_key(cfg))
    with pytest.raises(ValueError, match="unknown random stream"):
        streams.key(0, "nope")
    with pytest.raises(ValueError, match="already registered"):
        streams.register_purpose("init", 99)


# --------------------------------------------------------------------------
# Units as ensembles
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name,config,extra", [
    ("jacot_fig2", "jacot_fig2", []),
    ("du2019_fig1", "du2019_fig1", ["model.width=[32]", "train.steps=8"]),
    ("lee2020_finite_vs_infinite", "lee2020_finite_vs_infinite",
     ["model.width=[16]", "train.steps=8", "params.parameterizations=[ntk]"]),
])
def test_ensemble_unit_equals_one_initialisation_at_a_time(name, config, extra):
    """compute_unit on inits (0, 1, 2) at once equals three calls on one init each
    (the same streams), to float32 rounding."""
    path = os.path.join(ROOT, "configs", f"{config}.yaml")
    over = (SMALL if name == "jacot_fig2" else ["train.inits=3"]) + extra
    cfg = C.load(path, preset="tiny", overrides=over)
    exp = EXPERIMENTS.get(name)
    dtype, _ = base.setup_runtime(cfg)
    from ntkexp.data import load_dataset

    data = load_dataset(cfg.data, base.data_key(cfg), dtype)
    w = cfg.model.widths[-1]
    u = Unit(w, cfg.train.learning_rates[0], len(cfg.model.widths) - 1, 0, (0, 1, 2))
    with jax.numpy_rank_promotion("allow"):
        both = exp.compute_unit(cfg, data, u, lambda n: None)
        for i, k in enumerate(u.inits):
            one = exp.compute_unit(cfg, data, u._replace(inits=(k,)), lambda n: None)
            for f, v in one.items():
                a, b = np.asarray(both[f][i], np.float64), np.asarray(v[0], np.float64)
                assert a.shape == b.shape, f
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * max(1, np.abs(b).max()),
                                           err_msg=f"{name}:{f}")


def test_traced_learning_rate_equals_the_baked_one_and_compiles_once():
    """gd with its rate in the optimizer state gives gd(lr)'s steps bit for bit,
    and a second rate reuses the compiled program."""
    from ntkexp import training
    from ntkexp.optim import gd

    cfg = small_cfg()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)
    y = jnp.sin(x[:, :1])
    u = Unit(16, 0.5, 0, 0, (0, 1, 2))
    apply_fn, params = common.build_ensemble(cfg, u, 2, jnp.float32)
    opt = common.make_optimizer(cfg, None, "gd")
    r1 = training.train(apply_fn, params, x, y, optimizer=opt, steps=7, ensemble=True,
                        threads=1, hyperparams={"learning_rate": 0.5})
    before = training._run_chunk_cpu_small._cache_size()
    r2 = training.train(apply_fn, params, x, y, optimizer=opt, steps=7, ensemble=True,
                        threads=1, hyperparams={"learning_rate": jnp.asarray([0.3, 0.2, 0.1])})
    assert training._run_chunk_cpu_small._cache_size() == before  # no new compile
    for lr, res, k in ((0.5, r1, 0), (0.2, r2, 1)):
        ref = training.train(apply_fn, jax.tree_util.tree_map(lambda a, k=k: a[k:k + 1], params),
                             x, y, optimizer=gd(lr), steps=7, ensemble=True, threads=1)
        np.testing.assert_array_equal(np.asarray(res.losses[k]), np.asarray(ref.losses[0]))


# --------------------------------------------------------------------------
# The cache key follows the code
# --------------------------------------------------------------------------


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    mod = tmp_path / "plug" / "h13_cache_plugin.py"
    mod.parent.mkdir()
    mod.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(mod.parent))
    yield mod
    sys.modules.pop("h13_cache_plugin", None)


def test_cache_reuses_unchanged_and_recomputes_changed_code(tmp_path, plugin, monkeypatch):
    cfg = small_cfg("plugins=[h13_cache_plugin]")
    d = str(tmp_path / "run")
    r0 = run(cfg, d, quiet=True)
    assert (r0.computed_units, r0.reused_units) == (6, 0)
    r1 = run(cfg, d, quiet=True)                          # nothing changed: all reused
    assert (r1.computed_units, r1.reused_units) == (0, 6)
    assert r1.summary == r0.summary
    plugin.write_text("VALUE = 2  # a fix in the plug-in\n")
    r2 = run(cfg, d, quiet=True)
    assert r2.computed_units == 6
    meta = json.load(open(os.path.join(d, "meta.json")))
    assert meta["code"]["plugins"]["h13_cache_plugin"] == provenance.module_source_hash(
        "h13_cache_plugin")
    monkeypatch.setattr(provenance, "ntkexp_version", lambda: "999.0")
    provenance.clear_cache()
    try:
        assert run(cfg, d, quiet=True).computed_units == 6   # a new ntkexp version
        assert run(cfg, d, quiet=True).computed_units == 0
    finally:
        monkeypatch.undo()
        provenance.clear_cache()
    assert run(cfg, d, force=True, quiet=True).computed_units == 6   # --force stays


def test_code_fingerprint_names_version_commit_and_sources():
    fp = provenance.code_fingerprint(())
    assert fp["ntkexp"] and fp["source"] and set(fp) == {
        "ntkexp", "git_commit", "git_dirty", "source", "plugins"}
    if fp["git_commit"] is not None:
        assert len(fp["git_commit"]) == 40 and isinstance(fp["git_dirty"], bool)


# --------------------------------------------------------------------------
# Stopping between chunks and resuming
# --------------------------------------------------------------------------


class Stop(Exception):
    pass


def _stop_after(n):
    seen = []

    def hook(unit):
        seen.append(unit)
        if len(seen) == n:
            raise Stop

    return hook, seen


def test_a_stopped_run_resumes_with_only_the_unfinished_inits(tmp_path, monkeypatch):
    """Chunks of one init (a tiny ensemble budget): stop after 4 of 6, rerun: the
    2 missing are computed, and every number equals an uninterrupted run's; a
    whole-unit stop (default budget: chunks are units) resumes the same way."""
    cfg = small_cfg()
    ref = run(cfg, str(tmp_path / "ref"), quiet=True)
    want = dict(np.load(os.path.join(ref.run_dir, "results.npz")))

    monkeypatch.setattr(base, "ENSEMBLE_BYTES", 1)
    d = str(tmp_path / "run")
    hook, seen = _stop_after(4)
    with pytest.raises(Stop):
        run(cfg, d, quiet=True, after_chunk=hook)
    assert [len(u.inits) for u in seen] == [1, 1, 1, 1]
    assert not os.path.exists(os.path.join(d, "meta.json"))
    assert len(os.listdir(os.path.join(d, "units"))) == 4
    again, seen2 = _stop_after(99)
    res = run(cfg, d, quiet=True, after_chunk=again)
    assert (res.computed_units, res.reused_units) == (2, 4)
    assert {(u.width, u.inits) for u in seen2}.isdisjoint({(u.width, u.inits) for u in seen})
    got = dict(np.load(os.path.join(d, "results.npz")))
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=2e-5, atol=1e-6, err_msg=k)
    assert res.summary.keys() == ref.summary.keys()

    monkeypatch.setattr(base, "ENSEMBLE_BYTES", 1 << 30)
    d2 = str(tmp_path / "run2")
    hook, seen = _stop_after(1)
    with pytest.raises(Stop):
        run(cfg, d2, quiet=True, after_chunk=hook)
    assert len(seen[0].inits) == 3
    res2 = run(cfg, d2, quiet=True)
    assert (res2.computed_units, res2.reused_units) == (3, 3)
    got2 = dict(np.load(os.path.join(d2, "results.npz")))
    for k, v in want.items():
        np.testing.assert_array_equal(got2[k], v, err_msg=k)
    assert res2.summary == ref.summary


def test_chunks_and_assignment():
    assert base.chunk_inits((0, 1, 2, 3, 4), 10, budget=25) == [(0, 1), (2, 3), (4,)]
    assert base.chunk_inits((0, 1, 2), 0) == [(0, 1, 2)]
    from ntkexp.experiments.distributed import assign

    owner = assign([5, 1, 1, 1, 1, 1], 2)
    assert owner[0] != owner[1] and owner.count(owner[0]) == 1
    assert assign([1, 1, 1, 1], 2).count(0) == 2
