"""analytic_kernel against the independent reference kernels (data/nt_kernels.json).

Error measure: max |K - K_ref| / max |K_ref| over each matrix (max-abs over
max-abs), so entries that are ~0 (antipodal ReLU pairs, 1e-52 in the
reference) do not turn rounding into huge relative errors.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ntkexp.models.analytic import analytic_kernel
from ntkexp.models.mlp import MLPSpec

# Kernels computed outside this project (neural-tangents 0.6.5, then 50-digit mpmath
# closed forms and adaptive quadrature; provenance in data/README_nt_kernels.md), kept
# in the repository so the oracle is always there.
REF = os.path.join(os.path.dirname(__file__), "data", "nt_kernels.json")
with open(REF) as f:
    CASES = json.load(f)["cases"]


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# Max-abs relative error allowed, by dtype, closed forms / tanh (Mehler expansion).
# Measured (x64 on and off alike): float32 <= 2.8e-7 / 1.7e-6; float64 <= 7.8e-16 /
# 1.25e-9 (the reference tanh values are good to ~1e-10).
REF_TOL = {jnp.float32: (1e-6, 5e-6), jnp.float64: (1e-14, 5e-9)}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_reference(case, dtype):
    spec = MLPSpec(depth=case["depth"], width=1, activation=case["activation"],
                   W_std=case["W_std"], b_std=case["b_std"])
    tol = REF_TOL[dtype][case["activation"] == "tanh"]
    x1 = jnp.asarray(case["x1"], dtype)
    x2 = jnp.asarray(case["x2"], dtype)
    k12 = analytic_kernel(spec, x1, x2)
    k11 = analytic_kernel(spec, x1)
    assert k12.nngp.dtype == dtype
    for k, tag in ((k12, "x1_x2"), (k11, "x1_x1")):
        assert _err(k.nngp, case[f"nngp_{tag}"]) <= tol
        assert _err(k.ntk, case[f"ntk_{tag}"]) <= tol
    assert np.array_equal(np.asarray(k11.ntk), np.asarray(k11.ntk).T)
