"""Hypothesis search for false certificates: chains of constant affine ops
(Mul/Div/Add/Sub/BatchNormalization, magnitudes 2^-60 .. 2^60, shifts that
cancel the value at a data sample) after a linear op and after the head.  The
oracle is the exact-arithmetic prediction (tests/exact_oracle.py): no
certified sample may differ from it.  A refusal is always allowed."""

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import helper

from certlib.errors import UnsupportedModelError
from exact_oracle import exact_argmax
from onnx_builders import make_model
from test_sound_holes import certify_model

f32 = np.float32

op_st = st.tuples(st.sampled_from(["Mul", "Div", "Add", "Sub", "BN", "cancel"]),
                  st.integers(-60, 60), st.floats(1.0, 2.0, width=32), st.booleans())


def chain_model(first, ops, head_ops, x0):
    """Gemm(first) -> ops -> Gemm head -> head_ops; a "cancel" op subtracts
    the float32 rounding of the running value at the sample x0."""
    W1, b1 = first
    nodes = [helper.make_node("Flatten", ["x"], ["t0"], name="flat"),
             helper.make_node("Gemm", ["t0", "W1", "b1"], ["t1"], name="fc1", transB=1)]
    inits = {"W1": W1, "b1": b1, "W2": [[1.0, -1.0], [0.5, 0.25]], "b2": [0.0, 2.0 ** -40]}
    cur, v = "t1", np.asarray(W1, dtype=np.float64) @ np.asarray(x0, dtype=np.float64) + np.asarray(b1)
    for k, (kind, e, m, neg) in enumerate(ops):
        c = float(f32(m * 2.0 ** e * (-1 if neg else 1)))
        out, name = f"a{k}", f"op{k}"
        if kind == "BN":
            g, beta, mean = c, float(f32(v[0] * c)), float(f32(v[0]))  # beta ~ mean * gamma: cancellation
            nodes.append(helper.make_node("BatchNormalization", [cur, f"g{k}", f"be{k}", f"mu{k}", f"va{k}"],
                                          [out], name=name, epsilon=0.0))
            inits.update({f"g{k}": [g, g], f"be{k}": [beta, beta], f"mu{k}": [mean, mean], f"va{k}": [1.0, 1.0]})
            v = g * (v - mean) + beta
        else:
            op = "Sub" if kind == "cancel" else kind
            c = [float(f32(t)) for t in v] if kind == "cancel" else [c, c]
            nodes.append(helper.make_node(op, [cur, f"c{k}"], [out], name=name))
            inits[f"c{k}"] = c
            v = {"Mul": v * c, "Div": v / c, "Add": v + c, "Sub": v - c}[op]
        cur = out
    nodes.append(helper.make_node("Gemm", [cur, "W2", "b2"], ["z0"], name="head", transB=1))
    cur = "z0"
    for k, (kind, e, m, neg) in enumerate(head_ops):
        c = float(f32(m * 2.0 ** e * (-1 if neg else 1)))
        nodes.append(helper.make_node(kind, [cur, f"h{k}"], [f"z{k + 1}"], name=f"hop{k}"))
        inits[f"h{k}"] = [c, c * 1.5]
        cur = f"z{k + 1}"
    nodes[-1].output[0] = "y"
    return make_model(nodes, inits, (2,), 2, opset=15)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(W1=st.lists(st.floats(-4, 4, width=32), min_size=4, max_size=4),
       b1=st.lists(st.floats(-4, 4, width=32), min_size=2, max_size=2),
       ops=st.lists(op_st, min_size=1, max_size=4),
       head_ops=st.lists(st.tuples(st.sampled_from(["Mul", "Add"]), st.integers(-30, 30),
                                   st.floats(1.0, 2.0, width=32), st.booleans()), max_size=2),
       xs=st.lists(st.floats(0, 1, width=32), min_size=4, max_size=4),
       eps=st.sampled_from([0.0, 1e-30, 1e-12, 1e-3]),
       lossy=st.one_of(st.just(0), st.integers(20, 70)))
def test_affine_chains_never_certify_a_wrong_class(W1, b1, ops, head_ops, xs, eps, lossy):
    x = np.array(xs, dtype=np.float32).reshape(2, 2)
    if lossy:  # the first layer loses the 2^-lossy of sample 0 in float64: x1 + x2 - 1 at [1, 2^-lossy]
        W1, b1 = [1.0, 1.0] + list(W1[2:]), [-1.0] + list(b1[1:])
        x[0] = [1.0, 2.0 ** -lossy]
    m = chain_model((np.reshape(W1, (2, 2)).tolist(), b1), ops, head_ops, x[0])
    try:
        cert, pred = certify_model(m, x, eps)
    except UnsupportedModelError:
        return
    for i in np.flatnonzero(cert):
        assert exact_argmax(m, x[i]) == pred[i], f"sample {i} certified as {pred[i]}, exact class differs"
