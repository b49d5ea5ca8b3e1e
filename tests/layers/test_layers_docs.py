"""docs/extending.md: the one-file layer example works as written, from YAML too."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

import ntkexp as nx

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "extending.md")


def _block(tag: str) -> str:
    with open(DOC) as f:
        text = f.read()
    for body in re.findall(r"```python\n(.*?)```", text, re.S):
        if body.startswith(f"# {tag}"):
            return body
    raise AssertionError(f"no python block starting with '# {tag}' in docs/extending.md")


def test_one_file_layer_example():
    from ntkexp.layers import LAYERS, Activation, Dense, build_layers, serial

    ns: dict = {}
    if "scale" in LAYERS:
        LAYERS.unregister("scale")
    exec(compile(_block("my_layers.py"), "my_layers.py", "exec"), ns)
    try:
        net = build_layers([{"dense": {"width": 8}}, {"scale": {"c": 2.0}}, "relu",
                            {"dense": {"out": 1}}])
        # independent truth: scaling a dense layer's output by c is W_std, b_std times c
        ref = serial(Dense(8, W_std=2.0), Activation("relu"), Dense(1, readout=True))
        x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
        k, r = nx.analytic_kernel(net, x), nx.analytic_kernel(ref, x)
        np.testing.assert_allclose(k.nngp, r.nngp, rtol=1e-12)
        np.testing.assert_allclose(k.ntk, r.ntk, rtol=1e-12)
    finally:
        LAYERS.unregister("scale")
