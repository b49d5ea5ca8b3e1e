"""gd / sgd / ngd as optax transformations: update rules vs closed forms, composition, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import rel_err
from ntkexp.optim import DEFAULT_DAMPING, OPTIMIZERS, gd, ngd, ngd_dual_coefficients, sgd


def _linear(k_out=1):
    def f(p, x):
        return x @ p["w"] + p["b"][None, :]
    return f


def _params(key, d, k, dtype):
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (d, k), dtype), "b": jax.random.normal(k2, (k,), dtype)}


@pytest.mark.parametrize("factory", [gd, sgd])
def test_gd_update_and_schedule_under_jit(factory, dtype, tol):
    p = _params(jax.random.key(0), 3, 1, dtype)
    g = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 2, p)
    sched = optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.5)
    tx = factory(sched)
    st = tx.init(p)
    upd = jax.jit(tx.update)
    for k in range(3):
        u, st = upd(g, st, p)
        np.testing.assert_allclose(u["w"], -2 * 0.5 * 0.5**k, rtol=tol["exact"])
        assert u["w"].dtype == dtype
    assert int(st.count) == 3


def test_composes_with_optax_chain(dtype, tol):
    p = _params(jax.random.key(0), 3, 1, dtype)
    g = jax.tree_util.tree_map(lambda a: 10 * jnp.ones_like(a), p)
    tx = optax.chain(optax.clip_by_global_norm(1.0), gd(0.1))
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    norm = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree_util.tree_leaves(u)))
    assert abs(norm - 0.1) < 10 * tol["exact"]


def test_ngd_linear_model_interpolates_in_one_step(dtype, tol):
    """For f = X w + b and eta = 1, one exact NGD step (damping 0) lands on the min-norm
    interpolant (P > n)."""
    n, d = 6, 10
    x = jax.random.normal(jax.random.key(1), (n, d), dtype)
    y = jax.random.normal(jax.random.key(2), (n, 1), dtype)
    f = _linear()
    p = _params(jax.random.key(3), d, 1, dtype)
    tx = ngd(1.0, damping=0.0, apply_fn=f)
    r = f(p, x) - y
    u, _ = jax.jit(tx.update)(None, tx.init(p), p, x=x, residual=r)
    new = optax.apply_updates(p, u)
    assert rel_err(f(new, x), y) < 100 * tol["exact"]
    # independent truth: theta1 = theta0 - A^T (A A^T)^-1 r with A = [X, 1]
    A = np.hstack([np.asarray(x, np.float64), np.ones((n, 1))])
    th0 = np.concatenate([np.asarray(p["w"], np.float64)[:, 0], np.asarray(p["b"], np.float64)])
    th1 = th0 - A.T @ np.linalg.solve(A @ A.T, np.asarray(r, np.float64)[:, 0])
    got = np.concatenate([np.asarray(new["w"])[:, 0], np.asarray(new["b"])])
    assert rel_err(got, th1) < 100 * tol["exact"]


def _tanh_net(n, d, width, k, dtype):
    """A one-hidden-layer tanh net ``f(p, x) -> (n, k)``, its params and inputs ``(n, d)``."""

    def f(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    p = {"w1": jax.random.normal(jax.random.key(4), (d, width), dtype),
         "w2": jax.random.normal(jax.random.key(5), (width, k), dtype)}
    return f, p, jax.random.normal(jax.random.key(6), (n, d), dtype)


def test_ngd_damped_multi_output_matches_explicit_jacobian(dtype, tol):
    """J^T (J J^T + lambda I)^-1 r with an explicit (n k, P) Jacobian of a small tanh net."""
    n, d, k = 5, 3, 2
    f, p, x = _tanh_net(n, d, 7, k, dtype)
    r = jax.random.normal(jax.random.key(7), (n, k), dtype)
    lam, eta = 0.3, 0.7
    tx = ngd(eta, damping=lam, apply_fn=f)
    u, _ = tx.update(None, tx.init(p), p, x=x, residual=r)
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    J = np.asarray(jax.jacobian(lambda t: f(unravel(t), x).reshape(-1))(flat), np.float64)
    expect = -eta * J.T @ np.linalg.solve(J @ J.T + lam * np.eye(n * k),
                                          np.asarray(r, np.float64).reshape(-1))
    got = jax.flatten_util.ravel_pytree(u)[0]
    assert rel_err(got, expect) < 100 * tol["exact"]
    alpha = ngd_dual_coefficients(f, p, x, r, damping=lam)
    assert alpha.shape == (n, k)


def test_ngd_cross_entropy_is_the_damped_gauss_newton_step(dtype, tol):
    """-eta (J^T H J + lambda I)^-1 J^T (p - y), H the softmax Hessian, in parameter space."""
    n, d, k = 5, 3, 3
    f, p, x = _tanh_net(n, d, 6, k, dtype)
    y = jax.nn.one_hot(jnp.array([0, 2, 1, 1, 0]), k, dtype=dtype)
    probs = jax.nn.softmax(f(p, x), axis=-1)
    lam, eta = 0.2, 0.8
    tx = ngd(eta, damping=lam, apply_fn=f, loss="softmax_cross_entropy")
    u, _ = tx.update(None, tx.init(p), p, x=x, residual=probs - y)
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    J = np.asarray(jax.jacobian(lambda t: f(unravel(t), x).reshape(-1))(flat), np.float64)
    P = np.asarray(probs, np.float64)
    H = np.zeros((n * k, n * k))
    for i in range(n):  # block-diagonal softmax Hessian
        H[i * k:(i + 1) * k, i * k:(i + 1) * k] = np.diag(P[i]) - np.outer(P[i], P[i])
    g = J.T @ (P - np.asarray(y, np.float64)).reshape(-1)
    expect = -eta * np.linalg.solve(J.T @ H @ J + lam * np.eye(J.shape[1]), g)
    got = jax.flatten_util.ravel_pytree(u)[0]
    assert rel_err(got, expect) < 1000 * tol["exact"]
    # the loss given as an extra argument (as train passes it) selects the same step
    u2, _ = ngd(eta, damping=lam, apply_fn=f).update(None, tx.init(p), p, x=x,
                                                     residual=probs - y,
                                                     loss="softmax_cross_entropy")
    assert rel_err(jax.flatten_util.ravel_pytree(u2)[0], got) < 10 * tol["exact"]
    with pytest.raises(ValueError, match="damping > 0"):
        ngd(eta, damping=0.0, loss="softmax_cross_entropy")
    with pytest.raises(ValueError, match="loss must be one of"):
        ngd(eta, loss="hinge")


def _repeated_point_problem(dtype, d=10):
    """A linear model on 6 points whose last repeats the first: ``J J^T`` has rank 5."""
    x = jax.random.normal(jax.random.key(1), (5, d), dtype)
    x = jnp.concatenate([x, x[:1]])
    y = jax.random.normal(jax.random.key(2), (5, 1), dtype)
    y = jnp.concatenate([y, y[:1]])
    return _linear(), _params(jax.random.key(3), d, 1, dtype), x, y


@pytest.mark.parametrize("damping", [0.0, None], ids=["damping0", "default"])
def test_ngd_singular_system_gives_the_min_norm_step_not_nan(dtype, damping):
    """A repeated training point makes ``J J^T`` singular: no NaN, the right step.

    Before: ``damping=0`` (then the default) returned all NaN. Truth, for a linear
    model ``f = A theta`` (numpy, float64): ``theta - A^+ r`` (lstsq) for damping 0,
    ``theta - A^T (A A^T + lambda I)^-1 r`` for the default ``lambda``; both
    interpolate the consistent targets. A jitter, when the solve needed one, is on
    record in the state.
    """
    f, p, x, y = _repeated_point_problem(dtype)
    tx = ngd(1.0, apply_fn=f) if damping is None else ngd(1.0, damping=damping, apply_fn=f)
    r = f(p, x) - y
    u, st = jax.jit(tx.update)(None, tx.init(p), p, x=x, residual=r)
    new = optax.apply_updates(p, u)
    for leaf in jax.tree_util.tree_leaves((u, st)):
        assert np.all(np.isfinite(np.asarray(leaf)))
    A = np.hstack([np.asarray(x, np.float64), np.ones((6, 1))])
    r64 = np.asarray(r, np.float64)[:, 0]
    th0 = np.concatenate([np.asarray(p["w"], np.float64)[:, 0], np.asarray(p["b"], np.float64)])
    if damping == 0.0:
        th1 = th0 - np.linalg.lstsq(A, r64, rcond=None)[0]
    else:
        th1 = th0 - A.T @ np.linalg.solve(A @ A.T + DEFAULT_DAMPING * np.eye(6), r64)
    got = np.concatenate([np.asarray(new["w"])[:, 0], np.asarray(new["b"])])
    # measured: step f32 1.3e-6 (jitter 1.5e-5 on a Gram of scale ~20), f64 7e-15;
    # fit f32 7e-6, f64 1.4e-14 (damping 0) or 4.5e-7 (the default damping's bias)
    f64 = dtype == jnp.float64
    assert rel_err(got, th1) < (1e-12 if f64 else 1e-5)
    assert rel_err(f(new, x), y) < ((2e-6 if damping is None else 1e-12) if f64 else 1e-4)
    if damping == 0.0:
        assert float(st.jitter) > 0  # the solve was singular: the jitter is on record
    # a well-posed system needs none
    x2, y2 = x[:5], y[:5]
    _, st2 = tx.update(None, tx.init(p), p, x=x2, residual=f(p, x2) - y2)
    assert float(st2.jitter) == 0.0


def test_ngd_singular_cross_entropy_step_is_finite(dtype):
    """The Gauss-Newton solve with a damping below the working precision: finite, jittered."""
    n, d, k = 4, 3, 3
    f, p, x = _tanh_net(n, d, 6, k, dtype)
    x = jnp.concatenate([x, x[:1]])
    y = jax.nn.one_hot(jnp.array([0, 2, 1, 1, 0]), k, dtype=dtype)
    probs = jax.nn.softmax(f(p, x), axis=-1)
    tx = ngd(1.0, damping=1e-30, apply_fn=f, loss="softmax_cross_entropy")
    u, st = tx.update(None, tx.init(p), p, x=x, residual=probs - y)
    for leaf in jax.tree_util.tree_leaves(u):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert float(st.jitter) > 0


def test_ngd_apply_fn_extra_argument_and_chain(dtype):
    f = _linear()
    p = _params(jax.random.key(0), 4, 1, dtype)
    x = jax.random.normal(jax.random.key(1), (3, 4), dtype)
    r = jnp.ones((3, 1), dtype)
    tx = optax.chain(ngd(0.5), optax.scale(2.0))
    u, _ = tx.update(None, tx.init(p), p, x=x, residual=r, apply_fn=f)
    u1, _ = ngd(1.0, apply_fn=f).update(None, ngd(1.0).init(p), p, x=x, residual=r)
    np.testing.assert_allclose(u["w"], u1["w"], rtol=1e-5)
    with pytest.raises(ValueError, match="apply_fn"):
        ngd(0.5).update(None, ngd(0.5).init(p), p, x=x, residual=r)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_learning_rate(bad):
    for factory in (gd, sgd, ngd):
        with pytest.raises(ValueError, match="learning_rate"):
            factory(bad)


def test_bad_damping_and_types():
    with pytest.raises(ValueError, match="damping"):
        ngd(0.5, damping=-0.1)
    with pytest.raises(TypeError, match="learning_rate"):
        gd("fast")


def test_registry_builders():
    assert {"gd", "sgd", "ngd"} <= set(OPTIMIZERS.names())
    tx = OPTIMIZERS.get("ngd")(learning_rate=0.5, damping=0.1, apply_fn=_linear())
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert isinstance(OPTIMIZERS.get("gd")(learning_rate=1.0), optax.GradientTransformation)
    with pytest.raises(ValueError, match="bad options"):
        OPTIMIZERS.get("gd")(learning_rate=1.0, momentum=0.9)
    with pytest.raises(ValueError, match="learning_rate"):
        OPTIMIZERS.get("sgd")()


def test_equal_arguments_give_the_same_transformation():
    """So that train() reuses its compiled program for gd(0.5) built twice."""
    assert gd(0.5) is gd(0.5) and gd(0.5) is not gd(0.25) and gd(0.5) is not sgd(0.5)
    f = _linear()
    assert ngd(0.5, damping=0.1, apply_fn=f) is ngd(0.5, apply_fn=f, damping=0.1)
