"""The float32 fast path (proofs/fast_forward.md): its a priori error bound
covers the float32 logits' distance to the exact ones, and verify's decisions
(predictions, certified set) equal the float64 path's, radii within the slack."""

import dataclasses

import numpy as np
import pytest
import torch

from certlib.data import Dataset, load as load_data
from certlib.ir import fast
from certlib.ir.compose import analyze, split_head
from certlib.ir.graph import ActivationNode
from certlib.models.liresnet import build
from certlib.onnx.export import build_onnx
from certlib.onnx.importer import import_model
from certlib.verifiers.operators import Conv2d, Dense
from certlib.verify import predict, predict_fast, verify_graph


def _graph(preset, seed, bias_scale=0.0, **kw):
    torch.manual_seed(seed)
    m = build(preset, **kw)
    m.eval()
    g = import_model(build_onnx(m))
    if bias_scale:  # large logit gaps from the head bias: decisions far from the band
        head = g.nodes[split_head(g)]
        rng = np.random.default_rng(seed)
        head.bias = rng.normal(0, bias_scale, g.num_classes)
    return g


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", "test")


@pytest.mark.parametrize("case", range(6))
def test_abs_norm_bound_covers_explicit_matrix(case):
    rng = np.random.default_rng(case)
    if case == 0:
        op = Dense(rng.normal(size=(7, 5)))
    else:
        groups = 2 if case % 2 else 1
        k = rng.normal(size=(4, 4 // groups, 3, 2 + case % 2))
        op = Conv2d(k, (4, 6, 5), stride=(1 + case % 3 // 2, 1 + case // 4), padding=(case % 2, 1, 0, case % 3),
                    dilation=(1, 1 + case // 5), groups=groups)
    M = np.abs(op.to_dense())
    truth = np.linalg.norm(M, 2)
    w = op.weight if isinstance(op, Dense) else op.kernel
    b = fast.abs_norm_bound(w, isinstance(op, Conv2d), getattr(op, "groups", 1))
    assert truth <= b
    assert b <= truth * 4


def test_float32_logits_within_bound(digits):
    g = _graph("digits", 0, width=16, depth=2)
    a = analyze(g, "exact")
    f64, e64 = predict(g, digits.x, a.node_bounds)
    f32, e32 = predict_fast(g, digits.x, a.node_bounds)
    d = np.linalg.norm(f32 - f64, axis=1)
    assert np.all(d <= e32 + e64)
    # the float64 path's reported error is far below the float32 one (the
    # band in fast_certify assumes e64 <= e32)
    assert np.all(e64 <= e32 * 2.0 ** -20)
    # the float64 tier with the a priori bound: covers the truth, and the
    # float64 path's own bound is below it (its band assumes e64 <= 2 e_t2)
    f_t2, e_t2 = predict_fast(g, digits.x, a.node_bounds, dtype=torch.float64)
    assert np.all(np.linalg.norm(f_t2 - f64, axis=1) <= e_t2 + e64)
    assert np.all(e64 <= e_t2)


def _same(g, ds, eps):
    fast_rep = verify_graph(g, ds, eps, device="cpu")
    slow_rep = verify_graph(g, ds, eps, fast=False)
    r, s = fast_rep.result, slow_rep.result
    assert fast_rep.fast["float32"]
    assert np.array_equal(r.pred, s.pred)
    assert np.array_equal(r.certified, s.certified)
    assert np.all(r.radius <= s.radius + 1e-300) or np.all(r.radius[r.certified] > 0)
    return fast_rep, slow_rep


@pytest.mark.parametrize("eps", [0.0, 0.01])
def test_digits_fast_equals_float64(digits, eps):
    g = _graph("digits", 1, bias_scale=3.0, width=16, depth=2)
    f, s = _same(g, digits, eps)
    assert f.fast["recomputed_float64"] < len(digits)  # the float32 path decided some samples
    a = f.analysis
    _, e32 = predict_fast(g, digits.x, a.node_bounds)
    kmin = a.K[a.K > 0].min()
    gap = s.result.radius - f.result.radius
    cert = s.result.certified
    # sound side: never above the float64 radius except where recomputed identically
    assert np.all(gap[cert] >= -1e-12 * np.maximum(1, s.result.radius[cert]))
    assert np.all(gap[cert] <= 4 * 1.5 * e32[cert] / kmin + 1e-12)


def test_cifar_sized_fast_equals_float64():
    g = _graph("cifar10", 2, bias_scale=20.0, width=16, depth=2, dense_dim=32)
    rng = np.random.default_rng(0)
    x = rng.random((24, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 24)
    ds = Dataset(x, y, "random", 10)
    for eps in (0.0, 0.1):
        f, _ = _same(g, ds, eps)
    assert f.fast["recomputed_float64"] < len(ds)


def test_outside_model_uses_float64():
    g = _graph("digits", 0, width=8, depth=1, dense_dim=16)
    act = next(n for n in g.nodes if isinstance(n, ActivationNode))
    act.activation = "tanh"
    assert fast.prepare(g) is None

    @dataclasses.dataclass
    class Extra(type(act)):
        extra_err: float = 0.0
    g2 = _graph("digits", 0, width=8, depth=1, dense_dim=16)
    i = next(i for i, n in enumerate(g2.nodes) if isinstance(n, ActivationNode))
    g2.nodes[i] = Extra(**{f.name: getattr(g2.nodes[i], f.name) for f in dataclasses.fields(g2.nodes[i])})
    assert fast.prepare(g2) is None


@pytest.mark.parametrize("where", ["weight", "bias", "shift"])
def test_stored_constant_errors_are_charged(digits, where):
    """A node whose stored constants are only within a bound of the exact ones
    (weights computed inside the graph, BN shift under cancellation): the fast
    path still runs, and its bound covers the logits of a model whose constants
    sit anywhere in that interval; the same bound without the term does not."""
    import copy

    from certlib.ir.graph import AffineNode, LinearNode

    g = _graph("digits", 3, width=16, depth=2)
    x = digits.x[:64]
    i = next(k for k, n in enumerate(g.nodes) if isinstance(n, LinearNode))
    rng = np.random.default_rng(0)
    exact = copy.deepcopy(g)
    rho = 5e-5 if where == "weight" else 0.05  # folds accept relative errors below 1e-4
    if where == "weight":
        g.nodes[i].weight_rel_err = rho
        k = g.nodes[i].op.kernel
        exact.nodes[i].op = dataclasses.replace(k_op := g.nodes[i].op, kernel=k * (1 + rho * rng.choice([-1.0, 1.0], k.shape)))
    elif where == "bias":
        c = g.nodes[i].op.kernel.shape[0]
        g.nodes[i].bias = np.zeros(c) if g.nodes[i].bias is None else g.nodes[i].bias
        g.nodes[i].bias_abs_err = np.full(c, rho)
        exact.nodes[i].bias = g.nodes[i].bias + rho * rng.choice([-1.0, 1.0], c)
    else:
        shape = g.nodes[i].out_shape
        aff = AffineNode("a", "Add", shape, shape, scale=np.ones(1), shift=np.zeros((shape[0], 1, 1)),
                         shift_abs_err=np.full((shape[0], 1, 1), rho))
        g.nodes.insert(i + 1, aff)
        exact.nodes.insert(i + 1, dataclasses.replace(aff, shift=rho * rng.choice([-1.0, 1.0], (shape[0], 1, 1)),
                                                       shift_abs_err=0.0))
    a = analyze(g, "exact")
    assert fast.prepare(g) is not None
    f32, e32 = predict_fast(g, x, a.node_bounds)
    f_ex, e_ex = predict(exact, x, analyze(exact, "exact").node_bounds)
    d = np.linalg.norm(f32 - f_ex, axis=1)
    assert np.all(d <= e32 + e_ex)
    # the term is charged, and without it the bound misses the exact model
    plain = copy.deepcopy(exact if where != "shift" else g)
    if where == "weight":
        plain.nodes[i].op = k_op
    elif where == "bias":
        plain.nodes[i].bias = g.nodes[i].bias
    else:
        plain.nodes[i + 1].shift_abs_err = 0.0
    _, e_plain = predict_fast(plain, x, a.node_bounds)
    assert np.all(e32 > e_plain)
    if where != "weight":  # (a weight error this small hides under the float32 bound)
        assert np.any(d > e_plain + e_ex)


def _residual_node(c, k_centre, bias, hw=4, stride=1, centre_diag=None):
    """A fused residual conv node W = I + K' (3x3, 'same' padding) whose K'
    has only the centre tap, every entry ``k_centre``."""
    from certlib.ir.graph import LinearNode

    k = np.zeros((c, c, 3, 3))
    k[:, :, 1, 1] = k_centre
    k[np.arange(c), np.arange(c), 1, 1] += 1.0 if centre_diag is None else centre_diag
    op = Conv2d(k, (c, hw, hw), stride=(stride, stride), padding=(1, 1, 1, 1))
    return LinearNode("blk", "Conv", (c, hw, hw), tuple(op.output_shape), op,
                      None if bias is None else np.full(c, bias))


def test_identity_rest_is_exact_and_only_for_identity_plus_kernel():
    rng = np.random.default_rng(0)
    node = _residual_node(8, 0.0, None)
    node.op.kernel[:, :, :, :] += rng.normal(0, 0.01, node.op.kernel.shape)
    rest = fast.identity_rest(node)
    w = rest.copy()
    w[np.arange(8), np.arange(8), 1, 1] += 1.0
    assert np.array_equal(w, node.op.kernel)                    # W = I + K' exactly
    assert fast.identity_rest(_residual_node(8, 0.0, None, centre_diag=2.5)) is None   # 2.5 - 1 not Sterbenz
    assert fast.identity_rest(_residual_node(8, 0.0, None, stride=2)) is None           # not the identity map
    assert fast.identity_rest(_graph("digits", 0, width=16, depth=2).nodes[-1]) is None  # a Dense head


def test_worst_case_executor_stays_within_the_split_chunked_bound():
    """An executor that rounds every operation of every term up by a full u
    (the worst any summation order can do on non-negative data: each product
    passes n/J + J roundings in a chunked sum, the stored weight and the
    residual add one more each) stays within the node's a priori bound, and
    without a bias the bound is within a few % of it: a bound that forgot the
    J partial sums or the residual add would fail here."""
    c = 128                                             # 9 c >= CHUNK_MIN_TERMS: 8 chunks
    u = fast.U32
    x = np.ones((1, c, 4, 4))                           # the Perron vector of |K'|: A'||x|| = |||K'| x||
    h = torch.as_tensor(x, dtype=torch.float32)
    kx = 1e-3 * c * np.ones_like(x)                     # K'x, exactly
    for bias in (None, 0.25):
        node = _residual_node(c, 1e-3, bias)
        p = fast._prep_node(node, "cpu")
        assert p.split and p.chunks == fast.CHUNKS
        y32, rnd = fast._apply(node, p, h, None, fast._norm_up(h))
        n_j = (c * 9) // fast.CHUNKS
        b = bias or 0.0
        exact = x + kx + b
        # K'x: stored weight 1, products and chunk sums n_j, partial sums J - 1, bias add 1
        worst = (x + kx * (1 + u) ** (1 + n_j + fast.CHUNKS - 1 + (bias is not None))
                 + b * (1 + u) ** 2) * (1 + u)
        dev = np.linalg.norm(worst - exact)
        assert dev <= float(rnd[0])
        assert np.linalg.norm(y32.double().numpy() - exact) <= float(rnd[0])
        if bias is None:     # (a bias is charged as a term of the dot product: looser)
            assert float(rnd[0]) <= 1.05 * dev


def test_mixed_precision_plan_keeps_the_expensive_nodes_float32():
    """The cheap linear nodes (stem, neck, head) run in float64, together at
    most CHEAP_SHARE of the multiply-adds; the most expensive node stays
    float32; the bound still covers the float64 path's logits."""
    g = _graph("cifar10", 1, width=64, depth=4, dense_dim=64)
    fg = fast.prepare(g)
    from certlib.ir.graph import LinearNode
    lin = [(fast._macs(n), d) for n, d in zip(g.nodes, fg.dtypes) if isinstance(n, LinearNode)]
    total = sum(m for m, _ in lin)
    assert max(lin)[1] == torch.float32
    assert 0 < sum(m for m, d in lin if d == torch.float64) <= fast.CHEAP_SHARE * total
    assert fast.mixed(fg)
    x = np.random.default_rng(0).random((8, *g.input_shape))
    a = analyze(g, "exact")
    f32, e32 = predict_fast(g, x, a.node_bounds)
    f64, e64 = predict(g, x, a.node_bounds)
    assert np.all(np.linalg.norm(f32 - f64, axis=1) <= e32 + e64)


def _exact_dense(W, x):
    from fractions import Fraction
    return np.array([[float(sum(Fraction(float(w)) * Fraction(float(v)) for w, v in zip(row, xs))) for row in W]
                     for xs in x])


def test_weights_below_the_float32_normal_range_are_charged():
    """fl32(w) of a weight below 2^-126 is off absolutely (1e-50 becomes 0),
    not by v|w|: with large activations the a priori bound must still cover
    the float32 result (it did not: 5.7e-20 against a bound of 1.7e-26)."""
    from certlib.ir.graph import AffineNode, LinearNode
    x = np.full((1, 4), 1e30)
    h = torch.as_tensor(x, dtype=torch.float32)
    for wv in (1e-50, 1.0000001e-40, 3e-39):
        W = np.full((2, 4), wv)
        W[1] *= -1
        node = LinearNode("d", "Gemm", (4,), (2,), Dense(W), None)
        y, rnd = fast._apply(node, fast._prep_node(node, "cpu"), h, None, fast._norm_up(h))
        d = np.linalg.norm(y.double().numpy() - _exact_dense(W, h.double().numpy()))
        assert d <= float(rnd[0])
    aff = AffineNode("s", "Mul", (4,), (4,), np.full(4, 1e-50), np.zeros(4))
    y, rnd = fast._apply(aff, fast._prep_node(aff, "cpu"), h, None, fast._norm_up(h))
    assert np.linalg.norm(y.double().numpy() - 1e-50 * h.double().numpy()) <= float(rnd[0])


def test_an_overflow_hidden_by_a_later_relu_voids_the_bound():
    """-inf from a float32 overflow inside a dot product (2e38 + 2e38) turned
    into 0 by a ReLU left a finite bound (4.7e32) on a logit off by 1e38."""
    from certlib.ir.graph import Graph, LinearNode
    W1 = np.array([[-2e38, -2e38, 2e38, 2e38, 1e38], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    W2 = np.array([[1.0, 0, 0], [0, 1, 1]])
    g = Graph("x", (5,), "y", [LinearNode("a", "Gemm", (5,), (3,), Dense(W1), None),
                               ActivationNode("r", "Relu", (3,), (3,)),
                               LinearNode("b", "Gemm", (3,), (2,), Dense(W2), None)], 2)
    fg = fast.prepare(g)
    assert fg.dtypes == [torch.float32] * 3
    f, e = fast.forward32(fg, np.ones((1, 5)), [np.linalg.norm(W1, 2) * 1.01, 1.0, np.linalg.norm(W2, 2) * 1.01])
    exact = _exact_dense(W2, np.maximum(_exact_dense(W1, np.ones((1, 5))), 0))
    assert np.linalg.norm(f - exact) > 1e37
    assert np.isinf(e[0])


@pytest.mark.parametrize("geo", [((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), ((3, 5), (1, 1), (2, 2, 2, 2), (2, 1)),
                                 ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)), ((3, 3), (1, 1), (1, 1, 2, 1), (1, 1)),
                                 ((3, 3), (1, 1), (0, 1, 2, 1), (1, 1)), ((2, 3), (1, 1), (1, 1, 0, 1), (1, 1)),
                                 ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)), ((5, 3), (1, 1), (2, 1, 2, 1), (1, 1))])
def test_identity_split_against_the_explicit_matrix(geo):
    """Wherever identity_rest splits a node, the explicit matrices satisfy
    W = I + K' on the node's actual geometry (padding order, dilation, stride);
    a geometry where the centre tap does not read the output position is not split."""
    from certlib.ir.graph import LinearNode

    (kh, kw), stride, pad, dil = geo
    rng = np.random.default_rng(kh * 7 + kw)
    k = rng.normal(0, 0.05, (3, 3, kh, kw))
    if kh % 2 and kw % 2:
        k[np.arange(3), np.arange(3), kh // 2, kw // 2] += 1.0
    op = Conv2d(k, (3, 5, 6), stride=stride, padding=pad, dilation=dil)
    node = LinearNode("c", "Conv", (3, 5, 6), tuple(op.output_shape), op, None)
    rest = fast.identity_rest(node)
    same = bool(kh % 2 and kw % 2) and stride == (1, 1) and pad == (dil[0] * (kh // 2), dil[1] * (kw // 2)) * 2
    assert (rest is not None) == same
    if rest is not None:
        K = dataclasses.replace(op, kernel=rest).to_dense()
        assert np.array_equal(op.to_dense(), np.eye(op.to_dense().shape[0]) + K)


def test_float32_norm_bound_against_exact_arithmetic():
    """_norm_up's chunked float32 sum of squares stays above the exact norm of
    the float32 values (Fractions): subnormal squares, mixed magnitudes, a
    value near the float32 maximum (the sum overflows: inf), a prime length
    (one chunk)."""
    from fractions import Fraction

    from certlib.ir.fast_rules import _norm_up

    rng = np.random.default_rng(0)
    rows = [np.full(4096, 1e-23), np.r_[np.full(2048, 1e17), np.full(2048, 1e-20)],
            rng.standard_normal(4099) * 1e-3, np.r_[np.full(63, 2.0 ** 60), np.full(4033, 2.0 ** 30)],
            np.full(128, np.float32(np.finfo(np.float32).tiny) * 3)]
    for row in rows:
        v = row.astype(np.float32)
        hn = float(_norm_up(torch.as_tensor(v[None]))[0])
        exact = sum(Fraction(float(a)) ** 2 for a in v)
        assert Fraction(hn) ** 2 >= exact
    big = np.full(64, np.finfo(np.float32).max / 2, dtype=np.float32)
    assert np.isinf(float(_norm_up(torch.as_tensor(big[None]))[0]))
