import pytest

from ntkexp.registry import Registry, RegistryError


def test_register_get_and_duplicate():
    r = Registry("widget")
    r.register("a", 1)

    @r.register("b")
    def b():
        return 2

    assert r.get("a") == 1 and r.get("b") is b
    with pytest.raises(RegistryError, match="already registered"):
        r.register("a", 3)
    r.register("a", 3, overwrite=True)
    assert r.get("a") == 3


def test_unknown_lists_known_and_suggests():
    r = Registry("activation")
    r.register("relu", 1)
    r.register("tanh", 2)
    with pytest.raises(RegistryError) as e:
        r.get("rleu")
    msg = str(e.value)
    assert "did you mean 'relu'" in msg and "known: relu, tanh" in msg
