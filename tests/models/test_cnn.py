"""CNN (1-D/2-D, vec and GAP readouts) and its analytic CNTK (Arora et al. 2019)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import needs_x64, rel_err
from ntkexp.empirical import empirical_ntk
from ntkexp.models.analytic import analytic_kernel
from ntkexp.models.cnn import CNN, CNNApply, CNNSpec, cnn_kernel, init_cnn_params
from ntkexp.models.mlp import MLPSpec
from ntkexp.models.registry import ARCHITECTURES

SHAPES = [(6,), (4, 4)]


def _images(key, n, shape, c, dtype):
    return jax.random.normal(key, (n, *shape, c), dtype)


# ---------------------------------------------------------------- numpy truths


def _np_relu_T(q1, c, q2):
    s = np.sqrt(q1 * q2)
    cos = np.clip(c / s, -1, 1)
    return s * (np.sqrt(1 - cos**2) + (np.pi - np.arccos(cos)) * cos) / (2 * np.pi)


def _np_relu_Tdot(q1, c, q2):
    return (np.pi - np.arccos(np.clip(c / np.sqrt(q1 * q2), -1, 1))) / (2 * np.pi)


def _np_patches(x, q):
    """Explicit zero-padded 'SAME' patches: (n, N, P*C), lax convention (lo=(q-1)//2)."""
    n, *shape, c = x.shape
    lo = (q - 1) // 2
    xp = np.pad(x, [(0, 0)] + [(lo, q - 1 - lo)] * len(shape) + [(0, 0)])
    out = []
    for pos in itertools.product(*[range(s) for s in shape]):
        win = xp[(slice(None),) + tuple(slice(p, p + q) for p in pos)]
        out.append(win.reshape(n, -1))
    return np.stack(out, axis=1)


def _np_one_layer_cntk(x1, x2, q, w_std, b_std, readout):
    """CNTK of depth 1 (relu) from explicit patch vectors, in float64 numpy."""
    p1, p2 = _np_patches(np.asarray(x1, np.float64), q), _np_patches(np.asarray(x2, np.float64), q)
    fan = p1.shape[-1]
    w2, b2 = w_std**2, b_std**2
    S = w2 * np.einsum("nif,mjf->nmij", p1, p2) / fan + b2
    q1 = w2 * np.einsum("nif,nif->ni", p1, p1) / fan + b2
    q2 = w2 * np.einsum("mjf,mjf->mj", p2, p2) / fan + b2
    Q1, Q2 = q1[:, None, :, None], q2[None, :, None, :]
    K, Kd = _np_relu_T(Q1, S, Q2), _np_relu_Tdot(Q1, S, Q2)
    if readout == "vec":
        K, S, Kd = (np.diagonal(a, axis1=2, axis2=3) for a in (K, S, Kd))
    nngp = w2 * K.mean(axis=tuple(range(2, K.ndim))) + b2
    ntk = nngp + w2 * (Kd * S).mean(axis=tuple(range(2, K.ndim)))
    return nngp, ntk


# ---------------------------------------------------------------- analytic


@pytest.mark.parametrize(("shape", "q"), [((6,), 2), ((4, 4), 3)])  # even q: lopsided padding
@pytest.mark.parametrize("readout", ["gap", "vec"])
def test_one_layer_matches_explicit_patches(shape, readout, q, dtype, tol):
    """Depth 1 against patch vectors built by hand (checks padding and the 1/P scaling)."""
    x1 = _images(jax.random.key(0), 3, shape, 2, dtype)
    x2 = _images(jax.random.key(1), 2, shape, 2, dtype)
    spec = CNNSpec(depth=1, width=1, image_shape=shape, filter_size=q, readout=readout,
                   W_std=1.3, b_std=0.4)
    k = cnn_kernel(spec, x1, x2)
    nngp, ntk = _np_one_layer_cntk(x1, x2, q, 1.3, 0.4, readout)
    assert k.ntk.dtype == dtype and k.ntk.shape == (3, 2)
    assert rel_err(k.nngp, nngp) < tol["exact"]
    assert rel_err(k.ntk, ntk) < tol["exact"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("readout", ["gap", "vec"])
def test_filter_one_is_mlp_per_position(shape, readout, dtype, tol):
    """q = 1: vec = mean_i MLP(x_i, x'_i); GAP = mean_{i,j} MLP(x_i, x'_j) (MLP analytic)."""
    c = 3
    x1 = _images(jax.random.key(2), 3, shape, c, dtype)
    x2 = _images(jax.random.key(3), 4, shape, c, dtype)
    spec = CNNSpec(depth=3, width=1, image_shape=shape, filter_size=1, readout=readout,
                   W_std=1.4, b_std=0.3)
    k = cnn_kernel(spec, x1, x2)
    mlp = MLPSpec(depth=3, width=1, W_std=1.4, b_std=0.3)
    f1, f2 = x1.reshape(3, -1, c), x2.reshape(4, -1, c)
    N = f1.shape[1]
    km = analytic_kernel(mlp, f1.reshape(-1, c), f2.reshape(-1, c))
    ntk = np.asarray(km.ntk).reshape(3, N, 4, N)
    nngp = np.asarray(km.nngp).reshape(3, N, 4, N)
    if readout == "vec":
        ntk_ref = np.einsum("aibi->ab", ntk) / N
        nngp_ref = np.einsum("aibi->ab", nngp) / N
    else:
        ntk_ref, nngp_ref = ntk.mean(axis=(1, 3)), nngp.mean(axis=(1, 3))
    assert rel_err(k.ntk, ntk_ref) < tol["exact"]
    assert rel_err(k.nngp, nngp_ref) < tol["exact"]


@pytest.mark.parametrize("shape", SHAPES)
def test_vec_diagonal_equals_all_pairs(shape, dtype, tol):
    """The cheap diagonal-only CNTK-V equals the diagonal of the full pixel-pair recursion."""
    x1 = _images(jax.random.key(4), 3, shape, 2, dtype)
    x2 = _images(jax.random.key(5), 2, shape, 2, dtype)
    spec = CNNSpec(depth=3, width=1, image_shape=shape, readout="vec", W_std=1.5, b_std=0.2)
    a = cnn_kernel(spec, x1, x2)
    b = cnn_kernel(spec, x1, x2, pixel_pairs="all")
    assert rel_err(a.ntk, b.ntk) < tol["agree"] * 10
    assert rel_err(a.nngp, b.nngp) < tol["agree"] * 10


@pytest.mark.parametrize("readout", ["gap", "vec"])
def test_symmetry_blocks_flat_inputs_and_edges(readout, dtype, tol):
    shape = (4, 4)
    x = _images(jax.random.key(6), 5, shape, 2, dtype)
    x = x.at[1].set(0.0).at[2].set(-x[0]).at[3].set(1e-3 * x[4])  # zero, antipodal, tiny
    spec = CNNSpec(depth=2, width=1, image_shape=shape, readout=readout, W_std=1.4, b_std=0.1)
    k = cnn_kernel(spec, x)
    for m in k:
        assert m.shape == (5, 5) and m.dtype == dtype
        assert np.all(np.isfinite(np.asarray(m)))
        np.testing.assert_array_equal(np.asarray(m), np.asarray(m).T)
    kc = cnn_kernel(spec, x[:2], x[2:])
    assert rel_err(kc.ntk, k.ntk[:2, 2:]) < tol["agree"] * 10
    kf = cnn_kernel(spec, x.reshape(5, -1))  # flat, channels last
    np.testing.assert_allclose(np.asarray(kf.ntk), np.asarray(k.ntk), rtol=tol["agree"])
    # positive semi-definite up to rounding
    assert np.linalg.eigvalsh(np.asarray(k.ntk, np.float64)).min() > -1e-5 * np.abs(k.ntk).max()


def test_bad_inputs():
    with pytest.raises(ValueError, match="image_shape"):
        CNNSpec(depth=1, width=4, image_shape=(2, 2, 2))
    with pytest.raises(ValueError, match="readout"):
        CNNSpec(depth=1, width=4, image_shape=(4,), readout="max")
    with pytest.raises(ValueError, match="width"):
        CNNSpec(depth=1, width=0, image_shape=(4,))
    spec = CNNSpec(depth=1, width=4, image_shape=(4, 4))
    with pytest.raises(ValueError, match="shape"):
        cnn_kernel(spec, jnp.ones((3, 5, 4, 1)))
    with pytest.raises(ValueError, match="channels"):
        cnn_kernel(spec, jnp.ones((3, 4, 4, 1)), jnp.ones((2, 4, 4, 2)))
    with pytest.raises(ValueError, match="all pixel pairs"):
        cnn_kernel(spec, jnp.ones((3, 4, 4, 1)), pixel_pairs="diagonal")
    params = init_cnn_params(spec, (4, 4, 2), jax.random.key(0))
    with pytest.raises(ValueError, match="channels"):
        CNNApply(spec)(params, jnp.ones((3, 4, 4, 3)))
    with pytest.raises(ValueError, match="multiple"):
        CNN(spec, 17, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- finite network


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_explicit_patches(shape, dtype, tol):
    """Depth-1 forward pass against a numpy patch-matrix implementation."""
    spec = CNNSpec(depth=1, width=5, image_shape=shape, readout="vec", W_std=1.2, b_std=0.5,
                   out_dim=2)
    x = _images(jax.random.key(7), 3, shape, 2, dtype)
    model = CNN(spec, x.shape[1:], rngs=nnx.Rngs(0), dtype=dtype)
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    W = np.asarray(p["convs"][0]["W"], np.float64).reshape(-1, 5)
    pt = _np_patches(np.asarray(x, np.float64), 3)
    z = 1.2 / np.sqrt(W.shape[0]) * pt @ W + 0.5 * np.asarray(p["convs"][0]["b"])
    r = np.maximum(z, 0).reshape(3, -1)
    ro = p["readout"]
    f = 1.2 / np.sqrt(r.shape[1]) * r @ np.asarray(ro["W"]) + 0.5 * np.asarray(ro["b"])
    out = model(x)
    assert out.shape == (3, 2) and out.dtype == dtype
    assert rel_err(out, f) < tol["exact"]
    np.testing.assert_array_equal(np.asarray(CNNApply(spec)(p, x.reshape(3, -1))), np.asarray(out))


def test_image_shape_from_inputs(dtype, tol):
    """image_shape=None: flat (n, d) is a 1-D signal of length d with one channel."""
    spec = CNNSpec(depth=2, width=4, readout="vec", W_std=1.3, b_std=0.2)
    x = jax.random.normal(jax.random.key(13), (3, 6), dtype)
    fixed = spec.replace(image_shape=(6,))
    np.testing.assert_array_equal(np.asarray(cnn_kernel(spec, x).ntk),
                                  np.asarray(cnn_kernel(fixed, x[..., None]).ntk))
    apply_fn, params = ARCHITECTURES.get("cnn").build(spec, 6, jax.random.key(0), dtype)
    assert params["readout"]["W"].shape == (6 * 4, 1)
    np.testing.assert_array_equal(np.asarray(apply_fn(params, x)),
                                  np.asarray(CNNApply(fixed)(params, x)))
    xi = _images(jax.random.key(14), 2, (4, 4), 2, dtype)
    assert cnn_kernel(spec.replace(readout="gap"), xi).ntk.shape == (2, 2)
    with pytest.raises(ValueError, match="CNN inputs must"):
        cnn_kernel(spec, jnp.ones((2, 3, 3, 3, 1)))


@needs_x64
def test_registered():
    arch = ARCHITECTURES.get("cnn")
    spec = arch.make_spec(depth=1, width=8, image_shape=(4,), readout="gap")
    apply_fn, params = arch.build(spec, 8, jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 8), jnp.float64)
    assert apply_fn(params, x).shape == (3, 1)
    k = arch.analytic(spec, x)
    assert k.ntk.shape == (3, 3)
    assert hash(apply_fn) == hash(CNNApply(spec))


def _mean_ntk(spec, x, seeds, key=0):
    def one(k):
        p = init_cnn_params(spec, x.shape[1:], k, x.dtype)
        return empirical_ntk(CNNApply(spec), p, x, method="jacobian")

    return jnp.mean(jax.lax.map(one, jax.random.split(jax.random.key(key), seeds)), axis=0)


@needs_x64
@pytest.mark.parametrize("shape", SHAPES)
def test_cntk_gap_monte_carlo(shape):
    """CNTK-GAP vs the mean empirical NTK over 48 inits at width 64: within 5%."""
    x = _images(jax.random.key(8), 3, shape, 2, jnp.float64)
    spec = CNNSpec(depth=2, width=64, image_shape=shape, readout="gap", W_std=1.4, b_std=0.2)
    assert rel_err(_mean_ntk(spec, x, 48), cnn_kernel(spec, x).ntk) < 0.05


@needs_x64
def test_cntk_vec_monte_carlo():
    x = _images(jax.random.key(9), 3, (4, 4), 2, jnp.float64)
    spec = CNNSpec(depth=2, width=64, image_shape=(4, 4), readout="vec", W_std=1.4, b_std=0.2)
    assert rel_err(_mean_ntk(spec, x, 48), cnn_kernel(spec, x).ntk) < 0.05


@needs_x64
@pytest.mark.parametrize("readout", ["gap", "vec"])
def test_nngp_monte_carlo(readout):
    """Output covariance over 2000 inits (width 16) vs the analytic NNGP within 10%."""
    shape = (6,)
    x = _images(jax.random.key(10), 3, shape, 2, jnp.float64)
    spec = CNNSpec(depth=2, width=16, image_shape=shape, readout=readout, W_std=1.4, b_std=0.2)

    def out(k):
        return CNNApply(spec)(init_cnn_params(spec, x.shape[1:], k, jnp.float64), x)[:, 0]

    f = jax.lax.map(out, jax.random.split(jax.random.key(1), 2000), batch_size=1000)
    cov = np.asarray(f).T @ np.asarray(f) / f.shape[0]
    assert rel_err(cov, cnn_kernel(spec, x).nngp) < 0.1


def _errors(spec, x, widths, seeds):
    """Root-mean-square (over seeds) relative Frobenius error of the empirical NTK per width."""
    k = cnn_kernel(spec, x).ntk
    errs = []
    for w in widths:
        s = spec.replace(width=w)

        def sq_err(key, s=s):
            p = init_cnn_params(s, x.shape[1:], key, x.dtype)
            return jnp.sum((empirical_ntk(CNNApply(s), p, x, method="jacobian") - k) ** 2)

        keys = jax.random.split(jax.random.key(100 + w), seeds)
        mse = np.mean(np.asarray(jax.lax.map(jax.jit(sq_err), keys)))
        errs.append(np.sqrt(mse) / np.linalg.norm(np.asarray(k)))
    return np.array(errs)


@needs_x64
def test_empirical_converges_fast():
    """Fast check: error falls from width 16 to 256 by more than 2x (1/sqrt(n) predicts 4x)."""
    x = _images(jax.random.key(11), 3, (6,), 2, jnp.float64)
    spec = CNNSpec(depth=2, width=1, image_shape=(6,), readout="vec", W_std=1.4, b_std=0.2)
    e = _errors(spec, x, [16, 256], 4)
    assert e[1] < e[0] / 2 and e[1] < 0.2


CASES = [((6,), "gap"), ((6,), "vec"), ((4, 4), "gap"), ((4, 4), "vec")]


@needs_x64
@pytest.mark.slow
@pytest.mark.parametrize(("shape", "readout"), CASES)
def test_empirical_convergence_rate_one_layer(shape, readout):
    """One conv layer: RMS relative error vs width, fitted log-log slope in [-0.65, -0.35].

    With one hidden layer the empirical NTK is a mean of iid per-channel terms
    whose expectation is exactly the analytic CNTK, so E||error||^2 = c / n and
    the RMS slope is -1/2 (up to Monte Carlo noise over the 64 seeds; the
    squared error is heavy-tailed, so fewer seeds give slopes off by ~0.1).
    """
    x = _images(jax.random.key(12), 5, shape, 2, jnp.float64)
    spec = CNNSpec(depth=1, width=1, image_shape=shape, readout=readout, W_std=1.4, b_std=0.2)
    widths = [32, 64, 128, 256]
    e = _errors(spec, x, widths, 64)
    slope = np.polyfit(np.log(widths), np.log(e), 1)[0]
    assert -0.65 <= slope <= -0.35, (slope, e)


@needs_x64
@pytest.mark.slow
@pytest.mark.parametrize(("shape", "readout"), CASES)
def test_empirical_convergence_rate_two_layers(shape, readout):
    """Two conv layers: RMS relative error vs width, fitted slope in [-0.65, -0.35].

    Deeper nets add an O(1/n) bias (E||error||^2 = a/n + b/n^2), which can
    steepen the slope at small widths (measured with 24 seeds: about -0.50 in
    1-D, -0.61 .. -0.63 in 2-D); a wrong limit would flatten it towards 0.
    """
    x = _images(jax.random.key(12), 4, shape, 2, jnp.float64)
    spec = CNNSpec(depth=2, width=1, image_shape=shape, readout=readout, W_std=1.4, b_std=0.2)
    widths = [64, 128, 256] if len(shape) == 2 else [64, 128, 256, 512]
    e = _errors(spec, x, widths, 24)
    slope = np.polyfit(np.log(widths), np.log(e), 1)[0]
    assert -0.65 <= slope <= -0.35, (slope, e)


@needs_x64
@pytest.mark.parametrize("b_std", [0.0, 0.1])
def test_gradients_finite_at_edges(b_std):
    """d(kernel)/dx has no NaN with a zero image and cos = 1 on the diagonal (arccos edge)."""
    x = _images(jax.random.key(15), 3, (4, 4), 2, jnp.float64).at[1].set(0.0)
    spec = CNNSpec(depth=2, width=1, image_shape=(4, 4), W_std=1.4, b_std=b_std)
    g = jax.grad(lambda z: jnp.sum(cnn_kernel(spec, z).ntk) + jnp.sum(cnn_kernel(spec, z).nngp))(x)
    assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------- any activation, one source


def test_kernels_cnn_imports_no_layer_or_model():
    """The package order: kernels/cnn.py is maths (no layer, no model); models/cnn.py
    reaches its kernel through the layer composition (tests/test_imports.py checks all)."""
    import ast

    import ntkexp.kernels.cnn as kc

    with open(kc.__file__) as f:
        tree = ast.parse(f.read())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in names if m and m.startswith(("ntkexp.models", "ntkexp.layers"))]


@pytest.mark.parametrize("act", ["tanh", "softplus", "test_cnn_swish"])
def test_any_activation_analytic_matches_monte_carlo(act):
    """tanh, softplus and a user-registered activation (no closed form: Mehler fallback
    of the layer composition) vs 8 width-128 CNNs, within 5 standard errors + O(1/width)."""
    import ntkexp as nx
    from ntkexp.activations import ACTIVATIONS

    if act not in ACTIVATIONS:
        @nx.register_activation(act)
        def _swish():
            return nx.Activation(act, lambda z: z * jax.nn.sigmoid(z))
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "layers"))
    from mc import assert_within_sampling_error

    spec = CNNSpec(depth=2, width=128, image_shape=(5,), readout="gap", activation=act,
                   W_std=1.3, b_std=0.2)
    x = _images(jax.random.key(20), 3, (5,), 2, jnp.float64)
    k = ARCHITECTURES.get("cnn").analytic(spec, x)
    assert rel_err(k.ntk, cnn_kernel(spec, x).ntk) < 1e-12
    ntks = np.stack([np.asarray(empirical_ntk(
        CNNApply(spec), init_cnn_params(spec, x.shape[1:], kk, jnp.float64), x,
        method="structured")) for kk in jax.random.split(jax.random.key(21), 8)])
    assert_within_sampling_error(ntks, k.ntk, width=128)


def test_cnn_with_tanh_runs(tmp_path):
    """`ntkexp run kernel_convergence --set model.arch=cnn --set model.activation=tanh`."""
    import json
    import os

    import yaml

    from ntkexp.cli import main

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    with open(os.path.join(root, "configs", "kernel_convergence.yaml")) as f:
        cfg = yaml.safe_load(f)
    p = tmp_path / "k.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = str(tmp_path / "run")
    with jax.numpy_rank_promotion("allow"):
        assert main(["run", str(p), "--preset", "tiny", "--out", out, "--quiet",
                     "--set", "model.arch=cnn", "--set", "model.activation=tanh"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["limit"]["method"] == "analytic"


@pytest.mark.parametrize(("shape", "readout"), [((6,), "gap"), ((4, 4), "vec")])
def test_structured_ntk_equals_jacobian(shape, readout, dtype, tol):
    """CNNApply's structured NTK (conv patches x backward vectors) equals autodiff's."""
    spec = CNNSpec(depth=2, width=8, image_shape=shape, readout=readout, W_std=1.4, b_std=0.2,
                   out_dim=2)
    x = _images(jax.random.key(22), 5, shape, 2, dtype)
    p = init_cnn_params(spec, x.shape[1:], jax.random.key(23), dtype)
    s = empirical_ntk(CNNApply(spec), p, x, method="structured")
    j = empirical_ntk(CNNApply(spec), p, x, method="jacobian")
    assert rel_err(s, j) < tol["agree"] * 10
    sf = empirical_ntk(CNNApply(spec), p, x[:2], x[2:], method="auto", trace_outputs=False)
    jf = empirical_ntk(CNNApply(spec), p, x[:2], x[2:], method="jacobian", trace_outputs=False)
    assert sf.shape == (2, 3, 2, 2) and rel_err(sf, jf) < tol["agree"] * 10
