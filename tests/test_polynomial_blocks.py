"""Polynomials of one skew-symmetric operator (proofs/polynomial_blocks.md):
the stride-1 'same' conv adjoint identity, the skew check, the sup bound
against explicit matrices, the cases where the rule must not fire, and the
ONNX import of SOC-style series (certlib/onnx/ops/polynomial.py)."""

from __future__ import annotations

from fractions import Fraction
from math import factorial

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

from certlib.errors import UnsupportedModelError
from certlib.ir.compose import _Bounder, analyze
from certlib.ir.graph import Graph, LinearNode, ParallelNode, ReshapeNode
from certlib.ir.polynomial import is_skew, polynomial, polynomial_bound, sup_bound
from certlib.onnx.importer import load
from certlib.onnx.ops.polynomial import horner
from certlib.verifiers.operators import Conv2d, Dense

from onnx_builders import make_model

U = 2.0 ** -53
EXP6 = [Fraction(1, factorial(k)) for k in range(7)]


def _conv(K, n, pads=None, stride=1, dil=1):
    c = K.shape[1]
    if pads is None:
        pads = (dil * (K.shape[2] - 1) // 2, dil * (K.shape[3] - 1) // 2) * 2
    return Conv2d(K, (c, n, n), (stride, stride), pads, (dil, dil), 1)


def _matrix(op) -> np.ndarray:
    """The explicit matrix of a Conv2d / Dense (basis vectors pushed through)."""
    if isinstance(op, Dense):
        return op.weight.copy()
    n = int(np.prod(op.input_shape))
    e = torch.eye(n, dtype=torch.float64).reshape(n, *op.input_shape)
    t, l, b, r = op.padding
    y = F.conv2d(F.pad(e, (l, r, t, b)), torch.as_tensor(op.kernel), stride=op.stride, dilation=op.dilation)
    return y.reshape(n, -1).numpy().T


def _skew_kernel(rng, c, kh, kw, scale=1.0):
    K = rng.normal(size=(c, c, kh, kw))
    return (K - K.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]) * scale


def _block(q, op, shape):
    lin = LinearNode("A", "Conv" if isinstance(op, Conv2d) else "Gemm", shape, shape, op=op)
    nodes = horner([Fraction(a) for a in q], lin, shape, "poly")
    assert len(nodes) == 1 and isinstance(nodes[0], ParallelNode)
    return nodes[0]


def _op_bound(op, margin=None):
    return _Bounder("exact", False, None).op_bound(op, margin)


def _truth(node: ParallelNode) -> float:
    n = int(np.prod(node.in_shape))
    e = torch.eye(n, dtype=torch.float64).reshape(n, *node.in_shape)
    y, _ = node.apply(e, False)
    y0, _ = node.apply(torch.zeros_like(e[:1]), False)      # an affine block: its linear part
    return float(np.linalg.svd((y - y0).reshape(n, -1).numpy(), compute_uv=False)[0])


def _oracle_margin(q, rho) -> float:
    """The explicit oracle's own float64 error (Horner products and sums plus
    the SVD): a generous multiple of u times sum |a_k| rho^k."""
    return 256 * U * sum(abs(float(a)) * rho ** k for k, a in enumerate(q))


GEOMETRIES = [(1, 3, 1, 5), (2, 3, 1, 6), (3, 3, 2, 7), (2, 1, 1, 4), (2, 5, 1, 6), (1, 2, 2, 5), (2, 4, 2, 6),
              (4, 3, 1, 3), (2, 5, 1, 2)]   # (channels, k, dilation, n); n < effective k too


@pytest.mark.parametrize("c,k,d,n", GEOMETRIES)
def test_same_conv_adjoint_identity(c, k, d, n):
    """proofs/polynomial_blocks.md, Lemma 1: for a stride-1 conv with symmetric
    zero padding 2p = d(k - 1), conv_K^T = conv_{K'}, K' = flip(K)^T; so a kernel
    with K = -K' is exactly skew.  Checked on the explicit matrices, bit for bit."""
    rng = np.random.default_rng(c * 100 + k * 10 + d + n)
    K = rng.normal(size=(c, c, k, k))
    M = _matrix(_conv(K, n, dil=d))
    Mt = _matrix(_conv(K.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1].copy(), n, dil=d))
    assert np.array_equal(M.T, Mt)
    S = _skew_kernel(rng, c, k, k)
    lin = LinearNode("A", "Conv", (c, n, n), (c, n, n), op=_conv(S, n, dil=d))
    assert is_skew(lin)
    Ms = _matrix(lin.op)
    assert np.array_equal(Ms.T, -Ms)
    S2 = S.copy()
    S2[0, 0, 0, 0] = np.nextafter(S2[0, 0, 0, 0], np.inf)      # one ulp off skew
    assert not is_skew(LinearNode("A", "Conv", (c, n, n), (c, n, n), op=_conv(S2, n, dil=d)))


def test_skew_check_never_claims_a_non_skew_geometry():
    """Attacker's view: random geometries (rectangular kernels and grids,
    dilations, paddings, half of them symmetric 'same') with kernels skew in
    their values: is_skew only where the explicit matrix is skew."""
    rng = np.random.default_rng(1)
    claimed = 0
    for _ in range(300):
        c = int(rng.integers(1, 4))
        kh, kw, dh, dw = (int(v) for v in rng.integers(1, 5, 4))
        H, W = (int(v) for v in rng.integers(1, 7, 2))
        pads = tuple(int(v) for v in rng.integers(0, 5, 4))
        if rng.random() < 0.5 and dh * (kh - 1) % 2 == 0 and dw * (kw - 1) % 2 == 0:
            pads = (dh * (kh - 1) // 2, dw * (kw - 1) // 2) * 2
        K = _skew_kernel(rng, c, kh, kw)
        try:
            op = Conv2d(K, (c, H, W), (1, 1), pads, (dh, dw), 1)
        except ValueError:
            continue
        lin = LinearNode("A", "Conv", op.input_shape, op.output_shape, op=op)
        if is_skew(lin):
            M = _matrix(op)
            assert np.array_equal(M.T, -M), (c, kh, kw, dh, dw, H, W, pads)
            claimed += 1
    assert claimed > 50


def _coefficient_sets(rng):
    """(q, rho, |q(i theta)| increasing on [0, rho]): then the sup sits at
    theta = ||A||, an eigenvalue's modulus, and the bound is tight to the true norm."""
    yield EXP6, 0.5, True                                        # SOC: truncated exp, ||L|| = 1/2
    yield EXP6, 3.0, True                                        # far outside the series' range
    yield [Fraction(1), Fraction(-1, 3), Fraction(1, 7), Fraction(-2, 9)], 1.0, False
    yield [Fraction(0), Fraction(3), Fraction(0), Fraction(-4)], 1.0, True  # Chebyshev T3: cancellation
    yield [Fraction(int(v)) for v in rng.integers(-9, 9, 5)] + [Fraction(1)], 2.0, False
    yield [Fraction(1), Fraction(2) ** 40, Fraction(1, 3)], 50.0, True        # large constants, large rho
    yield [Fraction(1, 2 ** 60), Fraction(0), Fraction(-1, 3 * 2 ** 60)], 1e-3, True


def _interval_sup(q, rho) -> float:
    """max of |q(i theta)| on a fine grid of [0, rho] (float64 complex)."""
    th = np.linspace(0.0, rho, 20001)
    return float(np.max(np.abs(sum(float(a) * (1j * th) ** k for k, a in enumerate(q)))))


def test_bound_is_sound_and_tight_on_skew_operators():
    """bound >= ||q(A)|| (explicit matrix, float64 SVD, minus the oracle's own
    error); within 1e-6 relative of it where |q(i theta)| increases on [0, rho]
    (the sup is then attained on the spectrum), else within 1e-6 of the sup over
    the interval, over skew convs and a skew Dense."""
    rng = np.random.default_rng(7)
    seen = 0
    for q, rho, tight in _coefficient_sets(rng):
        ops = []
        for c, k, d, n in [(2, 3, 1, 5), (3, 1, 1, 4), (1, 3, 2, 6), (2, 2, 2, 4)]:
            S = _skew_kernel(rng, c, k, k)
            op = _conv(S, n, dil=d)
            ops.append((_conv(S * (rho / np.linalg.norm(_matrix(op), 2)), n, dil=d), (c, n, n)))
        W = rng.normal(size=(6, 6))
        ops.append((Dense((W - W.T) * (rho / np.linalg.norm(W - W.T, 2))), (6,)))
        for op, shape in ops:
            node = _block(q, op, shape)
            assert polynomial(node) is not None
            b, how = polynomial_bound(node, _op_bound)
            t = _truth(node)
            m = _oracle_margin(q, rho)
            assert t - m <= b, (q, rho, t, b)
            ref = t if tight else _interval_sup(q, np.linalg.norm(_matrix(op), 2))
            assert b <= ref * (1 + 1e-6) + m, (q, rho, t, ref, b)
            seen += 1
    assert seen == 35


def test_sup_bound_against_exact_rationals():
    """The rational sup bound is >= |q(i theta)|^2 at many exact points and
    within 1e-12 relative of the best of them (proofs/polynomial_blocks.md, Lemma 3)."""
    for q, rho in [(EXP6, 0.5), ([Fraction(0), Fraction(3), Fraction(0), Fraction(-4)], 1.0),
                   ([Fraction(1), Fraction(-5), Fraction(2), Fraction(7), Fraction(-1, 3)], 1.7)]:
        s, _ = sup_bound(q, rho)
        best = Fraction(0)
        for j in range(401):
            th = Fraction(rho) * j / 400
            re = sum(a * (-1) ** (k // 2) * th ** k for k, a in enumerate(q) if k % 2 == 0)
            im = sum(a * (-1) ** (k // 2) * th ** k for k, a in enumerate(q) if k % 2 == 1)
            v = re * re + im * im
            assert v <= s
            best = max(best, v)
        assert s <= best * (1 + Fraction(1, 10 ** 9))


def _generic(node) -> float:
    head = LinearNode("head", "Gemm", (int(np.prod(node.in_shape)),), (3,),
                      op=Dense(np.eye(3, int(np.prod(node.in_shape)))))
    g = Graph("x", node.in_shape, "y", [node, ReshapeNode("f", "Flatten", node.in_shape, head.in_shape), head])
    return float(analyze(g).body.value)


def test_rule_does_not_fire_off_skew_and_the_bound_stays_sound():
    """One entry (one ulp) off skew, asymmetric padding, an even kernel with
    padding that cannot be symmetric, a bias, a transposed conv, a stride-2
    conv: no rule; the generic bound still covers the explicit norm."""
    rng = np.random.default_rng(3)
    S = _skew_kernel(rng, 2, 3, 3)
    S = S * (0.5 / np.linalg.norm(_matrix(_conv(S, 5)), 2))
    off = S.copy()
    off[1, 0, 2, 1] = np.nextafter(off[1, 0, 2, 1], -np.inf)
    E = _skew_kernel(rng, 2, 2, 2) * 0.2
    cases = [("ulp", _conv(off, 5), None, False), ("asym", _conv(S, 5, pads=(0, 0, 2, 2)), None, False),
             ("even", _conv(E, 5, pads=(0, 0, 1, 1)), None, False), ("bias", _conv(S, 5), np.ones(2), False),
             ("transposed", _conv(S, 5), None, True)]
    for name, op, bias, tr in cases:
        lin = LinearNode("A", "Conv", (2, 5, 5), (2, 5, 5), op=op, bias=bias, transposed=tr)
        assert not is_skew(lin), name
        node = horner(EXP6, lin, (2, 5, 5), "p")[0]
        for lv in _levels(node):
            for br in lv.branches:
                for m in br:
                    if isinstance(m, LinearNode):
                        m.bias, m.transposed = bias, tr
        assert polynomial(node) is None, name
        assert _truth(node) <= _generic(node), name
    s2 = LinearNode("A", "Conv", (2, 6, 6), (2, 3, 3), op=Conv2d(S, (2, 6, 6), (2, 2), (1, 1, 1, 1)))
    assert not is_skew(s2)


def _levels(node):
    yield node
    for br in node.branches:
        for m in br:
            if isinstance(m, ParallelNode):
                yield from _levels(m)


def test_compose_uses_the_rule_only_below_the_generic_bound():
    """In analyze the block's bound is the rule's (exp(1/2) by the product rule
    becomes 1 + 6.6e-7) and still >= the explicit norm."""
    rng = np.random.default_rng(11)
    S = _skew_kernel(rng, 2, 3, 3)
    op = _conv(S * (0.5 / np.linalg.norm(_matrix(_conv(S, 6)), 2)), 6)
    node = _block(EXP6, op, (2, 6, 6))
    body = _generic(node)
    t = _truth(node)
    assert t - _oracle_margin(EXP6, 0.5) <= body <= 1.000001
    assert abs(t - 1) < 1e-5


# ------------------------------------------------------------- ONNX import
def _soc_onnx(K, n, terms=6, second=None, leak=False, bias=None, scale_shape=()):
    c = K.shape[0]
    inits = {"K": K, "W": np.eye(3, c * n * n)}
    if second is not None:
        inits["K2"] = second
    if bias is not None:
        inits["B"] = bias
    nodes, z, out = [], "x", "x"
    for i in range(1, terms + 1):
        w = "K2" if (second is not None and i == 3) else "K"
        nodes.append(helper.make_node("Conv", [z, w] + (["B"] if bias is not None else []), [f"c{i}"],
                                      name=f"conv{i}", pads=[1, 1, 1, 1]))
        inits[f"k{i}"] = np.full(scale_shape, float(i))
        nodes.append(helper.make_node("Div", [f"c{i}", f"k{i}"], [f"z{i}"], name=f"div{i}"))
        nodes.append(helper.make_node("Add", [out, f"z{i}"], [f"s{i}"], name=f"add{i}"))
        z, out = f"z{i}", f"s{i}"
    last = out
    if leak:    # z2 also read by a Relu outside the region: not single-exit
        nodes.append(helper.make_node("Relu", ["z2"], ["rz"], name="relu_z2"))
        nodes.append(helper.make_node("Add", [out, "rz"], ["leak"], name="leak"))
        last = "leak"
    nodes += [helper.make_node("Relu", [last], ["r"], name="relu"),
              helper.make_node("Flatten", ["r"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "W"], ["y"], name="head", transB=1)]
    return make_model(nodes, inits, (c, n, n), 3)


def _skew32(rng, c):
    K = rng.normal(size=(c, c, 3, 3)).astype(np.float32) / 4
    return K - K.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]


def test_soc_series_imports_as_polynomial_and_matches_onnxruntime(tmp_path):
    rng = np.random.default_rng(5)
    K = _skew32(rng, 2)
    m = _soc_onnx(K, 5)
    p = tmp_path / "soc.onnx"
    onnx.save(m, str(p))
    _, g = load(p)
    assert isinstance(g.nodes[0], ParallelNode) and polynomial(g.nodes[0]) is not None
    x = rng.normal(size=(16, 2, 5, 5)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ours, _ = g.forward(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    a = analyze(g)
    t = _truth(g.nodes[0])
    assert t <= a.layers[-2].bound or t <= float(a.body.value)
    assert float(a.body.value) <= t * (1 + 1e-6) + _oracle_margin(EXP6, 3.0)


def test_liresnet_residual_is_not_claimed(tmp_path):
    """x + Conv(x) is series-parallel: the walker (and its fusion) keeps it."""
    K = np.random.default_rng(2).normal(size=(2, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["x", "c"], ["s"], name="add"),
             helper.make_node("Flatten", ["s"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W"], ["y"], name="head", transB=1)]
    p = tmp_path / "res.onnx"
    onnx.save(make_model(nodes, {"K": K, "W": np.eye(3, 18)}, (2, 3, 3), 3), str(p))
    _, g = load(p)
    blk = g.nodes[0]
    assert isinstance(blk, ParallelNode) and blk.name == "add"
    assert [len(b) for b in blk.branches] == [0, 1] and blk.branches[1][0].name == "conv"


@pytest.mark.parametrize("kind,needle", [("two convs", "two different convolutions"),
                                         ("leak", "series-parallel"), ("bias", "non-zero bias"),
                                         ("vector", "not a float scalar")])
def test_bad_regions_are_refused_by_name(tmp_path, kind, needle):
    rng = np.random.default_rng(9)
    K = _skew32(rng, 2)
    kw = {"two convs": {"second": _skew32(rng, 2)}, "leak": {"leak": True},
          "bias": {"bias": np.array([0.0, 0.5], dtype=np.float32)}, "vector": {"scale_shape": (1, 2, 1, 1)}}[kind]
    p = tmp_path / "bad.onnx"
    onnx.save(_soc_onnx(K, 4, **kw), str(p))
    with pytest.raises(UnsupportedModelError, match=needle):
        load(p)


def test_downstream_fast_forward_and_refusals(tmp_path):
    """The float32 fast forward covers its error on nested Horner blocks;
    --proof and --semantics float32 refuse the block by name (before writing)."""
    from certlib.certificate import _require_certifiable
    from certlib.errors import UsageError
    from certlib.data import Dataset
    from certlib.verify import predict, predict_fast, verify_file

    rng = np.random.default_rng(4)
    m = _soc_onnx(_skew32(rng, 2), 5)
    p = tmp_path / "soc.onnx"
    onnx.save(m, str(p))
    _, g = load(p)
    a = analyze(g)
    x = rng.uniform(0, 1, size=(8, 2, 5, 5)).astype(np.float32)
    f64, e64 = predict(g, x, a.node_bounds)
    f32, e32 = predict_fast(g, x, a.node_bounds)
    assert np.all(np.linalg.norm(f32 - f64, axis=1) <= e32 + e64)
    with pytest.raises(UsageError, match="poly|h0|Add"):
        _require_certifiable(g, m)
    ds = Dataset(x, np.zeros(8, dtype=np.int64), "rand", 3)
    with pytest.raises(UnsupportedModelError, match="float32"):
        verify_file(p, ds, 0.01, semantics="float32")
