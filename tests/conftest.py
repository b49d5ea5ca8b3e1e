"""Strict test set-up (equinox style) and the one dtype tolerance table.

x64 follows the environment, as JAX itself does: ``JAX_ENABLE_X64=1`` turns it on,
anything else (or unset, the default a user has) leaves it off. The ``dtype``
fixture parametrizes every numerical test over ``float32`` and ``float64``; the
float64 cases skip when x64 is off (no float64 array exists then). ``make test``
runs the fast suite with x64 on and the float32 cases deselected (they carry the
``float32_case`` mark); ``make test-slow`` runs the slow checks, then the whole
fast suite with x64 off, where the float32 cases run. CI runs both, so every case
runs in its own mode. Library code follows JAX's type promotion
(docs/conventions.md, "Dtypes").
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

X64 = os.environ.get("JAX_ENABLE_X64", "").strip().lower() in ("1", "true", "yes", "on")
jax.config.update("jax_enable_x64", X64)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Relative tolerances, by dtype, for comparisons against an exact truth.
TOL = {
    jnp.float32: dict(exact=1e-4, agree=1e-5),
    jnp.float64: dict(exact=1e-9, agree=1e-10),
}

needs_x64 = pytest.mark.skipif(not X64, reason="float64 needs JAX_ENABLE_X64=1")


# float32 cases carry the ``float32_case`` mark: ``make test`` (x64 on) runs the float64
# cases and deselects these; ``make test-x32`` (x64 off, the default a user has) runs them
@pytest.fixture(params=[pytest.param(jnp.float32, marks=pytest.mark.float32_case),
                        pytest.param(jnp.float64, marks=needs_x64)],
                ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.fixture
def tol(dtype):
    return TOL[dtype]


@pytest.fixture(autouse=True)
def _session_x64():
    """Put x64 back after each test: a ``dtype: float64`` run turns it on for good."""
    yield
    if jax.config.jax_enable_x64 != X64:
        jax.config.update("jax_enable_x64", X64)


def rel_err(a, b):
    """Relative Frobenius error ||a - b|| / ||b||, computed in float64."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def run_tiny(tmp_path_factory, config: str, tag: str, allow_rank_promotion: bool = False):
    """``ntkexp run CONFIG --preset tiny`` into a fresh folder: ``(folder, summary dict)``.

    ``allow_rank_promotion`` for the experiments whose code broadcasts implicitly
    (the session otherwise raises on rank promotion).
    """
    import json

    from ntkexp.cli import main

    d = str(tmp_path_factory.mktemp(tag) / "run")
    with jax.numpy_rank_promotion("allow" if allow_rank_promotion else "raise"):
        assert main(["run", config, "--preset", "tiny", "--out", d, "--quiet"]) == 0
    with open(os.path.join(d, "summary.json")) as f:
        return d, json.load(f)


# Expensive cases moved out of ``make test`` into ``make test-slow`` (CI runs both): each
# one's behaviour is also checked by a cheaper fast test, named beside it. Measured with
# ``pytest --durations=0`` on the 2-core box (seconds per case under two xdist workers).
SLOW_CASES = {
    # 23 s; the layer-list twin test_empirical_ntk_converges_at_rate_half_fast fits the rate
    "tests/test_empirical.py::test_relu_ntk_converges_like_inverse_sqrt_width",
    # 23 s; test_runner's test_a_stopped_run_resumes_with_only_the_unfinished_inits
    "tests/experiments/test_jacot.py::test_interrupted_run_leaves_no_corrupt_result_and_rerun_completes",
    # 10 s; test_runner's test_cache_reuses_unchanged_and_recomputes_changed_code
    "tests/experiments/test_jacot.py::test_rerun_reuses_units_and_force_recomputes",
    # 22 s; test_any_activation_analytic_matches_monte_carlo[tanh] checks the tanh CNN limit
    "tests/models/test_cnn.py::test_cnn_with_tanh_runs",
    # 15 s / 10 s / 8 s; the npz reader is exercised by test_npz_jacot and the zhang2019 case
    "tests/experiments/test_npz_datasets.py::test_npz_arora",
    "tests/experiments/test_npz_datasets.py::test_npz_two_layer_experiments[du2019_fig1-overrides0]",
    "tests/experiments/test_npz_datasets.py::test_npz_lee",
    # 15 s; test_theory's test_linearize_is_first_order_taylor checks linearize itself
    "tests/test_training.py::test_linearised_net_tracks_trained_net_better_as_width_grows",
    # 12 s / 8 s; the sgd-sequential-2 and gd-loop-2 cases stay fast
    "tests/test_training.py::test_host_threads_give_the_same_numbers[f64-gd-vmap-3]",
    "tests/test_training.py::test_host_threads_give_the_same_numbers[f64-sgd-loop-1]",
    # 11 s / 8 s; the edge itself (beta = 0) stays fast
    "tests/models/test_cnn.py::test_gradients_finite_at_edges[0.1]",
    "tests/models/test_resmlp.py::test_gradients_finite_at_edges[0.1]",
    # 12 s; test_layer_list_runs_jacot_fig1 runs a layer list through the runner
    "tests/layers/test_runs.py::test_layer_list_runs_kernel_convergence",
    # 13 s; the 'full' and 'structured' cases stay fast
    "tests/test_empirical.py::test_generic_methods_on_flax_cnn[f64-traced]",
    # 9.5 s; test_cntk_vec_monte_carlo checks the vec readout against Monte Carlo
    "tests/models/test_cnn.py::test_nngp_monte_carlo[vec]",
    # 11 s / 10 s; the gap / 1-D cases stay fast
    "tests/models/test_cnn.py::test_structured_ntk_equals_jacobian[f64-shape1-vec]",
    "tests/layers/test_conv.py::test_structured_ntk_equals_jvp[f64-2d_valid_gap]",
    # 13 s; the jacot_fig2 and du2019 cases stay fast
    "tests/experiments/test_runner.py::test_ensemble_unit_equals_one_initialisation_at_a_time"
    "[lee2020_finite_vs_infinite-lee2020_finite_vs_infinite-extra2]",
    # 10.5 s; attention is also checked against neural-tangents (test_reference_core)
    "tests/layers/test_monte_carlo.py::test_analytic_matches_monte_carlo[attention]",
    # 11 s; test_ensemble_equals_separate_runs[f64-sgd-sequential] and the gd-loop-2 case
    "tests/test_training.py::test_host_threads_give_the_same_numbers[f64-sgd-sequential-2]",
    # 7.5 s; the spec0 case stays fast
    "tests/models/test_mlp.py::test_hand_written_vjp_equals_autodiff[f64-2-5-spec1]",
    # 8 s; the jacot_fig2 case stays fast
    "tests/experiments/test_runner.py::test_ensemble_unit_equals_one_initialisation_at_a_time"
    "[du2019_fig1-du2019_fig1-extra1]",
    # 7 s / 5 s; circular padding stays fast through conv1d_circular_erf_gap and the 1-D cases
    "tests/layers/test_conv_reference.py::test_matches_neural_tangents[avgpool2d_circular]",
    "tests/layers/test_conv_reference.py::test_matches_neural_tangents[conv2d_circular_flatten]",
    # Monte Carlo cross-checks (5-9 s each) of limits the fast suite checks against
    # neural-tangents (tests/layers/test_conv_reference.py) or with a sibling case
    "tests/models/test_cnn.py::test_nngp_monte_carlo[gap]",      # test_cntk_gap_monte_carlo
    "tests/models/test_cnn.py::test_cntk_gap_monte_carlo[shape1]",
    "tests/models/test_cnn.py::test_empirical_converges_fast",   # test_runs' rate-1/2 twin
    "tests/models/test_resmlp.py::test_ntk_monte_carlo",         # test_nngp_monte_carlo
    "tests/models/test_resmlp.py::test_empirical_converges_fast",
    "tests/models/test_resmlp.py::test_gradients_finite_at_edges[0.0]",  # cnn and mlp edges
    "tests/test_empirical.py::test_monte_carlo_kernel_matches_analytic[standard]",  # [ntk]
    "tests/layers/test_conv.py::test_analytic_matches_monte_carlo[2d_valid_gap]",
    # sibling cases of the same check (4-7 s each)
    "tests/models/test_mlp.py::test_hand_written_vjp_equals_autodiff[f64-2-5-spec2]",
    "tests/models/test_mlp.py::test_hand_written_vjp_equals_autodiff[f64-6-130-spec1]",
    "tests/test_empirical.py::test_blocked_equals_unblocked_and_symmetry_is_exact"
    "[f64-traced-jacobian]",
    "tests/test_empirical.py::test_blocked_equals_unblocked_and_symmetry_is_exact[f64-full-jvp]",
    "tests/layers/test_conv.py::test_structured_ntk_equals_jvp[f64-1d_same_gap]",
    "tests/layers/test_network.py::test_structured_ntk_equals_jacobian[f64-True]",
    "tests/experiments/test_lee2020.py::test_power_iteration_matches_the_jacobian_eigenvalue"
    "[f64-3]",
    # 9.5 s; tests/test_sharding.py runs the 4-device subprocess for the empirical kernels
    "tests/kernels/test_tiling.py::test_tiles_sharded_over_four_devices_equal_untiled",
    # 5 s; test_optim's test_ngd_cross_entropy_is_the_damped_gauss_newton_step
    "tests/test_training.py::test_gauss_newton_ngd_beats_gd_on_cross_entropy",
    # 12 s; test_resmlp_with_tanh_runs runs a layer composition through ntkexp run
    "tests/layers/test_runs.py::test_layer_list_runs_jacot_fig1",
    # End-to-end tiny runs of the heavier experiments (20-29 s of set-up each): their unit
    # and helper tests stay fast, and test_jacot, test_du2019, test_bietti2019,
    # test_kernel_convergence, test_mnist1d and test_runner keep end-to-end runs fast
    "tests/experiments/test_arora2019.py::test_tiny_loss_tracks_the_theorem_4_1_prediction",
    "tests/experiments/test_arora2019.py::test_tiny_random_labels_train_slower_and_spread_over"
    "_the_spectrum",
    "tests/experiments/test_arora2019.py::test_tiny_bound_and_test_error_rise_with_label_noise",
    "tests/experiments/test_arora2019.py::test_tiny_outputs_and_redraw",
    "tests/experiments/test_lee2020.py::test_tiny_kernels_and_wide_net_beat_chance_and_agree",
    "tests/experiments/test_lee2020.py::test_tiny_table_and_outputs",
    "tests/experiments/test_zhang2019.py::test_tiny_run_outputs",
    "tests/experiments/test_zhang2019.py::test_ngd_contraction_is_one_minus_eta_at_large_width",
}


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW_CASES:
            item.add_marker(pytest.mark.slow)
