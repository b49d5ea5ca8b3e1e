"""ntkexp.members: stacking members and taking one out, against the per-leaf jnp ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkexp.members import _member, member, stack


def _trees(K, dtype):
    ks = jax.random.split(jax.random.key(0), K)
    return [{"W": jax.random.normal(k, (3, 4), dtype), "b": jnp.full((4,), i, dtype),
             "key": k, "none": None, "n": jnp.asarray(i, jnp.int32)}
            for i, k in enumerate(ks)]


def test_stack_and_member_are_the_per_leaf_ops(dtype):
    trees = _trees(3, dtype)
    s = stack(trees)
    assert s["W"].shape == (3, 3, 4) and s["W"].dtype == dtype and s["none"] is None
    np.testing.assert_array_equal(s["W"], jnp.stack([t["W"] for t in trees]))
    for k, t in enumerate(trees):
        m = member(s, k)
        for name in ("W", "b", "n"):
            np.testing.assert_array_equal(m[name], t[name])
            assert m[name].dtype == t[name].dtype
        np.testing.assert_array_equal(jax.random.key_data(m["key"]),
                                      jax.random.key_data(t["key"]))


def test_member_compiles_once_for_every_index():
    s = stack(_trees(4, jnp.float32))
    before = _member._cache_size()
    for k in range(4):
        member(s, k)
    assert _member._cache_size() - before <= 1


def test_bad_input():
    s = stack(_trees(2, jnp.float32))
    with pytest.raises(IndexError, match="member 2 of an ensemble of 2"):
        member(s, 2)
    with pytest.raises(IndexError):
        member(s, -1)
    with pytest.raises(ValueError, match="at least one member"):
        stack([])
    with pytest.raises(ValueError):
        stack([{"a": jnp.ones(2)}, {"a": jnp.ones(3)}])
