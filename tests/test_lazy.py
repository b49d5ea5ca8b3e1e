"""Lazy training (Chizat, Oyallon & Bach 2019): train(..., lazy_alpha=alpha) against the
linearised (kernel) dynamics, whose distance to the trained model and the weights'
movement shrink like 1/alpha (their Thm. 2.3), plus the plumbing (own vjp = autodiff,
ensembles, the config key, bad values)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkexp import config as C
from ntkexp import experiments  # noqa: F401  (registers the experiments' config sections)
from ntkexp.empirical import empirical_ntk
from ntkexp.lazy import LazyApply
from ntkexp.models.mlp import MLPApply, MLPSpec, init_params
from ntkexp.optim import gd
from ntkexp.training import train

SPEC = MLPSpec(depth=2, width=64, W_std=1.4, b_std=0.1)
STEPS, LR = 200, 0.2


def _setup():
    x = jax.random.normal(jax.random.key(0), (10, 3))
    y = jnp.sin(2.0 * x[:, :1])
    return MLPApply(SPEC), init_params(SPEC, 3, jax.random.key(1)), x, y


def _linearised(theta, y, n):
    """Kernel GD on the mean loss from h(0) = 0: h_T = (I - (I - LR Theta / n)^T) y."""
    m = np.eye(n) - LR * np.asarray(theta, np.float64) / n
    return (np.eye(n) - np.linalg.matrix_power(m, STEPS)) @ np.asarray(y, np.float64)


def test_large_alpha_follows_the_kernel_and_moves_weights_like_one_over_alpha():
    f, p0, x, y = _setup()
    theta = empirical_ntk(f, p0, x)
    lin = _linearised(theta, y, x.shape[0])
    errs, moves = {}, {}
    for alpha in (3.0, 30.0):
        res = train(f, p0, x, y, optimizer=gd(LR), steps=STEPS, lazy_alpha=alpha)
        h = alpha * (np.asarray(f(res.params, x)) - np.asarray(f(p0, x)))
        errs[alpha] = np.linalg.norm(h - lin) / np.linalg.norm(lin)
        moves[alpha] = float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(
            jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(p0), strict=True))))
        assert float(res.losses[0]) == pytest.approx(0.5 * float(jnp.mean(y**2)), rel=1e-5)
    assert errs[30.0] < 0.01
    # distance to the linear model O(1/alpha) (a bound: at least x5 smaller for x10 in
    # alpha), weight movement ~ 1/alpha
    assert errs[3.0] / errs[30.0] > 5, errs
    assert 8 < moves[3.0] / moves[30.0] < 12, moves


def test_own_vjp_equals_autodiff_and_ensembles_work():
    f, p0, x, y = _setup()
    plain = lambda p, xx: f(p, xx)  # noqa: E731  (no vjp attribute: jax.vjp path)
    a = train(f, p0, x, y, optimizer=gd(0.5), steps=20, lazy_alpha=2.0)
    b = train(plain, p0, x, y, optimizer=gd(0.5), steps=20, lazy_alpha=2.0)
    for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                    strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    assert callable(getattr(LazyApply(f, 2.0), "vjp", None))
    assert getattr(LazyApply(plain, 2.0), "vjp", None) is None
    ps = jax.vmap(lambda k: init_params(SPEC, 3, k))(jax.random.split(jax.random.key(1), 2))
    ens = train(f, ps, x, y, optimizer=gd(0.5), steps=20, lazy_alpha=2.0, ensemble=True)
    one = train(f, jax.tree_util.tree_map(lambda l: l[0], ps), x, y, optimizer=gd(0.5),
                steps=20, lazy_alpha=2.0)
    np.testing.assert_allclose(ens.losses[0], one.losses, rtol=1e-4)


def test_bad_alpha_is_one_clear_error(tmp_path):
    f, p0, x, y = _setup()
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="lazy_alpha must be a finite number > 0"):
            train(f, p0, x, y, optimizer=gd(0.5), steps=2, lazy_alpha=bad)
    path = tmp_path / "c.yaml"
    path.write_text("experiment: kernel_convergence\ndata:\n  name: sphere\n  n_train: 4\n"
                    "  dim: 3\ntrain:\n  lazy_alpha: {}\n")
    with pytest.raises(C.ConfigError, match="train.lazy_alpha"):
        C.load(str(path).format(), overrides=["train.lazy_alpha=-2"])
    assert C.load(str(path), overrides=["train.lazy_alpha=4"]).train.lazy_alpha == 4.0
