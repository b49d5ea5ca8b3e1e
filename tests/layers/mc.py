"""Monte Carlo helper for the layer tests: wide-net kernels with their sampling error."""

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.empirical import empirical_nngp, empirical_ntk
from ntkexp.layers import Network, with_width


def mc_kernels(layer, x, *, width, n_samples, seed=0, method="jacobian"):
    """Per-initialisation ``(nngp, ntk)`` samples ``(K, n, n)`` of a width-``width`` net.

    nngp sample: the readout's prior covariance given the last features
    (:func:`ntkexp.empirical.empirical_nngp`, lower variance than ``f f^T``);
    ntk sample: the empirical NTK. Their means converge to the analytic kernel as
    ``width -> inf`` (Jacot et al. 2018, Thms 1-2); the sampling error of the
    mean is the sample standard deviation over ``sqrt(K)``.
    """
    net = Network(with_width(layer, width), tuple(x.shape[1:]))
    nngps, ntks = [], []
    for k in jax.random.split(jax.random.key(seed), n_samples):
        p = net.init(k, x.dtype)
        nngps.append(np.asarray(empirical_nngp(net, p, x)))
        ntks.append(np.asarray(empirical_ntk(net, p, x, method=method)))
    return np.stack(nngps), np.stack(ntks)


def assert_within_sampling_error(samples, truth, *, width, z=5.0, bias=2.0):
    """``|mean - truth| <= z * SE + bias * |truth| / width`` entrywise.

    ``SE`` is the standard error of the mean over the samples; ``bias / width``
    allows for the O(1/width) finite-width correction of the mean kernel
    (Hanin & Nica 2019; Dyer & Gur-Ari 2019).
    """
    truth = np.asarray(truth, np.float64)
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    slack = z * se + bias * np.abs(truth) / width + 1e-6
    bad = np.abs(mean - truth) > slack
    assert not bad.any(), (
        f"MC mean off by {np.max(np.abs(mean - truth) / slack):.2f} slacks; "
        f"mean={mean[bad][:3]}, truth={truth[bad][:3]}, se={se[bad][:3]}")


def jnp_inputs(n, shape, seed, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (n, *shape), dtype)
