"""The README's Python example runs as written and its claims hold."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)  # noqa: S102
    # Training reduced the loss, and kernel regression interpolates its training data.
    losses = np.asarray(ns["res"].losses)
    assert losses.shape == (201,) and losses[-1] < 0.5 * losses[0]
    nx = ns["nx"]
    f_train = nx.kernel_regression(ns["k"].ntk, ns["k"].ntk, ns["y"])
    np.testing.assert_allclose(np.asarray(f_train), np.asarray(ns["y"]), atol=1e-3)
    assert ns["f_inf"].shape == (5, 1)
