"""The ``distributed:`` config section reaches ``jax.distributed.initialize``."""

import pathlib

import jax
import pytest

from ntkexp.config import ConfigError, load
from ntkexp.experiments.base import setup_runtime

CFG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "jacot_fig1.yaml")


def test_absent_section_is_single_host(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    cfg = load(CFG, preset="tiny")
    assert cfg.distributed.enabled is False
    setup_runtime(cfg)
    assert calls == []


def test_enabled_section_initialises_with_its_fields(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    cfg = load(CFG, preset="tiny", overrides=[
        "distributed.enabled=true", "distributed.coordinator_address=10.0.0.1:1234",
        "distributed.num_processes=2", "distributed.process_id=1",
        "distributed.local_device_ids=[0]"])
    setup_runtime(cfg)
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2,
                          process_id=1, local_device_ids=[0])]
    # the section does not change what a unit computes, so it is left out of the cache key
    from ntkexp.experiments.base import make_units, unit_hash

    u = make_units(cfg)[0]
    assert unit_hash(cfg, u) == unit_hash(load(CFG, preset="tiny"), u)


@pytest.mark.parametrize("bad", ["distributed.num_proceses=2", "distributed.num_processes=0",
                                 "distributed.enabled=3"])
def test_bad_distributed_values_name_the_key(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load(CFG, overrides=[bad])
