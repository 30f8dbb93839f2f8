"""Slope-restricted residual blocks x - B^T Lambda s(Bx + b) bounded as one
block (proofs/residual_blocks.md): the bound max(1, ||Lambda^1/2 B||^2 - 1)
dominates every Jacobian I - B^T Lambda D B (D diagonal in [0, 1]; explicit
matrices), is attained when ||Lambda^1/2 B||^2 >= 2, stays above the attack,
and is used only for the exact structure."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings, strategies as st

from certlib.attack import empirical_lipschitz
from certlib.ir.compose import analyze
from certlib.ir.graph import ActivationNode, AffineNode, Graph, LinearNode, ParallelNode
from certlib.ir.op_bounds import conv_matrix
from certlib.verifiers.operators import Conv2d, Dense


def _block(B_op, lam_half, conv: bool, act="relu", alpha=0.0, sign=-1.0, perturb=False, cerr=0.0):
    """x + sign * 2 * B^T diag(lam_half) s(Bx + b): Lambda = -sign * 2 * lam_half."""
    if conv:
        cout = B_op.kernel.shape[0]
        in_shape, mid = B_op.input_shape, B_op.output_shape
        A_op = Conv2d(B_op.kernel.copy(), B_op.input_shape, B_op.stride, B_op.padding, B_op.dilation,
                      B_op.groups)
        if perturb:
            A_op.kernel.flat[0] = math.nextafter(A_op.kernel.flat[0], math.inf)
        A = LinearNode("A", "ConvTranspose", mid, in_shape, op=A_op, transposed=True)
        scale = np.asarray(lam_half).reshape(cout, 1, 1)
        bias = np.linspace(-0.5, 0.5, cout).reshape(cout, 1, 1)
    else:
        cout = B_op.weight.shape[0]
        in_shape, mid = (B_op.weight.shape[1],), (cout,)
        wt = B_op.weight.T.copy()
        if perturb:
            wt[0, 0] = math.nextafter(wt[0, 0], math.inf)
        A = LinearNode("A", "MatMul", mid, in_shape, op=Dense(wt))
        scale = np.asarray(lam_half)
        bias = np.linspace(-0.5, 0.5, cout)
    act_node = ActivationNode("s", act, mid, mid, activation=act,
                              params={"alpha": alpha} if act == "leaky_relu" else {})
    br = [LinearNode("B", "Conv", in_shape, mid, op=B_op),
          AffineNode("bias", "Add", mid, mid, scale=np.ones_like(bias), shift=bias),
          act_node,
          AffineNode("t", "Mul", mid, mid, scale=scale, shift=np.zeros_like(scale), const_err=cerr),
          A,
          AffineNode("two", "Mul", in_shape, in_shape, scale=np.array(2.0), shift=np.array(0.0))]
    return ParallelNode("block", "Sub", in_shape, in_shape, branches=[[], br], merge="add", signs=(1.0, sign))


def _graph(block, n_in):
    head = LinearNode("head", "Gemm", (n_in,), (3,), op=Dense(np.eye(3, n_in)))
    from certlib.ir.graph import ReshapeNode

    nodes = [block]
    if len(block.in_shape) > 1:
        nodes.append(ReshapeNode("flat", "Flatten", block.in_shape, (n_in,)))
    return Graph("x", block.in_shape, "y", nodes + [head], num_classes=3)


def _bound(block):
    n_in = int(np.prod(block.in_shape))
    g = _graph(block, n_in)
    a = analyze(g)
    lb = [x for x in a.layers if x.name == "block"]
    assert len(lb) == 1
    return g, lb[0]


def _check(B, lam, block, alpha):
    """B explicit, Lambda = lam (exact): the rule's bound vs the explicit Jacobians."""
    g, lb = _bound(block)
    C = np.sqrt(lam)[:, None] * B
    sig2 = np.linalg.svd(C, compute_uv=False)[0] ** 2
    expect = max(1.0, sig2 - 1.0)
    assert "slope-restricted" in lb.method
    assert lb.bound >= expect * (1 - 1e-12)
    assert lb.bound <= expect * (1 + 1e-9) + 1e-12          # no slack beyond rounding
    rng = np.random.default_rng(0)
    n = B.shape[1]
    worst = 0.0
    for d in [np.ones(B.shape[0]), np.zeros(B.shape[0])] + [rng.uniform(alpha, 1, B.shape[0]) for _ in range(20)] \
            + [rng.integers(0, 2, B.shape[0]).astype(float) for _ in range(20)]:
        J = np.eye(n) - B.T @ np.diag(lam * d) @ B
        worst = max(worst, np.linalg.svd(J, compute_uv=False)[0])
    assert worst <= lb.bound * (1 + 1e-9), (worst, lb.bound)
    if sig2 >= 2 and alpha == 0.0:   # attained by D = I (all units active)
        assert lb.bound <= np.linalg.svd(np.eye(n) - C.T @ C, compute_uv=False)[0] * (1 + 1e-9)
    x = rng.normal(size=(6, *block.in_shape))
    assert empirical_lipschitz(g, x, steps=30) <= lb.bound * (1 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 8), n=st.integers(2, 8), target=st.floats(0.3, 4.0), seed=st.integers(0, 10 ** 6),
       leaky=st.booleans())
def test_dense_slope_block_bound(m, n, target, seed, leaky):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(m, n))
    lam_half = rng.uniform(0.1, 1.0, m)
    lam = 2 * lam_half
    C = np.sqrt(lam)[:, None] * W
    W = W * math.sqrt(target) / np.linalg.svd(C, compute_uv=False)[0]   # ||Lambda^1/2 B||^2 ~ target
    alpha = 0.2 if leaky else 0.0
    # leaky: also a scale stored with relative error 2^-53 (a Div by t): Lambda's bound grows by it
    block = _block(Dense(W), lam_half, conv=False, act="leaky_relu" if leaky else "relu", alpha=alpha,
                   cerr=2.0 ** -53 if leaky else 0.0)
    _check(W, lam, block, alpha)


@settings(max_examples=10, deadline=None)
@given(target=st.floats(0.5, 3.0), seed=st.integers(0, 10 ** 6), k=st.sampled_from([1, 2, 3]),
       stride=st.sampled_from([1, 2]))
def test_conv_slope_block_bound(target, seed, k, stride):
    """Conv B with per-channel Lambda, A the ConvTranspose with B's kernel (SLL conv)."""
    rng = np.random.default_rng(seed)
    K = rng.normal(size=(3, 2, k, k))
    op0 = Conv2d(K, (2, 4, 4), stride=(stride, stride), padding=(k // 2,) * 4)
    lam_half = rng.uniform(0.2, 1.0, 3)
    lam_rows = np.repeat(2 * lam_half, int(np.prod(op0.output_shape[1:])))
    Bm = conv_matrix(op0)
    s = math.sqrt(target) / np.linalg.svd(np.sqrt(lam_rows)[:, None] * Bm, compute_uv=False)[0]
    op = Conv2d(K * s, (2, 4, 4), stride=(stride, stride), padding=(k // 2,) * 4)
    _check(conv_matrix(op), lam_rows, _block(op, lam_half, conv=True), 0.0)


def test_slope_block_refuses_other_structures():
    """A one ulp away from B^T, a negative Lambda, or a slope outside [0, 1]:
    the block rule does not apply (the composition rule bounds the block)."""
    rng = np.random.default_rng(1)
    W = rng.normal(size=(4, 5)) / 3
    lam_half = np.full(4, 0.5)
    for block in (_block(Dense(W), lam_half, False, perturb=True),
                  _block(Dense(W), lam_half, False, sign=1.0),
                  _block(Dense(W), lam_half, False, act="leaky_relu", alpha=-0.5),
                  _block(Dense(W), -lam_half, False)):
        _, lb = _bound(block)
        assert "slope-restricted" not in lb.method, lb.method
    K = rng.normal(size=(3, 2, 3, 3))
    op = Conv2d(K, (2, 4, 4), padding=(1, 1, 1, 1))
    _, lb = _bound(_block(op, np.full(3, 0.5), True, perturb=True))
    assert "slope-restricted" not in lb.method


# ------------------------------------------------- general dense blocks: the LMI
@settings(max_examples=8, deadline=None)
@given(m=st.integers(2, 6), n=st.integers(2, 6), seed=st.integers(0, 10 ** 6), sign=st.sampled_from([1.0, -1.0]))
def test_dense_lmi_block_bound(m, n, seed, sign):
    """x + sign * A relu(Bx + b) with a general A: the LMI bound (cvxpy,
    re-proven by Rump) dominates every Jacobian I + sign A D B (D diagonal in
    [0, 1]; explicit matrices) and the attack, and is no worse than the
    composition bound 1 + ||A|| ||B||."""
    from certlib.ir.residual import dense_block
    from certlib.ir.residual_lmi import dense_lmi_bound, prove_lmi, _solve

    rng = np.random.default_rng(seed)
    B = rng.normal(size=(m, n)) / 2
    A = rng.normal(size=(n, m)) / 2
    mid = (m,)
    br = [LinearNode("B", "MatMul", (n,), mid, op=Dense(B), bias=rng.normal(size=m)),
          ActivationNode("s", "Relu", mid, mid, activation="relu"),
          LinearNode("A", "MatMul", mid, (n,), op=Dense(A))]
    block = ParallelNode("block", "Add", (n,), (n,), branches=[[], br], merge="add", signs=(1.0, sign))
    Ah, Bh, a_err = dense_block(block)
    assert np.array_equal(Ah, sign * A) and a_err > 0
    L = dense_lmi_bound(Ah, Bh, a_err)
    assert L is not None
    worst = 0.0
    for d in [np.ones(m), np.zeros(m)] + [rng.uniform(0, 1, m) for _ in range(30)] \
            + [rng.integers(0, 2, m).astype(float) for _ in range(30)]:
        worst = max(worst, np.linalg.svd(np.eye(n) + sign * A @ np.diag(d) @ B, compute_uv=False)[0])
    assert worst <= L
    comp = 1 + np.linalg.svd(A, compute_uv=False)[0] * np.linalg.svd(B, compute_uv=False)[0]
    assert L <= comp * (1 + 1e-6)
    g, lb = _bound(block)
    assert lb.bound <= L * (1 + 1e-12) or "LMI" not in lb.method
    x = rng.normal(size=(6, n))
    assert empirical_lipschitz(g, x, steps=30) <= lb.bound
    # a certificate with rho below the true constant squared is never proven
    rho, lam = _solve(Ah, Bh, 0.0)
    assert not prove_lmi(Ah, Bh, a_err, worst ** 2 * (1 - 1e-6), lam)


def test_dense_lmi_near_sll_is_tight():
    """An SLL block with A one ulp off B^T Lambda (the exact rule does not
    apply): the LMI still proves ~1 (the composition rule gives 1 + 2||W||^2)."""
    rng = np.random.default_rng(3)
    W = rng.normal(size=(5, 6))
    W = W / np.linalg.svd(W, compute_uv=False)[0]
    block = _block(Dense(W), np.full(5, 0.5), False, perturb=True)   # Lambda = 2 * 0.5 = 1: ||C||^2 = 1
    _, lb = _bound(block)
    assert "LMI" in lb.method and lb.bound <= 1.0 + 1e-4
