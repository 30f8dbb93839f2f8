"""Public Hypothesis strategies for certlib's linear operators (reusable in any test suite).

Every strategy draws a *valid* operator from :mod:`certlib.verifiers.operators`
that is small enough for ``op.to_dense()`` (the ground-truth matrix), so a test
can compare any verifier against ``numpy.linalg.svd(op.to_dense())``::

    from hypothesis import given, settings
    from certlib.verifiers.strategies import conv_operators, dense_operators

    @settings(max_examples=100, deadline=None)
    @given(conv_operators())
    def test_my_bound(op):
        truth = np.linalg.svd(op.to_dense(), compute_uv=False)[0]
        assert truth <= my_bound(op).value          # no slack on the sound side

Weights: ``weight_arrays(shape)`` draws a kind (gaussian, non-negative uniform,
identity at the centre tap plus noise (LiResNet-like), sparse small integers,
rank one, all-equal, zero) and a scale from ``scales`` (default ``WEIGHT_SCALES``:
1 mostly, plus 1e-3, tiny 1e-20 and huge 1e20 and 1e150), from a drawn seed.

Conv geometry (``conv_operators``): channels 1..max_channels (groups dividing both),
kernel 1..max_kernel per axis (non-square too), dilation 1..max_dilation, stride
1..max_stride, padding 0..k_eff-1 on each of the four sides independently
(asymmetric), input side from below the kernel size up to max_n, chosen so that the
output is never empty; channels are capped so in_dim and out_dim stay <= max_dense.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from certlib.verifiers.operators import Conv2d, Dense

__all__ = ["WEIGHT_SCALES", "WEIGHT_KINDS", "weight_arrays", "dense_operators", "conv_operators",
           "conv_geometries"]

#: Scales applied to generated weights (1 is drawn most often).
WEIGHT_SCALES = (1.0, 1.0, 1.0, 1e-3, 1e-20, 1e20, 1e150)
#: Kinds of generated weights.
WEIGHT_KINDS = ("gaussian", "gaussian", "uniform_pos", "centre_identity", "sparse_int", "rank1",
                "constant", "zero")


def _make_weights(shape, kind: str, seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        w = rng.standard_normal(shape)
    elif kind == "uniform_pos":
        w = rng.uniform(0.0, 1.0, shape)
    elif kind == "centre_identity":  # LiResNet-like: identity at the centre tap plus small noise
        w = rng.standard_normal(shape) / max(int(np.prod(shape[1:])), 1)
        if len(shape) == 4:
            c = min(shape[0], shape[1])
            w[np.arange(c), np.arange(c), shape[2] // 2, shape[3] // 2] += 1.0
        else:
            c = min(shape)
            w[np.arange(c), np.arange(c)] += 1.0
    elif kind == "sparse_int":
        w = rng.integers(-3, 4, shape) * (rng.uniform(size=shape) < 0.3)
    elif kind == "rank1":
        w = np.multiply.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1:]))
    elif kind == "constant":
        w = np.ones(shape)
    elif kind == "zero":
        w = np.zeros(shape)
    else:  # pragma: no cover
        raise ValueError(kind)
    return np.asarray(w, dtype=np.float64) * scale


@st.composite
def weight_arrays(draw, shape, scales=WEIGHT_SCALES, kinds=WEIGHT_KINDS) -> np.ndarray:
    """A float64 array of ``shape``: a drawn kind and scale, generated from a drawn seed."""
    kind = draw(st.sampled_from(kinds))
    scale = draw(st.sampled_from(scales))
    seed = draw(st.integers(0, 2**32 - 1))
    return _make_weights(tuple(shape), kind, seed, scale)


@st.composite
def dense_operators(draw, max_dim: int = 24, scales=WEIGHT_SCALES, kinds=WEIGHT_KINDS) -> Dense:
    """A Dense(W) with W of shape (m, n), 1 <= m, n <= max_dim."""
    m = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    return Dense(draw(weight_arrays((m, n), scales, kinds)))


@st.composite
def conv_geometries(draw, max_kernel: int = 5, max_n: int = 12, max_stride: int = 3,
                    max_dilation: int = 2, max_padding: int | None = None) -> dict:
    """Spatial geometry: kernel (kh, kw), input (h, w), stride, padding (t, l, b, r), dilation.

    Padding per side is drawn in 0..k_eff-1 (capped by max_padding); the input side
    is drawn from max(1, k_eff - pads) (can be below the kernel size) up to max_n.
    """
    geo = {"kernel": [], "n": [], "stride": [], "dilation": [], "pad_begin": [], "pad_end": []}
    for _ in range(2):
        k = draw(st.integers(1, max_kernel))
        d = draw(st.integers(1, max_dilation)) if k > 1 else 1
        keff = d * (k - 1) + 1
        pmax = keff - 1 if max_padding is None else min(keff - 1, max_padding)
        pb = draw(st.integers(0, pmax))
        pe = draw(st.integers(0, pmax))
        n = draw(st.integers(max(1, keff - pb - pe), max(max_n, keff - pb - pe)))
        geo["kernel"].append(k)
        geo["dilation"].append(d)
        geo["stride"].append(draw(st.integers(1, max_stride)))
        geo["pad_begin"].append(pb)
        geo["pad_end"].append(pe)
        geo["n"].append(n)
    return {
        "kernel": tuple(geo["kernel"]), "input_hw": tuple(geo["n"]),
        "stride": tuple(geo["stride"]), "dilation": tuple(geo["dilation"]),
        "padding": (geo["pad_begin"][0], geo["pad_begin"][1], geo["pad_end"][0], geo["pad_end"][1]),
    }


def _out_hw(geo: dict) -> tuple:
    out = []
    for ax in range(2):
        k, d, s = geo["kernel"][ax], geo["dilation"][ax], geo["stride"][ax]
        P = geo["input_hw"][ax] + geo["padding"][ax] + geo["padding"][ax + 2]
        out.append((P - d * (k - 1) - 1) // s + 1)
    return tuple(out)


@st.composite
def conv_operators(draw, max_channels: int = 16, max_kernel: int = 5, max_n: int = 12,
                   max_stride: int = 3, max_dilation: int = 2, max_groups: int = 4,
                   max_dense: int = 600, max_padding: int | None = None,
                   scales=WEIGHT_SCALES, kinds=WEIGHT_KINDS) -> Conv2d:
    """A valid Conv2d with c_in*h*w <= max_dense and c_out*oh*ow <= max_dense.

    Pass ``max_stride=1, max_dilation=1, max_groups=1`` etc. to narrow the family;
    ``max_padding=0`` gives valid (unpadded) convolutions.
    """
    geo = draw(conv_geometries(max_kernel, max_n, max_stride, max_dilation, max_padding))
    oh, ow = _out_hw(geo)
    h, w = geo["input_hw"]
    cmax = max(1, min(max_channels, max_dense // max(h * w, oh * ow, 1)))
    g = draw(st.integers(1, max(1, min(max_groups, cmax))))
    per = max(1, cmax // g)
    c_in = g * draw(st.integers(1, per))
    c_out = g * draw(st.integers(1, per))
    kernel = draw(weight_arrays((c_out, c_in // g, *geo["kernel"]), scales, kinds))
    return Conv2d(kernel, (c_in, h, w), stride=geo["stride"], padding=geo["padding"],
                  dilation=geo["dilation"], groups=g)
