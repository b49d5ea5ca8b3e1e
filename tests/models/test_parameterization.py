"""abc-parameterizations (Yang & Hu 2021): each preset against its definition at two widths
(the initial output variance, the size of the first GD update of the output and of the
hidden features), the ntk/standard presets against the library's original formulas, and
clear errors for an unknown preset or one not defined for the composition."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkexp as nx
from ntkexp import config as C
from ntkexp import experiments  # noqa: F401  (registers the experiments' config sections)
from ntkexp.models import parameterization as P
from ntkexp.models.mlp import MLPApply, MLPSpec, init_params

D_IN, N_PTS, K = 4, 6, 64
W_STD = 1.4


def _data():
    x = jax.random.normal(jax.random.key(10), (N_PTS, D_IN))
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True) * math.sqrt(D_IN)
    y = 10.0 * jax.random.normal(jax.random.key(11), (N_PTS, 1))  # residual ~ -y at init
    return x, y


def _ensemble(spec, k=K):
    keys = jax.random.split(jax.random.key(0), k)
    return jax.vmap(lambda kk: init_params(spec, D_IN, kk))(keys)


def test_ntk_and_standard_presets_are_the_original_formulas():
    """The data (a, b, c, constant placement) reproduces W_std / sqrt(fan_in) in the
    multiplier (ntk) or the initial draw (standard), at every layer."""
    for depth, width in ((1, 16), (3, 64)):
        dims = MLPSpec(depth=depth, width=width).layer_dims(D_IN)
        for h, (fan_in, _) in enumerate(dims):
            wm, bm, wi, bi = P.scales("ntk", depth, h, width=width, fan_in=fan_in,
                                      W_std=W_STD, b_std=0.3)
            assert (wm, bm, wi, bi) == pytest.approx((W_STD / math.sqrt(fan_in), 0.3, 1, 1))
            wm, bm, wi, bi = P.scales("standard", depth, h, width=width, fan_in=fan_in,
                                      W_std=W_STD, b_std=0.3)
            assert (wm, bm, wi, bi) == pytest.approx((1, 1, W_STD / math.sqrt(fan_in), 0.3))


def test_mean_field_is_mup_at_depth_one():
    """abc symmetry (Yang & Hu 2021, eq. 4): mean-field (a=(0,1), b=0, c=-1) and muP
    (a=(-1/2,1/2), b=1/2, c=0) train the same function under GD."""
    x, y = _data()
    outs = []
    for name in ("mup", "mean_field"):
        spec = MLPSpec(depth=1, width=128, W_std=W_STD, b_std=0.2, parameterization=name)
        f = MLPApply(spec)
        p = init_params(spec, D_IN, jax.random.key(3))
        for _ in range(5):
            g = jax.grad(lambda q, f=f: 0.5 * jnp.mean((f(q, x) - y) ** 2))(p)
            p = jax.tree_util.tree_map(lambda a, b: a - 0.5 * b, p, g)
        outs.append(f(p, x))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, depth", [("ntk", 2), ("standard", 2), ("mup", 2),
                                         ("mean_field", 1)])
def test_initial_output_variance(name, depth):
    """Var f(x) at init, over K draws, at widths 128 and 512: the NNGP Sigma(x, x) for
    ntk / standard (width independent); Sigma(x, x) / n for mup and mean_field, whose
    readout weights have variance W_std^2 / n^2 (the SP readout times n^{-1/2})."""
    x, _ = _data()
    ref = nx.analytic_kernel(MLPSpec(depth=depth, width=1, W_std=W_STD), x).nngp
    for width in (128, 512):
        spec = MLPSpec(depth=depth, width=width, W_std=W_STD, parameterization=name)
        out = jax.vmap(MLPApply(spec), in_axes=(0, None))(_ensemble(spec, 256), x)[..., 0]
        var = np.mean(np.asarray(out) ** 2, axis=0)   # mean 0 by symmetry
        want = np.diag(np.asarray(ref)) / (width if name in ("mup", "mean_field") else 1)
        # 256 draws: the variance estimate has relative sd sqrt(2 / 256) = 9%
        assert np.mean(var / want) == pytest.approx(1.0, abs=0.15), (width, var / want)


def _first_update(spec, lr):
    """rms change of the output and of the last hidden features after one GD step."""
    x, y = _data()
    f = MLPApply(spec)

    def one(p):
        g = jax.grad(lambda q: 0.5 * jnp.mean((f(q, x) - y) ** 2))(p)
        p1 = jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)
        h0, h1 = f.forward(p, x)[1][-1], f.forward(p1, x)[1][-1]
        return jnp.sqrt(jnp.mean((f(p1, x) - f(p, x)) ** 2)), jnp.sqrt(jnp.mean((h1 - h0) ** 2))

    df, dh = jax.vmap(one)(_ensemble(spec, 16))
    return float(jnp.mean(df)), float(jnp.mean(dh))


# exponents of (|delta f|, |delta h|) in the width after one small step (Yang & Hu 2021,
# sec. 3, Table 1): NTK kernel regime, SP at a fixed learning rate blows up, muP/MF
# move features by Theta(1)
FIRST_UPDATE = {"ntk": (0.0, -0.5), "standard": (1.0, 0.5), "mup": (0.0, 0.0),
                "mean_field": (0.0, 0.0)}


@pytest.mark.parametrize("name, depth", [("ntk", 2), ("standard", 2), ("mup", 2),
                                         ("mean_field", 1)])
def test_size_of_first_update(name, depth):
    lr = 1e-3  # small: first order in the step, so the exponents are the definition's
    res = {w: _first_update(MLPSpec(depth=depth, width=w, W_std=W_STD, parameterization=name),
                            lr) for w in (256, 1024)}
    slope_f = math.log(res[1024][0] / res[256][0]) / math.log(4)
    slope_h = math.log(res[1024][1] / res[256][1]) / math.log(4)
    want_f, want_h = FIRST_UPDATE[name]
    assert slope_f == pytest.approx(want_f, abs=0.15), res
    assert slope_h == pytest.approx(want_h, abs=0.15), res


def test_unknown_and_undefined_presets_are_one_clear_error():
    with pytest.raises(ValueError, match="unknown parameterization 'mu'; known: ntk, standard"):
        MLPSpec(depth=2, width=8, parameterization="mu")
    with pytest.raises(ValueError, match="'mean_field' is defined for the two-layer net") as e:
        MLPSpec(depth=3, width=8, parameterization="mean_field")
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match="needs at least one hidden layer"):
        MLPSpec(depth=0, width=8, parameterization="mup")


@pytest.mark.parametrize("name", ["mup", "mean_field"])
def test_analytic_kernel_refuses_non_kernel_limits(name):
    spec = MLPSpec(depth=1, width=8, parameterization=name)
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="the infinite-width limit is not a kernel") as e:
        nx.analytic_kernel(spec, x)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match="not a kernel"):
        spec.layers()


def test_config_accepts_presets_and_rejects_bad_compositions(tmp_path):
    base = ("experiment: kernel_convergence\nmodel:\n  arch: mlp\n  depth: {d}\n  width: 16\n"
            "  parameterization: {p}\ndata:\n  name: sphere\n  n_train: 4\n  dim: 3\n")
    path = tmp_path / "c.yaml"
    path.write_text(base.format(d=1, p="mean_field"))
    assert C.load(str(path)).model.spec(16).parameterization == "mean_field"
    path.write_text(base.format(d=2, p="mean_field"))
    with pytest.raises(C.ConfigError, match="two-layer net"):
        C.load(str(path))
    path.write_text(base.format(d=2, p="maximal"))
    with pytest.raises(C.ConfigError, match="parameterization"):
        C.load(str(path))
