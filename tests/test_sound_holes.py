"""Regression tests for false-certificate holes (issue 10, holes 1-4): hand-
built ONNX models whose float64 evaluation and exact-arithmetic prediction
differ; a certified sample must agree with the exact prediction (oracle:
tests/exact_oracle.py, mpmath at 600 bits on the stored initializers)."""

import numpy as np
import onnx
import pytest
from onnx import helper

from certlib.data import Dataset
from certlib.errors import UnsupportedModelError
from certlib.onnx.importer import import_model
from certlib.verify import verify_graph
from exact_oracle import exact_argmax
from onnx_builders import make_model


def certify_model(model, x, eps=1e-20):
    """(certified flags, certlib's predictions) for samples x, labelled with
    certlib's own prediction (the strongest claim it can make)."""
    g = import_model(model)
    x = np.asarray(x, dtype=np.float32)
    logits, _ = g.forward(x)
    y = np.argmax(logits, axis=1)
    rep = verify_graph(g, Dataset(x, y, "t", g.num_classes), eps, "exact")
    return np.asarray(rep.result.certified), y


def assert_sound(model, x, eps=1e-20):
    """No certified sample differs from the exact prediction; returns the flags."""
    cert, pred = certify_model(model, x, eps)
    for i in np.flatnonzero(cert):
        assert exact_argmax(model, x[i]) == pred[i], f"sample {i} certified but the exact prediction differs"
    return cert


def chained_scales():
    """Hole 1: Gemm(b=-1) -> Mul(2^30) -> Mul(2) -> Gemm; at [1, 2^-60] the first
    Gemm's 2^-60 is lost in float64 and the chain amplifies it by 2^31."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Mul", ["h", "k1"], ["m1"], name="mul1"),
             helper.make_node("Mul", ["m1", "k2"], ["m2"], name="mul2"),
             helper.make_node("Gemm", ["m2", "W2", "b2"], ["y"], name="head")]
    inits = {"W1": [[1.0, 1.0]], "b1": [-1.0], "k1": [2.0 ** 30], "k2": [2.0],
             "W2": [[-1.0, 0.0]], "b2": [2.0 ** -30, 0.0]}
    return make_model(nodes, inits, (2,), 2)


def test_hole1_chained_scales_not_certified():
    m = chained_scales()
    x = np.array([[1.0, 2.0 ** -60]], dtype=np.float32)
    cert, pred = certify_model(m, x)
    assert pred[0] == 0 and exact_argmax(m, x[0]) == 1   # the float64 evaluation is wrong here
    assert not cert[0]


def test_hole1_folded_node_bounds_cover_every_scale():
    """The forward-error factor of the linear op under a chain of folded scales
    divides by min|s1 s2|, and every folded affine keeps its own bound."""
    from certlib.ir.compose import analyze
    g = import_model(chained_scales())
    a = analyze(g)
    lin = next(i for i, n in enumerate(g.nodes) if n.name == "fc1")
    # ||[1 1]|| = sqrt 2 exactly; the fold margin adds a few ulps
    assert np.sqrt(2) <= a.node_bounds[lin] <= np.sqrt(2) * (1 + 1e-12)
    for name, s in (("mul1", 2.0 ** 30), ("mul2", 2.0)):
        j = next(i for i, n in enumerate(g.nodes) if n.name == name)
        assert s <= a.node_bounds[j] <= s * (1 + 1e-15)


def bn_cancellation():
    """Hole 2: BN(1, beta, mean, var=3, eps=0) whose shift beta - mean/sqrt 3
    cancels to ~1.7e-9, a Sub of a float32 next to it, a Mul by 2^60.  At x = 0
    the float64 result is -5.6e-17 * 2^60, the exact one +1.3e-17 * 2^60
    (constants found by a search over float32 means; the oracle checks them)."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W1"], ["h"], name="fc1", transB=1),
             helper.make_node("BatchNormalization", ["h", "g", "beta", "mu", "var"], ["bn"], name="bn",
                              epsilon=0.0),
             helper.make_node("Sub", ["bn", "c"], ["d"], name="sub"),
             helper.make_node("Mul", ["d", "k"], ["m"], name="mul"),
             helper.make_node("Gemm", ["m", "W2"], ["y"], name="head", transB=1)]
    inits = {"W1": [[1.0]], "g": [1.0], "beta": [0.4068007469177246], "mu": [0.7045995593070984], "var": [3.0],
             "c": [1.6808796576839313e-09], "k": [2.0 ** 60], "W2": [[1.0], [0.0]]}
    return make_model(nodes, inits, (1,), 2, opset=15)


def test_hole2_bn_shift_cancellation():
    m = bn_cancellation()
    x = np.zeros((1, 1), dtype=np.float32)
    cert, pred = certify_model(m, x)
    assert pred[0] == 1 and exact_argmax(m, x[0]) == 0   # the float64 evaluation is wrong here
    assert not cert[0]
    bn = next(n for n in import_model(m).nodes if n.name == "bn")
    # the shift's charge is relative to |beta| + |mean s| (about 0.8), not |fl(t)| (1.7e-9)
    assert float(np.max(bn.shift_abs_err)) >= 0.8 * 2.0 ** -53


def minmax_rank(unsq_axes, in_shape):
    """Hole 4: Split/Max/Min/Concat with axis=-3 after an Unsqueeze: on rank 5
    axis -3 is not the channel axis, on rank 3 it is the batch axis; a 1e4 bias
    would hide a mismatch from a tolerance relative to the output."""
    nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], name="unsq", axes=unsq_axes),
             helper.make_node("Split", ["u"], ["s0", "s1"], name="split", axis=-3),
             helper.make_node("Max", ["s0", "s1"], ["mx"], name="max"),
             helper.make_node("Min", ["s0", "s1"], ["mn"], name="min"),
             helper.make_node("Concat", ["mx", "mn"], ["c"], name="cat", axis=-3),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"], name="head", transB=1)]
    n = int(np.prod(in_shape))
    rng = np.random.default_rng(0)
    inits = {"W": rng.normal(size=(2, n)), "b": [1e4, 1e4]}
    return make_model(nodes, inits, in_shape, 2, opset=11)


@pytest.mark.parametrize("unsq_axes,in_shape", [([4], (4, 2, 2)), ([1], (2,))])
def test_hole4_axis_by_rank(unsq_axes, in_shape):
    """Refused, or the IR computes what onnxruntime computes (checked on
    differences of outputs, so the constant bias cannot mask a mismatch)."""
    import onnxruntime as ort
    m = minmax_rank(unsq_axes, in_shape)
    try:
        g = import_model(m)
    except UnsupportedModelError as e:
        assert "axis" in str(e)
        return
    x = np.random.default_rng(1).random((8, *in_shape)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ours, _ = g.forward(x)
    np.testing.assert_allclose(ours - ours[:1], ref - ref[:1], atol=1e-3)


def test_minmax_channel_axis_still_imported():
    """axis=-3 on a rank-4 tensor is the channel axis: still one MinMax node."""
    m = minmax_rank([3], (4, 2))  # rank 4 after the Unsqueeze: (N, 4, 2, 1)
    g = import_model(m)
    assert any(getattr(n, "activation", "") == "minmax" for n in g.nodes)


def test_runtime_disagreement_is_never_certified():
    """A sample where onnxruntime's argmax differs from certlib's prediction
    is not certified and is reported (here the IR is tampered with after import)."""
    m = chained_scales()
    g = import_model(m)
    head = g.nodes[-1]
    head.bias = head.bias + np.array([0.0, 1e12])   # the IR now always predicts class 1; onnxruntime does not
    x = np.array([[0.3, 0.2], [0.1, 0.1]], dtype=np.float32)   # onnxruntime: class 0 at both
    rep = verify_graph(g, Dataset(x, np.ones(2, dtype=np.int64), "t", 2), 1e-3, "exact")
    assert rep.runtime_disagree == [0, 1]
    assert not rep.result.certified.any() and not rep.result.radius.any()
    assert rep.as_json()["runtime_disagree"] == [0, 1]


def test_self_test_not_masked_by_a_constant():
    """The import self-test compares differences between inputs: a 1e4 bias on
    every logit no longer hides a mismatch of order 1."""
    from certlib.onnx.importer import check_against_runtime
    m = chained_scales()
    g = import_model(m)
    g.nodes[-1].op.weight[0, 0] += 0.5     # a different function
    g.nodes[-1].bias = g.nodes[-1].bias + 1e4
    m2 = chained_scales()
    for init in m2.graph.initializer:       # the runtime model carries the same 1e4
        if init.name == "b2":
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([2.0 ** -30 + 1e4, 1e4], dtype=np.float32), "b2"))
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        check_against_runtime(m2, g)


def computed_weight(op="Div"):
    """Hole 3: the first layer's weight is Div(ones, 3) (or Sin(ones)), a
    constant subgraph the folder evaluates in float32: fl32(1/3) is 1e-8 off."""
    nodes = [helper.make_node(op, ["ones", "three"] if op == "Div" else ["ones"], ["w1"], name="make_w"),
             helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w1"], ["h"], name="fc1"),
             helper.make_node("Sub", ["h", "c"], ["d"], name="sub"),
             helper.make_node("Mul", ["d", "k"], ["m"], name="mul"),
             helper.make_node("Gemm", ["m", "W2"], ["y"], name="head", transB=1)]
    inits = {"ones": [[1.0], [1.0]], "three": [3.0], "c": [0.3333333432674408], "k": [2.0 ** 40],
             "W2": [[1.0], [0.0]]}
    return make_model(nodes, inits, (2,), 2)


def test_hole3_weight_computed_in_graph():
    m = computed_weight()   # the oracle evaluates Div(ones, 3) exactly
    x = np.array([[1.0, 2.0 ** -30], [0.5, 0.25]], dtype=np.float32)
    assert exact_argmax(m, x[0]) == 1
    g = import_model(m)
    fc1 = next(n for n in g.nodes if n.name == "fc1")
    assert 0 < fc1.weight_rel_err < 1e-15                 # fl64(1/3) charged, not taken as exact
    assert fc1.op.weight[0, 0] == 1.0 / 3.0               # the float64 value, not float32's
    cert, pred = certify_model(m, x)
    for i in np.flatnonzero(cert):
        assert exact_argmax(m, x[i]) == pred[i]


def test_hole3_unboundable_constant_refused():
    with pytest.raises(UnsupportedModelError, match="make_w"):
        import_model(computed_weight("Sin"))
