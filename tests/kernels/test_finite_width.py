"""ntkexp.kernels.finite_width: the estimators on samples with known answers, and the
leading-order vertex recursion against its closed forms (PDLT) and an exact chain."""

import numpy as np
import pytest

from ntkexp.kernels import finite_width as F


def test_moment_ratio_of_a_lognormal():
    """K = exp(s Z): E[K^2] / E[K]^2 = exp(s^2) exactly; 4 standard errors of the
    estimator (delta method from the sample)."""
    rng = np.random.default_rng(0)
    s2 = 0.3
    k = np.exp(np.sqrt(s2) * rng.standard_normal(400_000))
    r = F.moment_ratio(k)
    # delta-method s.e. of mean(k^2) / mean(k)^2
    m1, m2 = k.mean(), (k * k).mean()
    g = np.stack([k * k / m1 ** 2, -2 * m2 / m1 ** 3 * k])
    se = np.sqrt(np.var(g.sum(0)) / k.size)
    assert abs(r - np.exp(s2)) < 4 * se
    assert abs(np.log(r) - s2) < 0.01


def test_normalized_variance_of_a_gamma():
    """Gamma(shape a): Var / mean^2 = 1 / a."""
    rng = np.random.default_rng(1)
    for a in (2.0, 10.0):
        g = rng.gamma(a, 3.0, size=(200_000,))
        assert F.normalized_variance(g) == pytest.approx(1 / a, rel=0.02)


def test_fit_linear_and_origin_recover_exact_coefficients():
    x = np.linspace(0.01, 1, 9)
    inv = 1 / np.arange(1, 10)
    y = 4.0 * x + 0.7 * inv
    c = F.fit_linear(np.stack([x, inv], 1), y)
    assert c == pytest.approx([4.0, 0.7], abs=1e-10)
    assert F.fit_through_origin(x, 3 * x) == pytest.approx(3.0)
    mask = x < 0.5
    y2 = np.where(mask, 2 * x, 100.0)
    assert F.fit_through_origin(x, y2, mask) == pytest.approx(2.0)


def test_bootstrap_fit_covers_a_known_coefficient():
    """Cells whose samples are log-normal with log-variance c * beta: the fitted slope
    of log moment ratio on beta is near c and the 95% interval covers c."""
    rng = np.random.default_rng(2)
    c = 5.0
    betas = np.asarray([0.01, 0.02, 0.04, 0.06])
    samples = np.exp(np.sqrt(c * betas)[:, None] * rng.standard_normal((4, 20_000)))
    slope, (lo, hi), reps = F.bootstrap_fit(samples, betas, F.moment_ratio, np.log,
                                            resamples=200, seed=0)
    assert lo <= c <= hi
    assert lo < slope < hi and hi - lo < 1.5
    assert reps.shape == (200,)


def test_relu_recursion_is_five_per_layer():
    """ReLU at C_W = 2: chi = 1, V'/G^2 = 5 + V/G^2, G constant (PDLT sec. 5.4)."""
    G, r = F.vertex_recursion("relu", 2.0, 0.0, 1.7, 9)
    assert G == pytest.approx(np.full(9, 1.7), rel=1e-6)
    assert r == pytest.approx(5.0 * np.arange(9), rel=1e-4, abs=1e-6)
    assert F.vertex_slope("relu", 2.0) == pytest.approx(5.0, rel=1e-4)


def test_tanh_recursion_slope_two_thirds():
    """tanh at C_W = 1 (K* = 0 class): G ~ 1 / (2 l) and the vertex slope -> 2/3
    (PDLT sec. 5.3, eqs. 5.72-5.73)."""
    G, _ = F.vertex_recursion("tanh", 1.0, 0.0, 1.0, 3000)
    assert G[-1] * 2 * 3000 == pytest.approx(1.0, rel=0.02)
    assert F.vertex_slope("tanh", 1.0, layers=3000) == pytest.approx(2 / 3, rel=2e-3)


def test_relu_exact_vertex_matches_the_chain_it_describes():
    """prod(1 + 5/n) - 1 against a direct simulation of the multiplicative chain
    G_{l+1} = G_l (2/n) sum relu(xi)^2 (independent of the recursion code)."""
    rng = np.random.default_rng(3)
    widths = [8, 16, 4]
    M = 400_000
    g = np.ones(M)
    for n in widths:
        xi = rng.standard_normal((M, n))
        g *= 2.0 / n * np.sum(np.maximum(xi, 0) ** 2, axis=1)
    want = F.relu_output_vertex_exact(widths)
    assert F.normalized_variance(g) == pytest.approx(want, rel=0.03)
    # first order in 1/n is the recursion's 5 sum 1/n
    assert F.relu_output_vertex_exact([10_000] * 3) == pytest.approx(15 / 10_000, rel=1e-3)
