"""train in parts: the model reaches the optimizer; the layout table; the partition.

Truths: ngd with the structured empirical NTK (the model's own per-layer factors) equals
ngd with the jvp NTK (independent autodiff) through train; with frozen leaves train
still trains only the others (their values stay put bit for bit).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkexp as nx
from ntkexp.optim import ngd
from ntkexp.training.layouts import _LOOP_MAX_ROWS, _SEQUENTIAL_BYTES, choose_layout


def _mlp(width=32, n=8, out_dim=1):
    spec = nx.MLPSpec(depth=2, width=width, activation="relu", b_std=0.1, out_dim=out_dim)
    f, ps = nx.init_ensemble(spec, 3, jax.random.split(jax.random.key(0), 1), jnp.float32)
    p = jax.tree_util.tree_map(lambda a: a[0], ps)
    x = jax.random.normal(jax.random.key(1), (n, 3))
    y = jnp.sin(x[:, :out_dim])
    return f, p, x, y


def test_structured_ngd_works_through_train_and_equals_jvp_ngd():
    f, p, x, y = _mlp()
    kw = dict(optimizer=None, steps=4)
    res = {}
    for method in ("structured", "jvp"):
        kw["optimizer"] = ngd(0.5, damping=1e-3, ntk_method=method)
        res[method] = np.asarray(nx.train(f, p, x, y, **kw).losses)
    assert res["structured"][-1] < 0.1 * res["structured"][0]  # NGD converges fast
    np.testing.assert_allclose(res["structured"], res["jvp"], rtol=1e-4, atol=1e-7)


def test_frozen_leaves_stay_put_with_ngd():
    """With a mask the optimizer gets a closure over the trained leaves (no structure)."""
    f, p, x, y = _mlp()

    def mask(params):
        m = jax.tree_util.tree_map(lambda _: True, params)
        m["layers"][0] = jax.tree_util.tree_map(lambda _: False, params["layers"][0])
        return m

    r = nx.train(f, p, x, y, optimizer=ngd(0.5, damping=1e-3, ntk_method="jvp"), steps=2,
                 trainable=mask)
    for a, b in zip(jax.tree_util.tree_leaves(r.params["layers"][0]),
                    jax.tree_util.tree_leaves(p["layers"][0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="structured"):
        nx.train(f, p, x, y, optimizer=ngd(0.5, ntk_method="structured"), steps=1,
                 trainable=mask)


def test_layout_table():
    big = _SEQUENTIAL_BYTES + 1
    assert choose_layout("unroll", ensemble=True, member_bytes=big, rows=4) == "unroll"
    assert choose_layout("auto", ensemble=False, member_bytes=big, rows=4) == "vmap"
    assert choose_layout("auto", ensemble=True, member_bytes=_SEQUENTIAL_BYTES, rows=4) == "vmap"
    if jax.default_backend() == "cpu":
        assert choose_layout("auto", ensemble=True, member_bytes=big,
                             rows=_LOOP_MAX_ROWS - 1) == "loop"
        assert choose_layout("auto", ensemble=True, member_bytes=big,
                             rows=_LOOP_MAX_ROWS) == "sequential"
