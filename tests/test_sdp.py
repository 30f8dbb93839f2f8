"""SDP (cvxpy) norm bounds, re-proven with Rump's criterion.

Oracle: numpy SVD of op.to_dense().  The Bound must be >= the truth exactly, and
within the solver tolerance (1e-4 relative) of it where the formulation is exact
(dense matrices, explicit conv matrices).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certlib.bounds import Bound
from certlib.verifiers import sdp
from certlib.verifiers.operators import Conv2d, Dense, LinearOperator

SETTINGS = settings(max_examples=12, deadline=None)
TOL = 1e-4


def truth(op):
    return float(np.linalg.svd(op.to_dense(), compute_uv=False)[0])


@st.composite
def small_dense(draw):
    m, n = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["gauss", "rank1", "positive"]))
    W = {"gauss": lambda: rng.standard_normal((m, n)),
         "rank1": lambda: np.outer(rng.standard_normal(m), rng.standard_normal(n)),
         "positive": lambda: rng.uniform(0, 1, (m, n))}[kind]()
    return Dense(W * draw(st.sampled_from([1.0, 1.0, 1e-20, 1e20])))


@st.composite
def small_conv(draw):
    g = draw(st.sampled_from([1, 2]))
    cig, cog = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    k = draw(st.integers(1, 3))
    s, d = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 1)) for _ in range(4))
    keff = d * (k - 1) + 1
    hmin, wmin = max(1, keff - pads[0] - pads[2]), max(1, keff - pads[1] - pads[3])
    h, w = draw(st.integers(hmin, max(hmin, 4))), draw(st.integers(wmin, max(wmin, 4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    K = rng.standard_normal((g * cog, cig, k, k))
    return Conv2d(K, (g * cig, h, w), stride=s, padding=pads, dilation=d, groups=g)


@SETTINGS
@given(small_dense())
def test_dense_sdp_bound(op):
    tr = truth(op)
    b = sdp.sdp_bound(op)
    assert isinstance(b, Bound) and b.method == "sdp" and b.rigor == "rump-cholesky"
    assert tr <= b.value <= tr * (1 + TOL)
    for key in ("solver", "status", "solve_seconds", "delta", "seconds"):
        assert key in b.info


@SETTINGS
@given(small_conv())
def test_conv_sdp_bound_explicit(op):
    tr = truth(op)
    b = sdp.sdp_bound(op, max_dim=200)
    assert b.info["family"] == "explicit"
    assert tr <= b.value <= tr * (1 + TOL)


@SETTINGS
@given(small_conv())
def test_conv_sdp_bound_dft_blocks(op):
    tr = truth(op)
    b = sdp.sdp_bound(op, mode="blocks")
    assert b.info["family"].startswith("dft-blocks")
    assert b.value >= tr


def test_scs_fallback_solver_is_also_proven():
    rng = np.random.default_rng(0)
    op = Dense(rng.standard_normal((6, 5)))
    tr = truth(op)
    b = sdp.sdp_bound(op, solver="SCS")
    assert b.info["solver"] == "SCS"
    assert tr <= b.value <= tr * (1 + 1e-3)


def test_solver_value_is_only_an_estimate():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((5, 7))
    val, info = sdp.solve_norm_sdp(W)
    assert isinstance(val, float) and not isinstance(val, Bound)
    assert abs(val / np.linalg.norm(W, 2) - 1) < 1e-5
    Z = W[:, :5] + 1j * rng.standard_normal((5, 5))
    assert abs(sdp.solve_norm_sdp(Z)[0] / np.linalg.norm(Z, 2) - 1) < 1e-5


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_tiny_and_huge(scale):
    rng = np.random.default_rng(2)
    op = Dense(rng.standard_normal((6, 4)) * scale)
    tr = truth(op)
    assert tr <= sdp.sdp_bound(op).value <= tr * (1 + TOL)
    conv = Conv2d(rng.standard_normal((2, 2, 3, 3)) * scale, (2, 4, 4), padding=1)
    tr = truth(conv)
    assert tr <= sdp.sdp_bound(conv, max_dim=100).value <= tr * (1 + TOL)


def test_zero_operator():
    assert sdp.sdp_bound(Dense(np.zeros((3, 2)))).value == 0.0


def test_larger_conv_uses_blocks_and_is_sound():
    rng = np.random.default_rng(3)
    op = Conv2d(rng.standard_normal((2, 2, 3, 3)), (2, 5, 5), padding=1)
    b = sdp.sdp_bound(op)                   # min(in, out) = 50 <= 400: explicit matrix
    assert b.info["family"] == "explicit" and b.value >= truth(op)
    b2 = sdp.sdp_bound(op, max_dim=40)      # forced to DFT blocks (Gram side 2 min(2, 2) = 4)
    assert b2.info["family"].startswith("dft-blocks") and b2.value >= truth(op)
    assert b2.info["n_solves"] < b2.info["blocks"]


def test_refuses_too_large():
    with pytest.raises(ValueError, match="max_dim"):
        sdp.sdp_bound(Dense(np.ones((500, 450))))   # smaller Gram side 450 > 400
    big = Conv2d(np.ones((64, 64, 3, 3)), (64, 8, 8), padding=1)
    with pytest.raises(ValueError, match="too large"):
        sdp.sdp_bound(big, max_dim=100)
    with pytest.raises(ValueError):
        sdp.sdp_bound(big, max_dim=100, mode="explicit")

    class Weird(LinearOperator):
        input_shape = (2,)
        output_shape = (2,)

    with pytest.raises(TypeError):
        sdp.sdp_bound(Weird())
