"""Analytic limits of compositions vs Monte Carlo estimates of wide nets (stated sampling error).

Each case draws 8 width-256 nets (attention: width 1024); the mean empirical
NNGP and NTK must lie within
5 standard errors plus an O(1/width) finite-width allowance of the analytic
kernel (``mc.assert_within_sampling_error``). Independent truth: the finite
Flax forward pass and autodiff Jacobians, never the kernel maps.
"""

import pytest
from mc import assert_within_sampling_error, jnp_inputs, mc_kernels

from ntkexp.layers import (
    Activation,
    Dense,
    Flatten,
    composition_kernel,
    frozen,
    residual,
    serial,
)
from ntkexp.layers.attention import GlobalSelfAttention
from ntkexp.layers.norm import LayerNorm

CASES = {
    # attention over 3 positions after a per-position dense + relu (Hron et al. 2020)
    "attention": ((3, 2), serial(Dense(8, b_std=0.1), Activation("relu"),
                                 GlobalSelfAttention(8, n_heads=8, n_chan_key=512, n_chan_val=64,
                                                     b_std=0.1, W_query_std=1.3),
                                 Activation("tanh"), Flatten(), Dense(1, readout=True))),
    # layer norm per position, a Mehler-fallback activation (softplus)
    "layer_norm": ((3, 2), serial(Dense(8, b_std=0.3), LayerNorm(), Activation("softplus"),
                                  Dense(8), Activation("relu"), Flatten(),
                                  Dense(1, readout=True))),
    # residual branch with a scale, a frozen layer, closed-form and angular activations
    "residual_frozen": ((6,), serial(Dense(8, b_std=0.1),
                                     residual(Activation("erf"), Dense(8), Activation("relu"),
                                              Dense(8), scale=0.7),
                                     frozen(Dense(8)), Activation("tanh"),
                                     Dense(1, readout=True))),
    # standard parameterization (NTK depends on the width)
    "standard": ((4,), serial(Dense(8, b_std=0.2, parameterization="standard"),
                              Activation("gelu"),
                              Dense(1, b_std=0.2, parameterization="standard", readout=True))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_analytic_matches_monte_carlo(name):
    shape, layer = CASES[name]
    x = jnp_inputs(3, shape, seed=1)
    # attention: the logits are estimated from the width-many features, a bias
    # of a few percent at width 256 (measured 8% on one entry), 1% at 1024
    width = 1024 if name == "attention" else 256
    k = composition_kernel(layer, x)
    nngp, ntk = mc_kernels(layer, x, width=width, n_samples=8,
                           method="jvp" if name == "attention" else "jacobian")
    assert_within_sampling_error(nngp, k.nngp, width=width)
    if name == "standard":
        # standard parameterization: the NTK of the width-256 net, not a width-free limit
        from ntkexp.layers import with_width

        k = composition_kernel(with_width(layer, width), x)
    assert_within_sampling_error(ntk, k.ntk, width=width)
