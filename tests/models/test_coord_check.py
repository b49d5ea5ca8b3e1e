"""The muP coordinate check (microsoft/mup's ``coord_check``; Yang et al. 2021,
"Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer", Fig. 5):
train the same MLP for a few GD steps at one learning rate across widths and
record the typical size (mean absolute coordinate) of every hidden layer's
activations. Under muP it stays of order one across widths; under SP at a fixed
learning rate it grows with width, so SP fails the check and muP passes it. (NTK
passes it too, trivially: its features barely move; ``lazy_vs_rich`` measures the
movement itself.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.models.mlp import MLPApply, MLPSpec, init_params

WIDTHS = (64, 256, 1024)
STEPS, LR, DEPTH = 4, 0.2, 2
FLAT = 0.1    # |slope| of log size against log width that counts as "order one"


def coord_sizes(name: str, width: int, seeds: int = 4) -> np.ndarray:
    """Mean |coordinate| of each hidden layer's activations and of the output after
    ``STEPS`` GD steps, averaged over ``seeds`` initialisations: ``(DEPTH + 1,)``."""
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jnp.sin(x[:, :1] * 2.0)
    spec = MLPSpec(depth=DEPTH, width=width, parameterization=name)
    f = MLPApply(spec)

    def one(key):
        p = init_params(spec, 8, key)
        for _ in range(STEPS):
            g = jax.grad(lambda q: 0.5 * jnp.mean((f(q, x) - y) ** 2))(p)
            p = jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g)
        out, inputs = f.forward(p, x)
        return jnp.stack([jnp.mean(jnp.abs(a)) for a in inputs[1:]] + [jnp.mean(jnp.abs(out))])

    return np.asarray(jnp.mean(jax.vmap(one)(jax.random.split(jax.random.key(0), seeds)), 0))


def coord_check(name: str) -> tuple[bool, np.ndarray]:
    """``(passes, slopes)``: the log-log slope of each layer's size against width; the
    check is on the hidden layers (the output, ``O(n^-1/2)`` at a muP initialisation,
    reaches order one only once training has moved it)."""
    sizes = np.stack([coord_sizes(name, w) for w in WIDTHS])          # (W, DEPTH + 1)
    slopes = np.polyfit(np.log(WIDTHS), np.log(sizes), 1)[0]
    return bool(np.all(np.abs(slopes[:DEPTH]) < FLAT)), slopes


def test_mup_passes_the_coordinate_check():
    ok, slopes = coord_check("mup")
    assert ok, slopes


def test_standard_parameterization_fails_it():
    ok, slopes = coord_check("standard")
    assert not ok, slopes
    # the activations blow up with width (Delta h ~ n^{1/2} per step under SP at a fixed lr)
    assert slopes[DEPTH - 1] > 2 * FLAT and slopes[-1] > 2 * FLAT, slopes
    assert math.isfinite(slopes[0])
