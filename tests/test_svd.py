"""Tests for certlib.verifiers.svd: explicit dense matrices are the oracle.

Sound side: ``truth <= bound.value`` exactly (truth = numpy float64 SVD of
``op.to_dense()`` or of an explicitly built circulant matrix).  Tight side:
``bound / truth <= 1 + 1e-9`` where the method is exact (dense, circular convs,
1x1 convs); for zero-padded convs the bound lies below the sampled frequency
supremum (a tiny rounding allowance on that side only).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certlib.bounds import Bound
from certlib.verifiers import svd, svd_blocks
from certlib.verifiers.operators import Conv2d, Dense
from certlib.verifiers.strategies import conv_operators, dense_operators, weight_arrays

TIGHT = 1.0 + 1e-9


def truth(op) -> float:
    return float(np.linalg.svd(op.to_dense(), compute_uv=False)[0])


def circulant_dense(K: np.ndarray, Nh: int, Nw: int, groups: int = 1) -> np.ndarray:
    """Explicit matrix of y[o,i,j] = sum K[o,c,a,b] x[g(o) cg + c, (i+a) % Nh, (j+b) % Nw]."""
    c_out, cg, kh, kw = K.shape
    c_in, m = cg * groups, c_out // groups
    M = np.zeros((c_out, Nh, Nw, c_in, Nh, Nw))
    I, J = np.meshgrid(np.arange(Nh), np.arange(Nw), indexing="ij")
    for o in range(c_out):
        for c in range(cg):
            for a in range(kh):
                for b in range(kw):
                    np.add.at(M, (o, I, J, (o // m) * cg + c, (I + a) % Nh, (J + b) % Nw),
                              K[o, c, a, b])
    return M.reshape(c_out * Nh * Nw, c_in * Nh * Nw)


def sv_max(A: np.ndarray) -> float:
    return float(np.linalg.svd(A, compute_uv=False)[0])


# ----------------------------------------------------------------------------- properties

@settings(max_examples=200, deadline=None)
@given(dense_operators(max_dim=24))
def test_dense_bound_sound_and_tight(op):
    b = svd.bound(op)
    assert isinstance(b, Bound)
    t = truth(op)
    assert t <= b.value
    assert b.value <= t * TIGHT


@settings(max_examples=250, deadline=None)
@given(conv_operators(max_dense=400))
def test_conv_bound_between_truth_and_frequency_sup(op):
    b = svd.bound(op)
    t = truth(op)
    assert t <= b.value  # sound: no slack
    sup = svd.continuous_frequency_sup(op, oversample=2)
    assert b.value <= sup * TIGHT  # the bound's grid is contained in the sampled grid


@st.composite
def circular_cases(draw):
    g = draw(st.integers(1, 3))
    cg = draw(st.integers(1, 3))
    m = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    Nh, Nw = draw(st.integers(1, 6)), draw(st.integers(1, 6))  # often N < k: folding
    K = draw(weight_arrays((g * m, cg, kh, kw)))
    return K, (Nh, Nw), g


@settings(max_examples=200, deadline=None)
@given(circular_cases())
def test_circular_conv_exact_against_circulant_oracle(case):
    K, (Nh, Nw), g = case
    t = sv_max(circulant_dense(K, Nh, Nw, g))
    b = svd.circular_conv_bound(K, (Nh, Nw), groups=g)
    assert t <= b.value
    assert b.value <= t * TIGHT
    if g == 1:
        est = svd.circular_conv_norm(K, (Nh, Nw))
        assert abs(est - t) <= 1e-9 * t + 1e-300


@settings(max_examples=100, deadline=None)
@given(conv_operators(max_kernel=1, max_dense=400))
def test_1x1_conv_is_exact(op):
    # A 1x1 conv (any stride/groups) has norm max_g ||K_g||: the bound must be tight.
    t = truth(op)
    b = svd.conv_bound(op)
    assert t <= b.value <= t * TIGHT


@settings(max_examples=40, deadline=None)
@given(conv_operators(max_dense=200))
def test_multichunk_and_blas_gram_paths(op):
    # Force the two-pass frequency sweep (small chunks) and the BLAS herk Gram path.
    with mock.patch.object(svd, "CHUNK_ELEMS", 64), mock.patch.object(svd_blocks, "_GRAM_ZHERK_MIN", 1):
        b = svd.conv_bound(op)
    assert truth(op) <= b.value
    assert b.value <= svd.continuous_frequency_sup(op, oversample=1) * TIGHT


@settings(max_examples=30, deadline=None)
@given(conv_operators(max_dense=300))
def test_fallback_without_cholesky_is_sound(op):
    # If every Cholesky proof fails, the eigensolver backward-error margin must still hold.
    def never(G, s, eG):
        return np.zeros(G.shape[0], bool), np.full(G.shape[0], np.inf)

    with mock.patch.object(svd_blocks, "_chol_certify", never):
        b = svd.conv_bound(op)
    assert truth(op) <= b.value


# ----------------------------------------------------------------------------- regressions

def test_fold_not_crop_when_grid_smaller_than_kernel():
    rng = np.random.default_rng(3)
    K = rng.standard_normal((2, 2, 5, 5))
    for grid in [(3, 3), (2, 4), (1, 1)]:
        t = sv_max(circulant_dense(K, *grid))
        assert abs(svd.circular_conv_norm(K, grid) - t) <= 1e-9 * t
        b = svd.circular_conv_bound(K, grid)
        assert t <= b.value <= t * TIGHT
        cropped = sv_max(circulant_dense(K[:, :, :grid[0], :grid[1]], *grid))
        assert abs(cropped - t) > 1e-3 * t  # cropping would be wrong here: the test has teeth


def test_zero_padding_is_not_the_circular_conv_on_the_same_grid():
    K = np.array([[[[-3.0, 3.0, -3.0], [2.0, 2.0, 2.0], [-3.0, 1.0, -2.0]]]])
    op = Conv2d(K, (1, 5, 5), padding=1)
    t = truth(op)
    same_grid = svd.circular_conv_norm(K, (5, 5))
    assert t > 1.05 * same_grid  # the circular conv on the unpadded grid under-estimates
    assert t <= svd.conv_bound(op).value
    assert all(N >= 5 + 1 for N in svd.conv_grid(op))


def test_groups_take_the_max_not_the_product():
    K = np.array([2.0, 3.0]).reshape(2, 1, 1, 1)
    op = Conv2d(K, (2, 4, 4), groups=2)
    b = svd.conv_bound(op)
    assert 3.0 <= b.value <= 3.0 * TIGHT  # product would be 6
    half = Conv2d(np.full((2, 1, 1, 1), 0.5), (2, 3, 3), groups=2)
    assert 0.5 <= svd.conv_bound(half).value <= 0.5 * TIGHT  # product would be 0.25 < truth
    rng = np.random.default_rng(5)
    Kg = rng.standard_normal((6, 2, 3, 3))
    op = Conv2d(Kg, (6, 5, 5), padding=1, groups=3)
    parts = [svd.conv_bound(Conv2d(Kg[2 * i:2 * i + 2], (2, 5, 5), padding=1)).value
             for i in range(3)]
    b = svd.conv_bound(op).value
    assert truth(op) <= b
    assert max(parts) * (1 - 1e-12) <= b <= max(parts) * (1 + 1e-12)


@pytest.mark.parametrize("scale", [1e-300, 1e-20, 1e20, 1e150, 1e300])
def test_dense_tiny_and_huge_weights(scale):
    W = np.random.default_rng(7).standard_normal((5, 3)) * scale
    t = sv_max(W)
    b = svd.dense_bound(W)
    assert t <= b.value <= t * TIGHT


def test_dense_mixed_magnitudes_underflow_after_scaling():
    W = np.array([[1e150, 1e-300, 0.0], [-3e-310, 2e149, 5e-320], [1e-300, 0.0, -7e149]])
    t = sv_max(W)
    assert t <= svd.dense_bound(W).value <= t * TIGHT


@pytest.mark.parametrize("scale", [1e-20, 1e20, 1e150])
def test_conv_tiny_and_huge_weights(scale):
    K = np.random.default_rng(11).standard_normal((3, 2, 3, 3))
    op1 = Conv2d(K, (2, 6, 6), padding=(1, 0, 2, 1), stride=(1, 2))
    ops = Conv2d(K * scale, (2, 6, 6), padding=(1, 0, 2, 1), stride=(1, 2))
    b1, bs = svd.conv_bound(op1).value, svd.conv_bound(ops).value
    assert truth(ops) <= bs
    assert abs(bs / scale - b1) <= 1e-12 * b1  # scaling loses nothing


def test_zero_weights_give_zero():
    assert svd.dense_bound(np.zeros((3, 4))).value == 0.0
    assert svd.conv_bound(Conv2d(np.zeros((2, 2, 3, 3)), (2, 4, 4), padding=1)).value == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_rejected(bad):
    W = np.ones((3, 3))
    W[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        svd.bound(Dense(W))
    K = np.ones((2, 2, 3, 3))
    K[0, 1, 2, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        svd.bound(Conv2d(K, (2, 5, 5), padding=1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        svd.circular_conv_norm(K, (4, 4))


def test_unsupported_operator_rejected():
    with pytest.raises(ValueError, match="unsupported operator"):
        svd.bound(np.eye(3))


def test_stride_one_grid_formula():
    op = Conv2d(np.ones((1, 1, 3, 3)), (1, 16, 16), padding=1)
    assert svd.conv_grid(op) == (17, 17)
    op = Conv2d(np.ones((1, 1, 3, 3)), (1, 16, 16), padding=(2, 0, 0, 2), dilation=(2, 1))
    assert svd.conv_grid(op) == (18, 18)  # n + max(p_b, p_e)
    op = Conv2d(np.ones((1, 1, 3, 3)), (1, 16, 16), padding=1, stride=2)
    assert svd.conv_grid(op) == (9, 9)  # ceil((16 + 2) / 2)
