"""analytic_kernel against the independent reference kernels (shared/reference/nt_kernels.json).

Error measure: max |K - K_ref| / max |K_ref| over each matrix (max-abs over
max-abs), so entries that are ~0 (antipodal ReLU pairs, 1e-52 in the
reference) do not turn rounding into huge relative errors.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ntkexp.kernels import analytic_kernel
from ntkexp.models.mlp import MLPSpec

REF = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "reference",
                   "nt_kernels.json")
if not os.path.exists(REF):
    REF = "/work/shared/reference/nt_kernels.json"
CASES = json.load(open(REF))["cases"] if os.path.exists(REF) else []


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.skipif(not CASES, reason="reference kernels not available at shared/reference")
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_reference(case, dtype):
    spec = MLPSpec(depth=case["depth"], width=1, activation=case["activation"],
                   W_std=case["W_std"], b_std=case["b_std"])
    if dtype == jnp.float32:
        tol = 1e-4
    else:
        tol = 1e-6 if case["activation"] == "tanh" else 1e-9
    x1 = jnp.asarray(case["x1"], dtype)
    x2 = jnp.asarray(case["x2"], dtype)
    k12 = analytic_kernel(spec, x1, x2)
    k11 = analytic_kernel(spec, x1)
    assert k12.nngp.dtype == dtype
    for k, tag in ((k12, "x1_x2"), (k11, "x1_x1")):
        assert _err(k.nngp, case[f"nngp_{tag}"]) <= tol
        assert _err(k.ntk, case[f"ntk_{tag}"]) <= tol
    assert np.array_equal(np.asarray(k11.ntk), np.asarray(k11.ntk).T)
