"""Strict test set-up (equinox style) and the one dtype tolerance table.

x64 follows the environment, as JAX itself does: ``JAX_ENABLE_X64=1`` turns it on,
anything else (or unset, the default a user has) leaves it off. The ``dtype``
fixture parametrizes every numerical test over ``float32`` and ``float64``; the
float64 cases skip when x64 is off (no float64 array exists then), the float32
cases run in both modes. CI runs the fast suite in both (``make test``). Library
code follows JAX's type promotion (docs/conventions.md, "Dtypes").
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


@pytest.fixture(params=[jnp.float32, pytest.param(jnp.float64, marks=needs_x64)],
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
