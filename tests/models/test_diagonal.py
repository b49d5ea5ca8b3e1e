"""The diagonal linear net (Woodworth et al. 2020): its tangent kernel at init against the
closed form, and the exact Q_alpha solver against a generic constrained optimiser, the KKT
condition and its alpha -> 0 / alpha -> inf limits (min-l1 / min-l2 interpolators)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from ntkexp.empirical import empirical_ntk
from ntkexp.models import ARCHITECTURES
from ntkexp.models import diagonal as D


def _problem(n=6, d=15, k=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    b = np.zeros(d)
    b[rng.choice(d, k, replace=False)] = rng.choice([-1.0, 1.0], k)
    return X, X @ b, b


def test_q_closed_form_properties():
    """q(0) = 0, q'(z) = arcsinh(z/2) (finite differences), q(z) ~ z^2/4 near 0."""
    z = np.linspace(-5, 5, 11)
    h = 1e-6
    assert D.q(0.0) == 0.0
    np.testing.assert_allclose((D.q(z + h) - D.q(z - h)) / (2 * h), np.arcsinh(z / 2), atol=1e-7)
    assert D.q(1e-3) == pytest.approx(1e-6 / 4, rel=1e-4)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 3.0])
def test_solver_matches_generic_optimiser(alpha):
    """Newton on the dual = SLSQP on the primal (min Q_alpha s.t. X beta = y)."""
    X, y, _ = _problem(n=4, d=8)
    beta, nu = D.solve_q_alpha(X, y, alpha)
    res = minimize(lambda b: D.q_alpha(b, alpha), D.min_l2_interpolator(X, y),
                   jac=lambda b: np.arcsinh(b / (2 * alpha**2)), method="SLSQP",
                   constraints=[{"type": "eq", "fun": lambda b: X @ b - y, "jac": lambda b: X}],
                   options={"ftol": 1e-14, "maxiter": 500})
    assert res.success
    np.testing.assert_allclose(beta, res.x, atol=1e-5)
    np.testing.assert_allclose(X @ beta, y, atol=1e-9)
    # KKT: grad Q_alpha(beta) = arcsinh(beta / 2 alpha^2) = X^T nu
    np.testing.assert_allclose(np.arcsinh(beta / (2 * alpha**2)), X.T @ nu, atol=1e-8)


def test_limits_are_l1_and_l2_interpolators():
    X, y, b = _problem(n=12, d=30, k=2)
    l1, l2 = D.min_l1_interpolator(X, y), D.min_l2_interpolator(X, y)
    np.testing.assert_allclose(l1, b, atol=1e-8)  # exact sparse recovery at this n
    small, _ = D.solve_q_alpha(X, y, 1e-4)
    big, _ = D.solve_q_alpha(X, y, 1e3)
    assert np.linalg.norm(small - l1) / np.linalg.norm(l1) < 1e-2
    assert np.linalg.norm(big - l2) / np.linalg.norm(l2) < 1e-6
    # the l1 norm falls monotonically as alpha shrinks (rich regime), l2 norm grows
    path = [D.solve_q_alpha(X, y, a)[0] for a in (10.0, 1.0, 0.1, 0.01)]
    l1s = [np.abs(p).sum() for p in path]
    assert all(u >= v - 1e-9 for u, v in zip(l1s, l1s[1:], strict=False))


def test_tangent_kernel_at_init_is_8_alpha2_linear():
    spec = D.DiagonalSpec(width=5, alpha=0.7)
    arch = ARCHITECTURES.get("diagonal")
    x = jax.random.normal(jax.random.key(0), (4, 5))
    apply_fn, params = arch.build(spec, 5, jax.random.key(1))
    k = arch.analytic(spec, x)
    np.testing.assert_allclose(empirical_ntk(apply_fn, params, x), k.ntk, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k.ntk, 8 * 0.49 * x @ x.T, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(apply_fn(params, x)).max()) == 0.0  # beta(0) = 0


def test_bad_specs_are_clear_errors():
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        D.DiagonalSpec(width=3, alpha=0.0)
    with pytest.raises(ValueError, match="width must be an integer"):
        D.DiagonalSpec(width=0)
    with pytest.raises(ValueError, match="must equal the input dimension"):
        ARCHITECTURES.get("diagonal").build(D.DiagonalSpec(width=3), 4, jax.random.key(0))
