"""Generate ``nt_layers.json``: float64 reference NNGP / NTK for layer compositions.

Run OUTSIDE the project's environment, with neural-tangents 0.6.5 (its last
release, JAX <= 0.4.25)::

    /path/to/nt-venv/bin/python tests/kernels/data/make_nt_layers.py

The script only *calls* ``neural_tangents.stax``; no neural-tangents code is
copied into the repository. Inputs are drawn from a seeded numpy generator and
stored in the json with the kernels, so the tests never need neural-tangents.

Convention (the one of ``tests/kernels/data/README_nt_kernels.md``; each layer
entry in the json maps to stax like this):

* ``{"dense": {out, W_std, b_std, parameterization}}`` ->
  ``stax.Dense(out, W_std, b_std or None, parameterization)``: NTK
  parameterization ``z = W_std / sqrt(fan_in) * W a + b_std * b`` with
  ``W, b ~ N(0, 1)``; standard ``z = W a + b``, ``W ~ N(0, W_std^2 / fan_in)``,
  ``b ~ N(0, b_std^2)`` (NTK then depends on the layer widths ``out``).
  ``b_std = 0`` means no bias (stax's ``b_std=None``). On spatial inputs Dense
  acts per position on the channel (last) axis.
* ``{"conv": {out, filter, strides, padding, W_std, b_std, parameterization}}``
  -> ``stax.Conv(out, filter, strides, padding, W_std, b_std or None,
  parameterization=...)``, channels last (``NHC`` / ``NHWC``), fan-in
  ``prod(filter) * C_in`` (padded zeros count in it). ``SAME`` pads as lax
  does (``(q-1)//2`` before); ``CIRCULAR`` wraps the same amounts periodically.
* ``"relu"``, ``"erf"`` (``erf(z)``), ``"identity"`` -> ``stax.Relu()``,
  ``stax.Erf()`` (a=1, b=1, c=0), ``stax.Identity()``.
* ``{"avg_pool": {window, strides, padding}}`` -> ``stax.AvgPool(window,
  strides, padding, normalize_edges=False)``: divide by the window size, padded
  zeros included.
* ``"global_avg_pool"`` -> ``stax.GlobalAvgPool()``; ``"flatten"`` ->
  ``stax.Flatten()`` (kernel: mean over positions of the diagonal ``i = j``).
* ``{"layer_norm": {eps}}`` -> ``stax.LayerNorm(axis=-1, eps)``: normalise
  over channels at each position (the infinite-width map is
  ``K_ij(x, x') / sqrt((K_ii(x, x) + eps) (K_jj(x', x') + eps))``).
* ``{"residual": {branch: [...], scale}}`` -> ``x + scale * branch(x)``:
  ``stax.serial(stax.FanOut(2), stax.parallel(stax.serial(*branch'),
  stax.Identity()), stax.FanInSum())``, where ``branch'`` is the branch with
  its last (Dense or Conv) layer's ``W_std`` and ``b_std`` multiplied by
  ``scale``; in NTK parameterization that is exactly ``scale * branch`` (same
  function of the same parameters, same gradients). stax's ``FanInSum`` needs
  Gaussian summands, so the residual stream is pre-activations.
* ``{"attention": {n_heads, n_chan_key, n_chan_val, out, W_key_std,
  W_query_std, W_value_std, W_out_std, b_std, mechanism}}`` ->
  ``stax.GlobalSelfAttention(out, n_chan_key, n_chan_val, n_heads,
  linear_scaling=True, ...)``: Hron et al. 2020 ("Infinite attention", section
  3 and appendix), the ``d^-1`` scaling of the logits with *tied* query and key
  weights, ``G = mechanism(QK_std * <x_i, x_j> / C_in)`` (softmax over the key
  position ``j``), output ``OV_std / sqrt(n_heads d_v C_in) * concat_h(G x W^V_h)
  W^O + b_std b`` with ``QK_std = W_query_std W_key_std`` and ``OV_std =
  W_out_std W_value_std``. In the limit (heads, d_k, d_v, C -> infinity) the
  logits converge to the deterministic ``QK_std * Sigma_ij(x, x)`` of each
  input's own per-position covariance, so
  ``nngp' = OV_std^2 G(x) Sigma(x, x') G(x')^T + b_std^2`` and
  ``ntk' = OV_std^2 G(x) Theta G(x')^T + b_std^2 + 2 (nngp' - b_std^2)``
  (the value and output weights each add one ``nngp' - b^2``; the query/key
  gradients vanish under ``d^-1`` scaling).

Every case ends in ``Dense(1)`` (scalar output). Inputs are channels last:
flat ``(n, d)``, 1-D ``(n, L, C)`` or 2-D ``(n, H, W, C)``. Each case stores
``x1`` (3 points), ``x2`` (2 points) and ``nngp_x1_x2``, ``ntk_x1_x2``,
``nngp_x1_x1``, ``ntk_x1_x1``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

warnings.filterwarnings("ignore")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nt_layers.json")
ACTS = {"relu": stax.Relu, "erf": stax.Erf, "identity": stax.Identity}


def _b(v):
    return None if not v else float(v)


def to_stax(layers):
    out = []
    for lay in layers:
        if isinstance(lay, str):
            if lay in ACTS:
                out.append(ACTS[lay]())
            elif lay == "global_avg_pool":
                out.append(stax.GlobalAvgPool())
            elif lay == "flatten":
                out.append(stax.Flatten())
            else:
                raise ValueError(lay)
            continue
        (name, p), = lay.items()
        if name == "dense":
            out.append(stax.Dense(p["out"], p["W_std"], _b(p["b_std"]),
                                  parameterization=p.get("parameterization", "ntk")))
        elif name == "conv":
            k = len(p["filter"])
            dn = ("NHC", "HIO", "NHC") if k == 1 else ("NHWC", "HWIO", "NHWC")
            out.append(stax.Conv(p["out"], tuple(p["filter"]), tuple(p["strides"]),
                                 p["padding"], p["W_std"], _b(p["b_std"]),
                                 dimension_numbers=dn,
                                 parameterization=p.get("parameterization", "ntk")))
        elif name == "avg_pool":
            out.append(stax.AvgPool(tuple(p["window"]), tuple(p["strides"]), p["padding"],
                                    normalize_edges=False))
        elif name == "layer_norm":
            out.append(stax.LayerNorm(axis=-1, eps=p["eps"]))
        elif name == "residual":
            branch = stax.serial(*to_stax(_scaled(p["branch"], p["scale"])))
            out.append(stax.serial(stax.FanOut(2), stax.parallel(branch, stax.Identity()),
                                   stax.FanInSum()))
        elif name == "attention":
            out.append(stax.GlobalSelfAttention(
                p["out"], p["n_chan_key"], p["n_chan_val"], p["n_heads"],
                linear_scaling=True, W_key_std=p["W_key_std"], W_value_std=p["W_value_std"],
                W_query_std=p["W_query_std"], W_out_std=p["W_out_std"],
                b_std=_b(p["b_std"]), attention_mechanism=p["mechanism"]))
        else:
            raise ValueError(name)
    return out


def _scaled(branch, s):
    """``s * branch``: the last (Dense or Conv) layer with ``W_std, b_std`` times ``s``."""
    (name, p), = branch[-1].items()
    if name not in ("dense", "conv"):
        raise ValueError("a residual branch must end with dense or conv")
    last = {name: dict(p, W_std=s * p["W_std"], b_std=s * p["b_std"])}
    return list(branch[:-1]) + [last]


def dense(out, W=1.0, b=0.0, param="ntk"):
    return {"dense": {"out": out, "W_std": W, "b_std": b, "parameterization": param}}


def conv(out, filt, strides=None, padding="SAME", W=1.0, b=0.0, param="ntk"):
    filt = list(filt)
    strides = list(strides or [1] * len(filt))
    return {"conv": {"out": out, "filter": filt, "strides": strides, "padding": padding,
                     "W_std": W, "b_std": b, "parameterization": param}}


def pool(window, strides, padding):
    return {"avg_pool": {"window": list(window), "strides": list(strides), "padding": padding}}


def attention(W_key=1.0, W_query=1.0, W_value=1.0, W_out=1.0, b=0.0, mech="SOFTMAX"):
    return {"attention": {"n_heads": 4, "n_chan_key": 8, "n_chan_val": 8, "out": 8,
                          "W_key_std": W_key, "W_query_std": W_query, "W_value_std": W_value,
                          "W_out_std": W_out, "b_std": b, "mechanism": mech}}


R2 = math.sqrt(2.0)
W = 8  # channel count (irrelevant to the NTK-parameterization limit)
CASES = [
    # fully connected
    ("dense_relu", (5,), [dense(W, 1.5, 0.1), "relu", dense(W, 1.5, 0.1), "relu",
                          dense(1, 1.5, 0.1)]),
    ("dense_erf", (5,), [dense(W, 1.2, 0.3), "erf", dense(W, 1.2, 0.3), "erf", dense(1, 1.2, 0.3)]),
    ("dense_relu_standard", (5,), [dense(16, R2, 0.2, "standard"), "relu",
                                   dense(12, R2, 0.2, "standard"), "relu",
                                   dense(1, R2, 0.2, "standard")]),
    # 1-D convolutions
    ("conv1d_same_relu_gap", (8, 2), [conv(W, [3], W=R2, b=0.2), "relu", conv(W, [3], W=R2, b=0.2),
                                      "relu", "global_avg_pool", dense(1, R2, 0.2)]),
    ("conv1d_valid_stride2_flatten", (9, 2), [conv(W, [3], [2], "VALID", W=1.3, b=0.1), "relu",
                                              conv(W, [2], [1], "VALID", W=1.3, b=0.1), "relu",
                                              "flatten", dense(1, 1.3, 0.1)]),
    ("conv1d_circular_erf_gap", (7, 2), [conv(W, [3], padding="CIRCULAR", W=1.4, b=0.3), "erf",
                                         conv(W, [4], padding="CIRCULAR", W=1.4, b=0.3), "erf",
                                         "global_avg_pool", dense(1, 1.4, 0.3)]),
    ("conv1d_same_even_stride2_gap", (8, 1), [conv(W, [4], [2], "SAME", W=R2), "relu",
                                              conv(W, [3], [1], "SAME", W=R2), "relu",
                                              "global_avg_pool", dense(1, R2)]),
    ("conv1d_standard_gap", (6, 2), [conv(6, [3], W=R2, b=0.2, param="standard"), "relu",
                                     conv(5, [3], W=R2, b=0.2, param="standard"), "relu",
                                     "global_avg_pool", dense(1, R2, 0.2, "standard")]),
    # 2-D convolutions
    ("conv2d_same_relu_gap", (5, 4, 2), [conv(W, [3, 3], W=R2, b=0.1), "relu",
                                         conv(W, [2, 3], [1, 2], "SAME", W=R2, b=0.1), "relu",
                                         "global_avg_pool", dense(1, R2, 0.1)]),
    ("conv2d_valid_stride_flatten", (5, 4, 2), [conv(W, [3, 2], [2, 1], "VALID", W=1.2, b=0.2),
                                                "relu", "flatten", dense(1, 1.2, 0.2)]),
    ("conv2d_circular_flatten", (4, 4, 2), [conv(W, [3, 3], padding="CIRCULAR", W=R2), "relu",
                                            conv(W, [3, 2], padding="CIRCULAR", W=R2), "relu",
                                            "flatten", dense(1, R2)]),
    # pooling
    ("avgpool1d_valid", (8, 2), [conv(W, [3], W=R2, b=0.1), "relu", pool([2], [2], "VALID"),
                                 conv(W, [3], W=R2, b=0.1), "relu", "global_avg_pool",
                                 dense(1, R2, 0.1)]),
    ("avgpool1d_same_stride1", (7, 1), [conv(W, [3], W=R2), "relu", pool([3], [1], "SAME"),
                                        "flatten", dense(1, R2)]),
    ("avgpool2d_same", (5, 4, 2), [conv(W, [3, 3], W=R2, b=0.1), "relu",
                                   pool([3, 2], [2, 2], "SAME"), "flatten", dense(1, R2, 0.1)]),
    ("avgpool2d_circular", (4, 4, 1), [conv(W, [2, 2], W=R2), "relu",
                                       pool([3, 3], [1, 1], "CIRCULAR"),
                                       conv(W, [2, 2], W=R2), "relu",
                                       "global_avg_pool", dense(1, R2)]),
    ("gap_on_input", (6, 3), ["global_avg_pool", dense(W, 1.1, 0.2), "relu", dense(1, 1.1, 0.2)]),
    ("flatten_on_input", (3, 2, 2), ["flatten", dense(W, 1.1, 0.2), "erf", dense(1, 1.1, 0.2)]),
    # layer norm
    ("layernorm_dense", (5,), [dense(W, 1.3, 0.4), {"layer_norm": {"eps": 1e-12}}, "relu",
                               dense(W, 1.3, 0.4), {"layer_norm": {"eps": 1e-12}}, "erf",
                               dense(1, 1.3, 0.4)]),
    ("layernorm_conv1d", (6, 2), [conv(W, [3], W=R2, b=0.3), {"layer_norm": {"eps": 1e-12}}, "relu",
                                  conv(W, [3], W=R2, b=0.3), {"layer_norm": {"eps": 1e-12}}, "erf",
                                  "global_avg_pool", dense(1, R2, 0.3)]),
    # residual
    ("residual_dense", (5,), [dense(W, 1.2, 0.1),
                              {"residual": {"branch": ["relu", dense(W, R2, 0.1), "relu",
                                                       dense(W, 1.0, 0.1)], "scale": 0.5}},
                              "relu", dense(1, 1.2, 0.1)]),
    ("residual_conv1d", (6, 2), [conv(W, [3], W=R2, b=0.1),
                                 {"residual": {"branch": ["relu", conv(W, [3], W=R2, b=0.1)],
                                               "scale": 0.7}},
                                 "relu", "global_avg_pool", dense(1, R2, 0.1)]),
    # global self-attention (Hron et al. 2020, d^-1 scaling, tied query/key)
    ("attention_softmax", (5, 3), [dense(W, 1.2, 0.1), "relu",
                                   attention(W_key=1.1, W_query=0.9, W_value=1.2, W_out=0.8, b=0.1),
                                   "relu", "global_avg_pool", dense(1, 1.2, 0.1)]),
    ("attention_softmax_on_input", (4, 2), [attention(W_key=1.5, W_query=1.5), "erf",
                                            "flatten", dense(1, 1.0)]),
    ("attention_identity", (5, 3), [dense(W, 1.0, 0.2), "relu", attention(mech="IDENTITY", b=0.2),
                                    "global_avg_pool", dense(1, 1.0, 0.2)]),
    # the ntkexp CNN-GAP shape (depth 3, filter 5, 1 channel), small length
    ("cnn_gap_depth3_q5", (12, 1), [conv(W, [5], W=R2, b=0.1), "relu", conv(W, [5], W=R2, b=0.1),
                                    "relu", conv(W, [5], W=R2, b=0.1), "relu", "global_avg_pool",
                                    dense(1, R2, 0.1)]),
]


def main():
    rng = np.random.default_rng(20261202)
    out = []
    for name, shape, layers in CASES:
        x1 = rng.normal(size=(3, *shape))
        x2 = rng.normal(size=(2, *shape))
        x2[0] = 0.5 * x1[0]  # a collinear pair across x1 and x2
        _, _, kfn = stax.serial(*to_stax(layers))
        k12 = kfn(x1, x2, ("nngp", "ntk"))
        k11 = kfn(x1, None, ("nngp", "ntk"))
        case = {"name": name, "layers": layers, "x1": x1.tolist(), "x2": x2.tolist()}
        for tag, k in (("x1_x2", k12), ("x1_x1", k11)):
            for kind in ("nngp", "ntk"):
                v = np.asarray(getattr(k, kind), np.float64)
                assert v.dtype == np.float64 and np.all(np.isfinite(v)), (name, kind)
                case[f"{kind}_{tag}"] = v.tolist()
        out.append(case)
        k0 = (case["nngp_x1_x1"][0][0], case["ntk_x1_x1"][0][0])
        print(f"{name}: nngp[0,0]={k0[0]:.6g} ntk[0,0]={k0[1]:.6g}", file=sys.stderr)
    import neural_tangents as nt

    doc = {
        "generator": f"neural-tangents {nt.__version__} on JAX {jax.__version__}, float64 "
                     "(tests/kernels/data/make_nt_layers.py)",
        "convention": "see the docstring of tests/kernels/data/make_nt_layers.py",
        "cases": out,
    }
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes, {len(out)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
