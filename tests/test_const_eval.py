"""certlib/onnx/const_eval.py: the float64 value of a constant subgraph and
its error bound contain the exact value (mpmath at 600 bits on the stored
float32 inputs; proofs/normalisation.md, "Constants computed in the graph")."""

import mpmath
import numpy as np
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from certlib.onnx.const_eval import computed_constants

fl32 = st.floats(-8, 8, width=32).filter(lambda v: abs(v) > 2 ** -20)

#: op -> (onnx node builder on inputs a, b, exact function on mpf lists)
OPS = {
    "Div": (lambda: [helper.make_node("Div", ["a", "b"], ["y"])], lambda a, b: [p / q for p, q in zip(a, b)]),
    "Sub": (lambda: [helper.make_node("Sub", ["a", "b"], ["y"])], lambda a, b: [p - q for p, q in zip(a, b)]),
    "Mul": (lambda: [helper.make_node("Mul", ["a", "b"], ["y"])], lambda a, b: [p * q for p, q in zip(a, b)]),
    "SqrtSq": (lambda: [helper.make_node("Mul", ["a", "a"], ["sq"]), helper.make_node("Sqrt", ["sq"], ["s"]),
                        helper.make_node("Div", ["b", "s"], ["y"])],
               lambda a, b: [q / mpmath.sqrt(p * p) for p, q in zip(a, b)]),
    "Norm": (lambda: [helper.make_node("ReduceL2", ["a"], ["n"], keepdims=1),
                      helper.make_node("Div", ["a", "n"], ["y"])],
             lambda a, b: [p / mpmath.sqrt(sum(t * t for t in a)) for p in a]),
    "Sigmoid": (lambda: [helper.make_node("Sigmoid", ["a"], ["g"]), helper.make_node("Mul", ["g", "b"], ["y"])],
                lambda a, b: [q / (1 + mpmath.exp(-p)) for p, q in zip(a, b)]),
    "Exp": (lambda: [helper.make_node("Exp", ["a"], ["y"])], lambda a, b: [mpmath.exp(p) for p in a]),
    # selections of a computed value: Max of two rounded results, Relu of a cancelling difference
    "Max": (lambda: [helper.make_node("Div", ["a", "b"], ["q"]), helper.make_node("Mul", ["a", "b"], ["r"]),
                     helper.make_node("Max", ["q", "r"], ["y"])], lambda a, b: [max(p / q, p * q) for p, q in zip(a, b)]),
    "Relu": (lambda: [helper.make_node("Sub", ["a", "b"], ["d"]), helper.make_node("Relu", ["d"], ["y"])],
             lambda a, b: [max(p - q, 0) for p, q in zip(a, b)]),
    # a shape op whose output shape the folder did not record (only y is folded here)
    "Unsqueeze": (lambda: [helper.make_node("Constant", [], ["ax"], value=numpy_helper.from_array(
                               np.array([0], dtype=np.int64))),
                           helper.make_node("Div", ["a", "b"], ["q"]), helper.make_node("Unsqueeze", ["q", "ax"], ["u"]),
                           helper.make_node("Squeeze", ["u", "ax"], ["y"])], lambda a, b: [p / q for p, q in zip(a, b)]),
}


def _model(nodes, a, b):
    inits = [numpy_helper.from_array(np.asarray(a, dtype=np.float32), "a"),
             numpy_helper.from_array(np.asarray(b, dtype=np.float32), "b")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(a)])
    g = helper.make_graph(nodes, "c", [], [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=90, deadline=None)
@given(op=st.sampled_from(sorted(OPS)), a=st.lists(fl32, min_size=3, max_size=3),
       b=st.lists(fl32, min_size=3, max_size=3), cancel=st.booleans())
def test_interval_rules_cover_exact_values(op, a, b, cancel):
    if cancel:  # b within a few ulps of a: Sub cancels
        b = [float(np.nextafter(np.float32(t), np.float32(9))) for t in a]
    build, exact = OPS[op]
    m = _model(build(), a, b)
    folded = np.zeros(3, dtype=np.float32)  # stands for the folder's float32 value of y
    out, unbounded = computed_constants(m, {"y": folded})
    assert not unbounded, unbounded
    v, e = out["y"]
    with mpmath.workprec(600):
        ex = exact([mpmath.mpf(float(np.float32(t))) for t in a], [mpmath.mpf(float(np.float32(t))) for t in b])
        for vi, ei, xi in zip(v, e, ex):
            assert abs(mpmath.mpf(float(vi)) - xi) <= mpmath.mpf(float(ei)), (op, vi, ei, xi)


def test_comparison_near_its_threshold_is_refused():
    """Equal on values within their error bounds of each other cannot be decided."""
    nodes = [helper.make_node("Div", ["a", "b"], ["q"]), helper.make_node("Mul", ["q", "b"], ["r"]),
             helper.make_node("Equal", ["r", "a"], ["y"])]
    m = _model(nodes, [1.0, 2.0, 3.0], [3.0, 3.0, 3.0])
    out, unbounded = computed_constants(m, {"y": np.zeros(3, dtype=np.float32)})
    assert "y" in unbounded and "comparison" in unbounded["y"]
