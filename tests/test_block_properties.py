"""Property tests (Hypothesis) of the bounds added for imported graphs,
against the explicit matrix of the exact block (float64 SVD oracle):
fused linear residuals, input-scale folding, transposed convolutions, wrap
pad + conv (circular) and concats of entry selections.  Each bound must be
>= the oracle and, where the rule is exact, equal to it up to rounding."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certlib.ir.graph import AffineNode, Graph, IndexNode, LinearNode, ParallelNode, ReshapeNode
from certlib.ir.compose import analyze
from certlib.verifiers.operators import Conv2d, Dense

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _body(nodes, in_shape):
    """analyze()'s body bound of `nodes` (a Dense head is appended)."""
    out = nodes[-1].out_shape
    n = int(np.prod(out))
    tail = [ReshapeNode("flat", "Flatten", out, (n,)),
            LinearNode("head", "Gemm", (n,), (2,), op=Dense(np.eye(2, n)))]
    g = Graph("x", in_shape, "y", list(nodes) + tail, num_classes=2)
    return analyze(g, "exact").body.value


def _matrix(nodes, in_shape):
    """Explicit matrix of the block: evaluate it on every basis vector (float64)."""
    n = int(np.prod(in_shape))
    h = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    for node in nodes:
        h, _ = node.apply(h, False)
    return h.reshape(n, -1).numpy().T


def _norm(M):
    return float(np.linalg.svd(M, compute_uv=False)[0])


@st.composite
def same_convs(draw):
    c = draw(st.integers(1, 3))
    hw = draw(st.integers(2, 5))
    k = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 10 ** 6))
    rng = np.random.default_rng(seed)
    p = (k - 1) // 2
    mk = lambda: Conv2d(rng.normal(size=(c, c, k, k)), (c, hw, hw), padding=(p, p, p, p))  # noqa: E731
    return (c, hw, hw), mk, draw(st.sampled_from([(1.0, 1.0), (1.0, -1.0)])), draw(st.booleans())


@SETTINGS
@given(same_convs())
def test_fused_linear_residual_equals_the_block_norm(case):
    shape, mk, signs, identity = case
    a = LinearNode("a", "Conv", shape, shape, op=mk())
    b = [] if identity else [LinearNode("b", "Conv", shape, shape, op=mk())]
    block = ParallelNode("add", "Add", shape, shape, branches=[[a], b], merge="add", signs=signs)
    true = _norm(_matrix([block], shape))
    bound = _body([block], shape)
    assert true <= bound <= true * (1 + 1e-9) + 1e-12


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 5), st.integers(0, 10 ** 6))
def test_input_scale_folded_into_conv_equals_the_pair_norm(cin, cout, hw, seed):
    rng = np.random.default_rng(seed)
    shape = (cin, hw, hw)
    s = rng.uniform(0.1, 3.0, size=(cin, 1, 1)) * rng.choice([-1, 1], size=(cin, 1, 1))
    aff = AffineNode("div", "Div", shape, shape, scale=s, shift=rng.normal(size=(cin, 1, 1)))
    op = Conv2d(rng.normal(size=(cout, cin, 3, 3)), shape, padding=(1, 1, 1, 1))
    conv = LinearNode("conv", "Conv", shape, op.output_shape, op=op)
    # the pair's linear part: the same map without the shift
    zero = _matrix([AffineNode("div", "Div", shape, shape, scale=s, shift=np.zeros((cin, 1, 1))), conv], shape)
    true = _norm(zero)
    bound = _body([aff, conv], shape)
    assert true <= bound <= true * (1 + 1e-9)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 2), st.integers(2, 4), st.sampled_from([1, 2]), st.sampled_from([1, 2, 3]),
       st.integers(0, 10 ** 6))
def test_transposed_conv_bound_covers_its_matrix(cin, g, hw, stride, k, seed):
    rng = np.random.default_rng(seed)
    cout = g * cin
    # the conv whose adjoint the ConvTranspose applies (kernel = the ONNX ConvTranspose weight)
    op = Conv2d(rng.normal(size=(cin * g, cout // g, k, k)), (cout, hw * stride + k - 1, hw * stride + k - 1),
                stride=(stride, stride), groups=g)
    node = LinearNode("ct", "ConvTranspose", op.output_shape, op.input_shape, op=op, transposed=True)
    true = _norm(_matrix([node], op.output_shape))
    assert np.isclose(true, _norm(op.to_dense()), rtol=1e-12)
    bound = _body([node], op.output_shape)
    assert true <= bound <= true * (1 + 1e-9)


@SETTINGS
@given(st.integers(1, 3), st.integers(3, 6), st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.integers(0, 10 ** 6))
def test_wrap_pad_then_conv_equals_the_pair_norm(c, hw, k, dil, seed):
    rng = np.random.default_rng(seed)
    p = dil * (k - 1) // 2
    shape = (c, hw, hw)
    idx = np.mod(np.arange(-p, hw + p), hw).tolist()
    pad = IndexNode("pad", "Pad", shape, (c, hw + 2 * p, hw + 2 * p), fn="gather", lipschitz=2.0,
                    params={"index": [None, idx, idx], "mode": "wrap", "begin": [0, p, p], "end": [0, p, p]})
    op = Conv2d(rng.normal(size=(c, c, k, k)), pad.out_shape, dilation=(dil, dil))
    conv = LinearNode("conv", "Conv", pad.out_shape, op.output_shape, op=op)
    true = _norm(_matrix([pad, conv], shape))
    bound = _body([pad, conv], shape)
    assert true <= bound <= true * (1 + 1e-9)


@SETTINGS
@given(st.integers(2, 6), st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6), st.integers(1, 3)),
                                   min_size=1, max_size=4))
def test_concat_of_selections_equals_sqrt_of_max_copies(n, cuts):
    shape = (n, 2)
    branches = []
    for start, length, step in cuts:
        start = start % n
        stop = min(n, start + length)
        out = (len(range(start, stop, step)), 2)
        branches.append([IndexNode("s", "Slice", shape, out, fn="slice",
                                   params={"slices": [(start, stop, step), (0, 2, 1)]})])
    rows = sum(b[0].out_shape[0] for b in branches)
    block = ParallelNode("cat", "Concat", shape, (rows, 2), branches=branches, merge="concat", axis=0)
    true = _norm(_matrix([block], shape))
    bound = _body([block], shape)
    assert true <= bound <= true * (1 + 1e-9)
