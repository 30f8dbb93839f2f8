"""Power iteration (Estimate) and its Rump-proven Bound.

Oracle: numpy SVD of op.to_dense() in float64.  Asserted exactly on the sound side:
estimate <= truth <= power_bound, and prove(op, t) never succeeds for t < truth.
The DFT-block relaxation is also compared with an independent numpy-FFT
computation of the same circular relaxation (stride 1).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certlib.bounds import Bound, Estimate
from certlib.verifiers import power
from certlib.verifiers.operators import Conv2d, Dense, LinearOperator

SETTINGS = settings(max_examples=20, deadline=None)
SCALES = [1.0, 1.0, 1.0, 1e-20, 1e20]


def _weights(shape, kind, seed, scale):
    rng = np.random.default_rng(seed)
    if kind == "centre":                  # LiResNet-like: identity at the centre tap + noise
        w = rng.standard_normal(shape) / (2 * np.prod(shape[1:]))
        c = min(shape[0], shape[1])
        w[(np.arange(c), np.arange(c)) + tuple(s // 2 for s in shape[2:])] += 1.0
    elif kind == "positive":
        w = rng.uniform(0, 1, shape)
    elif kind == "rank1":
        w = np.multiply.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1:]))
    else:
        w = rng.standard_normal(shape)
    return w * scale


@st.composite
def dense_ops(draw, max_dim=10):
    m, n = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    kind = draw(st.sampled_from(["gauss", "gauss", "rank1", "centre", "positive"]))
    return Dense(_weights((m, n), kind, draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(SCALES))))


@st.composite
def conv_ops(draw, max_ch=3, max_n=6, stride=(1, 3), kinds=("gauss", "gauss", "centre", "positive")):
    g = draw(st.sampled_from([1, 1, 2, 3]))
    cig, cog = draw(st.integers(1, max_ch)), draw(st.integers(1, max_ch))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sh, sw = draw(st.integers(*stride)), draw(st.integers(*stride))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    keh, kew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    h = draw(st.integers(max(1, keh - pads[0] - pads[2]), max(max_n, keh)))   # n < k allowed
    w = draw(st.integers(max(1, kew - pads[1] - pads[3]), max(max_n, kew)))
    K = _weights((g * cog, cig, kh, kw), draw(st.sampled_from(kinds)),
                 draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(SCALES)))
    return Conv2d(K, (g * cig, h, w), stride=(sh, sw), padding=pads, dilation=(dh, dw), groups=g)


def truth(op):
    return float(np.linalg.svd(op.to_dense(), compute_uv=False)[0])


def grid_stride1(op):
    """proofs/zero_padding.md for stride 1: N = max(out, n + max(pad_begin, pad_end)) per axis."""
    _, h, w = op.input_shape
    pt, pl, pb, pr = op.padding
    _, oh, ow = op.output_shape
    return max(oh, h + max(pt, pb)), max(ow, w + max(pl, pr))


def relaxed_truth_stride1(op, grid=None):
    """Independent: max singular value of the circular conv on the grid (numpy FFT)."""
    assert op.stride == (1, 1)
    Nh, Nw = grid or grid_stride1(op)
    co, cig, kh, kw = op.kernel.shape
    grid = np.zeros((co, cig, Nh, Nw))
    for a in range(kh):
        for b in range(kw):           # fold modulo N (never crop)
            grid[:, :, (op.dilation[0] * a) % Nh, (op.dilation[1] * b) % Nw] += op.kernel[:, :, a, b]
    khat = np.fft.ifft2(grid) * (Nh * Nw)
    cog = co // op.groups
    best = 0.0
    for g in range(op.groups):
        blk = np.moveaxis(khat[g * cog:(g + 1) * cog], (0, 1), (2, 3))
        best = max(best, float(np.linalg.svd(blk, compute_uv=False).max()))
    return best


ops = st.one_of(dense_ops(), conv_ops())


@SETTINGS
@given(conv_ops())
def test_torch_adjoint_matches_operator(op):
    f, ft = power._torch_pair(op, torch.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, *op.input_shape))
    y = rng.standard_normal((1, *op.output_shape))
    Ax = f(torch.from_numpy(x)).numpy()[0]
    Aty = ft(torch.from_numpy(y)).numpy()[0]
    # f and ft carry the same exact power-of-two factor c
    c = np.ldexp(1.0, -np.frexp(np.abs(op.kernel).max())[1]) if op.kernel.any() else 1.0
    np.testing.assert_allclose(Ax, c * op.matvec(x[0]), rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(Aty, c * op.rmatvec(y[0]), rtol=1e-10, atol=1e-300)


@SETTINGS
@given(ops, st.sampled_from([np.float32, np.float64]))
def test_estimate_is_below_truth(op, dtype):
    est = power.estimate(op, n_iter=60, dtype=dtype)
    assert isinstance(est, Estimate) and not isinstance(est, Bound)
    assert est.value <= truth(op)
    v = est.info["vector"]
    assert v.shape == tuple(op.input_shape) and abs(np.linalg.norm(v) - 1) < 1e-12


@SETTINGS
@given(ops)
def test_power_bound_sound_and_tight(op):
    tr = truth(op)
    b = power.power_bound(op)                 # dense, or a small conv's exact explicit matrix
    assert isinstance(b, Bound) and b.method == "power" and b.rigor == "rump-cholesky"
    assert b.value >= tr
    assert b.value <= tr * (1 + 1e-3)
    for key in ("iterations", "delta", "seconds", "estimate"):
        assert key in b.info


@SETTINGS
@given(conv_ops())
def test_dft_blocks_sound(op):
    tr = truth(op)
    b = power.power_bound(op, mode="blocks")
    assert b.value >= tr
    assert b.info["family"].startswith("dft-blocks")
    if op.stride == (1, 1):
        fam = power.ConvFamily(op)
        assert all(a <= b for a, b in zip(fam.grid, grid_stride1(op)))
        rel = relaxed_truth_stride1(op, fam.grid)
        assert rel * (1 - 1e-9) <= b.value <= rel * (1 + 1e-3)
        fam = power.ConvFamily(op, grid=grid_stride1(op))
        t, _ = power.prove_family(fam, refine=lambda cert, i: cert.estimate())
        rel = relaxed_truth_stride1(op)
        assert tr <= t and rel * (1 - 1e-9) <= t <= rel * (1 + 1e-3)


@SETTINGS
@given(conv_ops(max_ch=2, max_n=5))
def test_every_accepted_grid_is_sound(op):
    """Each grid that passes the relaxation check (not just the smallest) bounds op."""
    tr = truth(op)
    _, h, w = op.input_shape
    pt, pl, pb, pr = op.padding
    tops = (-(-(h + pt + pb) // op.stride[0]), -(-(w + pl + pr) // op.stride[1]))
    for Nh in range(1, tops[0] + 3):
        for Nw in range(1, tops[1] + 3):
            try:
                fam = power.ConvFamily(op, grid=(Nh, Nw))
            except ValueError:
                continue
            blocks = max(np.linalg.svd(fam.block(i)[0], compute_uv=False)[0]
                         for i in range(fam.n_blocks))
            assert np.ldexp(blocks, -fam.k) >= tr * (1 - 1e-12)


@SETTINGS
@given(st.one_of(dense_ops(), conv_ops()), st.sampled_from(["auto", "blocks"]))
def test_prove_never_succeeds_below_truth(op, mode):
    tr = truth(op)
    if tr == 0:
        return
    if isinstance(op, Dense) and mode == "blocks":
        mode = "auto"
    assert power.prove(op, tr * (1 - 1e-6), mode=mode) is None


@SETTINGS
@given(conv_ops(kinds=("gauss",), stride=(1, 1)), st.integers(0, 2**32 - 1))
def test_circular_like_centre_tap_is_tight(op, seed):
    """A kernel with only the centre tap (a 1x1 conv in k x k clothing) is exactly
    block diagonal: the DFT relaxation equals the truth."""
    K = np.zeros_like(op.kernel)
    kh, kw = K.shape[2:]
    K[:, :, kh // 2, kw // 2] = np.random.default_rng(seed).standard_normal(K.shape[:2])
    op = Conv2d(K, op.input_shape, padding=op.padding, dilation=op.dilation, groups=op.groups)
    tr = truth(op)
    b = power.power_bound(op, mode="blocks")
    assert tr <= b.value
    if tr > 0:                      # (0 when every output reads only padding)
        assert b.value <= tr * (1 + 1e-3)


def test_folding_small_grid_matches_explicit_circular_conv():
    rng = np.random.default_rng(5)
    K = rng.standard_normal((2, 3, 3, 4))
    op = Conv2d(K, (3, 4, 5), padding=1)
    with pytest.raises(ValueError):
        power.ConvFamily(op, grid=(2, 2))            # smaller than n + pad: refused
    for grid in [(2, 3), (1, 1), (3, 2)]:
        fam = power.ConvFamily(op, grid=grid, check_grid=False)
        Nh, Nw = grid
        C = np.zeros((2, Nh, Nw, 3, Nh, Nw))         # y[o,i,j] = sum K[o,c,a,b] x[c,(i+a)%N,(j+b)%N]
        for i in range(Nh):
            for j in range(Nw):
                for a in range(3):
                    for b in range(4):
                        C[:, i, j, :, (i + a) % Nh, (j + b) % Nw] += K[:, :, a, b]
        explicit = np.linalg.svd(C.reshape(2 * Nh * Nw, -1), compute_uv=False)[0]
        blocks = max(np.linalg.svd(fam.block(i)[0], compute_uv=False)[0] for i in range(fam.n_blocks))
        assert abs(np.ldexp(blocks, -fam.k) / explicit - 1) < 1e-12


def test_larger_grid_is_also_sound():
    rng = np.random.default_rng(6)
    op = Conv2d(rng.standard_normal((3, 2, 3, 3)), (2, 5, 5), padding=1, stride=2)
    fam = power.ConvFamily(op, grid=(9, 7))
    t, _ = power.prove_family(fam, refine=lambda cert, i: cert.estimate())
    assert t >= truth(op)


@pytest.mark.parametrize("scale", [1e-20, 1e20, 1e150, 1e-150])
def test_tiny_and_huge_weights(scale):
    rng = np.random.default_rng(7)
    W = rng.standard_normal((6, 9))
    d = Dense(W * scale)
    tr = truth(d)
    assert power.estimate(d).value <= tr <= power.power_bound(d).value <= tr * (1 + 1e-3)
    op = Conv2d(rng.standard_normal((4, 2, 3, 3)) * scale, (2, 6, 5), padding=(1, 0, 2, 1), stride=2)
    tr = truth(op)
    assert power.estimate(op).value <= tr <= power.power_bound(op).value <= tr * (1 + 1e-3)
    assert power.power_bound(op, mode="blocks").value >= tr
    assert power.prove(op, tr * (1 - 1e-6)) is None


def test_zero_operators():
    assert power.power_bound(Dense(np.zeros((3, 4)))).value == 0.0
    assert power.power_bound(Conv2d(np.zeros((2, 2, 3, 3)), (2, 4, 4)), mode="blocks").value == 0.0
    assert power.prove(Dense(np.zeros((3, 4))), 0.0) is not None


def test_warm_start_and_estimate_type():
    rng = np.random.default_rng(8)
    U, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    V, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    d = Dense(U[:, :9] @ np.diag(np.linspace(3.0, 0.1, 9)) @ V.T)     # gap 3 : 2.64
    e1 = power.estimate(d, n_iter=2000, tol=1e-13, dtype=np.float64)
    e2 = power.estimate(d, n_iter=2000, tol=1e-9, dtype=np.float64, v0=e1.info["vector"])
    assert e1.info["converged"] and e2.info["iterations"] <= 3
    assert abs(e2.value / e1.value - 1) < 1e-9 and e1.value <= truth(d)
    op = Conv2d(rng.standard_normal((4, 4, 3, 3)), (4, 6, 6), padding=1)
    e1 = power.estimate(op, n_iter=30)
    e2 = power.estimate(op, n_iter=30, v0=e1.info["vector"])
    assert e1.value * (1 - 1e-6) <= e2.value <= truth(op)   # warm start continues


def test_moderate_conv_blocks_many_chunks():
    """Centre-identity kernel (LiResNet-like), 8 channels, 10x10: 60+ DFT blocks."""
    K = _weights((8, 8, 3, 3), "centre", 9, 1.0)
    op = Conv2d(K, (8, 10, 10), padding=1)
    tr = truth(op)
    b = power.power_bound(op, mode="blocks")
    assert tr <= b.value <= relaxed_truth_stride1(op, power.ConvFamily(op).grid) * (1 + 1e-3)
    assert b.info["blocks"] == len(power.ConvFamily(op).freqs) and b.info["blocks"] > 60
    fam = power.ConvFamily(op)
    assert 0 < fam.err[0] < 1e-12                      # rigorous DFT error bound, tiny


def test_unsupported_operator():
    class Weird(LinearOperator):
        input_shape = (2,)
        output_shape = (2,)

    with pytest.raises(TypeError):
        power.prove(Weird(), 1.0)


try:  # the public strategies (a colleague's module): extra coverage when present
    from certlib.verifiers.strategies import conv_operators as _pub_conv
    from certlib.verifiers.strategies import dense_operators as _pub_dense
except ImportError:  # pragma: no cover
    _pub_conv = _pub_dense = None


@pytest.mark.skipif(_pub_conv is None, reason="certlib.verifiers.strategies not available")
@settings(max_examples=10, deadline=None)
@given(st.one_of(_pub_dense(max_dim=12), _pub_conv(max_channels=4, max_n=6, max_dense=150))
       if _pub_conv is not None else st.nothing())
def test_public_strategies_sound(op):
    tr = truth(op)
    assert power.estimate(op, n_iter=30).value <= tr
    assert power.power_bound(op).value >= tr
    if isinstance(op, Conv2d):
        assert power.power_bound(op, mode="blocks").value >= tr
    if tr > 0:
        assert power.prove(op, tr * (1 - 1e-6)) is None


def test_worker_processes_agree_with_sequential():
    K = _weights((8, 8, 3, 3), "centre", 11, 1.0)
    op = Conv2d(K, (8, 10, 10), padding=1)
    tr = truth(op)
    b1 = power.power_bound(op, mode="blocks", workers=1)
    b2 = power.power_bound(op, mode="blocks", workers=2)
    assert b2.info["workers"] == 2 and b2.info["cholesky"] + b2.info["by_frobenius"] == b2.info["blocks"]
    assert tr <= b1.value and tr <= b2.value and abs(b2.value / b1.value - 1) < 1e-5
    assert power.prove(op, tr * (1 - 1e-6), mode="blocks", workers=2) is None
    assert power.prove(op, b2.value, mode="blocks", workers=2) is not None
