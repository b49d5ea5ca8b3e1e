"""Property: a config drawn around a shipped one either runs or is one clean error.

Hypothesis starts from each file in configs/ (with its ``tiny`` preset applied,
so that a config that is accepted runs in seconds) and changes one thing: a
value of the wrong type, a value out of range (negative, zero, NaN, infinite),
an unknown key, a key removed, a data file or plug-in module that does not
exist, or a combination the experiments cannot do. Then ``ntkexp run`` (in
process) must either succeed (exit 0, a complete run folder) or exit 2 with
exactly one line on stderr and no run folder. Anything else (a traceback, exit
1, a half-written folder) is a bug. The fast test draws a few examples; the
slow one many more.
"""

import contextlib
import glob
import io
import os
import shutil
import tempfile

import jax
import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from ntkexp import config as C
from ntkexp.cli import main

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
SECTIONS = ("model", "data", "train", "params")
TOP = ("experiment", "seed", "dtype", "device")


def _tiny(path):
    """The config as a dict with its ``tiny`` preset folded in (no presets left)."""
    d = yaml.safe_load(open(path))
    presets = d.pop("presets", {}) or {}
    for key, value in (presets.get("tiny") or {}).items():
        C.apply_override(d, key, value)
    return d


BASES = {os.path.basename(p): _tiny(p) for p in CONFIGS}


def _leaves(d):
    """Dotted paths of the editable leaves (top-level scalars and section entries)."""
    out = [k for k in TOP if k in d]
    for s in SECTIONS:
        if isinstance(d.get(s), dict):
            out += [f"{s}.{k}" for k in d[s]]
    return out


def _set(d, dotted, value):
    *head, last = dotted.split(".")
    node = d
    for h in head:
        node = node[h]
    node[last] = value


def _delete(d, dotted):
    *head, last = dotted.split(".")
    node = d
    for h in head:
        node = node[h]
    del node[last]


WRONG_TYPES = ["oops", {"a": 1}, ["x", "y"], True, None, [[1, 2]]]
OUT_OF_RANGE = [-1, 0, -0.5, float("nan"), float("inf"), float("-inf"), -(10**6)]
# the fast test: changes that every field rejects, so that few examples cost a whole run
FAST_WRONG_TYPES = ["oops", {"a": 1}, ["x", "y"]]
FAST_OUT_OF_RANGE = [float("nan"), -(10**6)]
# (dotted key, value) pairs no experiment can do, or that name things that do not exist
IMPOSSIBLE = [
    ("model.out_dim", 3), ("data.dim", 7), ("train.batch_size", 10**6),
    ("dtype", "float16"), ("device", "tpu"), ("train.optimizer", "adamw"),
    ("model.arch", "transformer"), ("model.activation", "swishy"),
    ("model.parameterization", "mup"), ("data.name", "imagenet"),
    ("train.loss_reduction", "median"), ("experiment", "jacot_fig1"),
    ("experiment", "lee2020_finite_vs_infinite"), ("plugins", ["h14_no_such_module"]),
    ("data", {"name": "npz", "path": "h14_absent.npz", "dim": 2}),
]


@st.composite
def mutated(draw, fast=False):
    name = draw(st.sampled_from(sorted(BASES)))
    d = yaml.safe_load(yaml.safe_dump(BASES[name]))  # deep copy
    kinds = ["wrong_type", "out_of_range", "unknown_key", "impossible"]
    kind = draw(st.sampled_from(kinds if fast else kinds + ["drop"]))
    if kind == "impossible":
        key, value = draw(st.sampled_from(IMPOSSIBLE))
        if "." in key and not isinstance(d.get(key.split(".")[0]), dict):
            d[key.split(".")[0]] = {}
        _set(d, key, value)
        return name, f"{key}={value!r}", d
    if kind == "unknown_key":
        where = draw(st.sampled_from(("",) + SECTIONS))
        node = d if not where else d.setdefault(where, {})
        node["h14_unknown"] = 1
        return name, f"{where or '(top)'}.h14_unknown", d
    leaf = draw(st.sampled_from(_leaves(d)))
    if kind == "drop":
        _delete(d, leaf)
        return name, f"drop {leaf}", d
    if kind == "wrong_type":
        value = draw(st.sampled_from(FAST_WRONG_TYPES if fast else WRONG_TYPES))
    else:
        value = draw(st.sampled_from(FAST_OUT_OF_RANGE if fast else OUT_OF_RANGE))
    _set(d, leaf, value)
    return name, f"{leaf}={value!r}", d


def _case(name, key, value):
    d = yaml.safe_load(yaml.safe_dump(BASES[name]))
    _set(d, key, value)
    return name, f"{key}={value!r}", d


# found by this test: a batch larger than the training set passed the config checks
# and failed inside training (exit 1 after set-up)
BATCH_TOO_LARGE = _case("arora2019_finegrained.yaml", "train.batch_size", 10**6)


def _check(case):
    name, what, d = case
    tmp = tempfile.mkdtemp(prefix="h14_fuzz_")
    try:
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            yaml.safe_dump(d, f)
        out = os.path.join(tmp, "run")
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std), \
                jax.numpy_rank_promotion("allow"):  # the user's default
            code = main(["run", path, "--out", out, "--quiet"])
        lines = err.getvalue().strip().splitlines()
        if code == 0:
            assert os.path.exists(os.path.join(out, "meta.json")), (name, what)
            return
        assert code == 2, (name, what, code, err.getvalue())
        assert len(lines) == 1 and lines[0].startswith("ntkexp: error: "), \
            (name, what, err.getvalue())
        assert not os.path.exists(out), (name, what, "a rejected config wrote", os.listdir(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_every_shipped_config_has_a_tiny_preset():
    assert CONFIGS
    for p in CONFIGS:
        assert "tiny" in (yaml.safe_load(open(p)).get("presets") or {}), p


@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated(fast=True))
@example(case=BATCH_TOO_LARGE)
def test_config_around_a_shipped_one_runs_or_is_one_clean_error(case):
    _check(case)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated())
def test_config_around_a_shipped_one_runs_or_is_one_clean_error_many(case):
    _check(case)
