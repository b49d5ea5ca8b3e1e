"""Float64 kernel solves: singular systems are one clear error (never NaN), CG agrees with
Cholesky, the NTK-GP at time t matches the matrix-exponential closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from conftest import needs_x64
from ntkexp.kernels.tiling import tiled_kernel
from ntkexp.models import MLPSpec
from ntkexp.theory import (
    SingularKernelError,
    cg_solve,
    cholesky_solve,
    kernel_regression,
    ntk_gp,
    ntk_predict,
    precision_gap,
    tile_operator,
)
from ntkexp.tiles import analytic_tiles


def _spd(n, lo, hi, seed):
    """SPD matrix with eigenvalues log-spaced in [lo, hi] (condition number hi / lo)."""
    Q, _ = np.linalg.qr(np.random.RandomState(seed).randn(n, n))
    return (Q * np.geomspace(lo, hi, n)) @ Q.T


def _duplicated_kernel():
    spec = MLPSpec(depth=2, width=1, activation="relu", W_std=1.4, b_std=0.1)
    x = np.random.RandomState(0).randn(8, 3)
    x[5] = x[2]  # a repeated training point: K is exactly singular
    from ntkexp.models.analytic import analytic_kernel

    k = analytic_kernel(spec, jnp.asarray(x))
    kt = analytic_kernel(spec, jnp.asarray(x[:3] + 0.1), jnp.asarray(x))
    return k, kt


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_singular_kernel_is_one_error_naming_ridge_never_nan(kind):
    k, kt = _duplicated_kernel()
    K, Kt = getattr(k, kind), getattr(kt, kind)
    y = np.random.RandomState(1).randn(8, 2)
    with pytest.raises(SingularKernelError, match=r"ridge = 0 .* pass ridge > 0"):
        kernel_regression(Kt, K, y, ridge=0.0)
    with pytest.raises(SingularKernelError, match="ridge"):
        ntk_predict(Kt, K, y, np.zeros((3, 2)), np.zeros((8, 2)))
    with pytest.raises(SingularKernelError, match="ridge"):
        ntk_gp(kt.ntk, k.ntk, kt.nngp, k.nngp, np.eye(3), y)
    # the ridge the message suggests works and gives the ridge solution
    r = 1e-6 * float(np.mean(np.diag(K)))
    got = np.asarray(kernel_regression(Kt, K, y, ridge=r))
    A = np.asarray(K, np.float64) + r * np.eye(8)
    expect = np.asarray(Kt, np.float64) @ np.linalg.lstsq(A, y, rcond=None)[0]
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - expect)) / np.max(np.abs(expect)) < 1e-6
    # finite t is well defined for a singular Theta (limit eta t on its null space)
    mean, cov = ntk_gp(kt.ntk, k.ntk, kt.nngp, k.nngp, np.eye(3), y, t=3.0)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))


def test_cg_singular_is_an_error_too():
    K = np.ones((4, 4))  # rank one
    with pytest.raises(SingularKernelError, match="ridge"):
        cg_solve(K, np.arange(4.0), maxiter=50)


def test_cholesky_condition_number_matches_numpy():
    A = _spd(30, 1e-3, 10.0, 2)
    _, info = cholesky_solve(A, np.ones(30))
    exact = np.linalg.cond(A, 1)
    assert exact / 3 <= info.condition_number <= exact * 1.001
    assert info.relative_residual < 1e-12


def test_float32_inputs_are_solved_in_float64():
    """A float32 kernel of condition number 1e6: float32 Cholesky loses ~1e-1 of the
    answer; the float64 solve of the same float32 matrix keeps it to float32 rounding."""
    A = _spd(40, 1e-6, 1.0, 3).astype(np.float32)
    A = (A + A.T) / 2
    b = np.random.RandomState(4).randn(40, 1).astype(np.float32)
    kx = np.eye(40, dtype=np.float32)
    got = kernel_regression(kx, A, b)
    assert got.dtype == jnp.float32
    exact = np.linalg.solve(A.astype(np.float64), b.astype(np.float64))
    assert np.linalg.norm(np.asarray(got, np.float64) - exact) / np.linalg.norm(exact) < 1e-6
    gap = precision_gap(kx, A, b)
    assert gap["relative_gap"] > 1e-4 or gap["float32_failed"]
    well = precision_gap(kx, _spd(40, 1.0, 2.0, 5), b)
    assert well["relative_gap"] < 1e-5 and well["argmax_agreement"] == 1.0


def test_cg_agrees_with_cholesky(tmp_path):
    n = 60
    A = _spd(n, 0.5, 20.0, 6)
    kx = np.random.RandomState(7).randn(9, n)
    y = np.random.RandomState(8).randn(n, 3)
    ref, info_c = kernel_regression(kx, A, y, ridge=0.1, return_info=True)
    got, info = kernel_regression(kx, A, y, ridge=0.1, method="cg", tol=1e-13,
                                  return_info=True)
    rel = np.linalg.norm(np.asarray(got) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
    assert rel < 1e-8
    assert info.method == "cg" and 0 < info.iterations <= 2 * n and info.relative_residual < 1e-12
    # Lanczos estimate of the Jacobi-preconditioned system's 2-norm condition number
    D = np.sqrt(np.diag(A) + 0.1)
    exact = np.linalg.cond((A + 0.1 * np.eye(n)) / D[:, None] / D[None, :])
    assert abs(info.condition_number / exact - 1) < 0.05
    assert info_c.method == "cholesky" and info_c.iterations is None
    # a kernel on disk (memory map, read in row blocks) gives the same
    path = str(tmp_path / "k.npy")
    np.save(path, A)
    mm = np.load(path, mmap_mode="r")
    got_mm = kernel_regression(kx, mm, y, ridge=0.1, method="cg", tol=1e-13)
    assert np.linalg.norm(np.asarray(got_mm) - np.asarray(ref)) / np.linalg.norm(
        np.asarray(ref)) < 1e-8


@needs_x64  # float64 truth at float64 tolerances
def test_matrix_free_cg_over_tiles_agrees_with_cholesky():
    spec = MLPSpec(depth=2, width=1, activation="relu", W_std=1.4, b_std=0.1)
    x = np.random.RandomState(9).randn(23, 4)
    fn = analytic_tiles(spec)
    K = tiled_kernel(fn, x, tile_size=23, quiet=True).ntk
    y = np.random.RandomState(10).randn(23)
    ridge = 0.05 * float(np.mean(np.diag(K)))
    ref, _ = cholesky_solve(K, y, ridge=ridge)
    op = tile_operator(fn, x, tile_size=7, leaf="ntk")
    got, info = cg_solve(op, y, ridge=ridge, tol=1e-13)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-8


@needs_x64  # float64 truth at float64 tolerances
def test_ntk_gp_at_time_t_matches_matrix_exponential():
    """Lee et al. 2019 eq. 16 at finite t against scipy's expm (no eigendecomposition)."""
    rng = np.random.RandomState(11)
    n, m = 7, 4
    Theta_all = _spd(n + m, 0.2, 5.0, 12)
    B = rng.randn(n + m, n + m)
    K_all = B @ B.T / (n + m)
    tr, te = slice(0, n), slice(n, None)
    y = rng.randn(n, 2)
    eta, t = 0.7, 3.0
    for red, scale in (("mean", 1.0 / n), ("sum", 1.0)):
        Th = Theta_all[tr, tr]
        E = scipy.linalg.expm(-eta * t * scale * Th)
        T = Theta_all[te, tr] @ np.linalg.solve(Th, np.eye(n) - E)
        mean_ref = T @ y
        cov_ref = (K_all[te, te] + T @ K_all[tr, tr] @ T.T - T @ K_all[tr, te]
                   - K_all[te, tr] @ T.T)
        mean, cov = ntk_gp(Theta_all[te, tr], Th, K_all[te, tr], K_all[tr, tr], K_all[te, te],
                           y, t=t, learning_rate=eta, loss_reduction=red)
        assert np.max(np.abs(np.asarray(mean) - mean_ref)) < 1e-10
        assert np.max(np.abs(np.asarray(cov) - cov_ref)) < 1e-10
        # discrete GD: (I - eta Theta_eff)^steps
        P = np.linalg.matrix_power(np.eye(n) - eta * scale * Th, 9)
        Ts = Theta_all[te, tr] @ np.linalg.solve(Th, np.eye(n) - P)
        mean_s, _ = ntk_gp(Theta_all[te, tr], Th, K_all[te, tr], K_all[tr, tr], K_all[te, te],
                           y, steps=9, learning_rate=eta, loss_reduction=red)
        assert np.max(np.abs(np.asarray(mean_s) - Ts @ y)) < 1e-10


@needs_x64  # float64 truth at float64 tolerances
def test_solves_still_trace_under_jit():
    A = jnp.asarray(_spd(6, 1.0, 3.0, 13))
    y = jnp.arange(6.0)
    got = jax.jit(lambda a, b: kernel_regression(a, a, b))(A, y)
    assert np.allclose(np.asarray(got), np.asarray(y), atol=1e-10)
