"""Shared checks for per-op import tests: the IR reproduces onnxruntime and the
sound bound is >= the empirical Lipschitz constant an attack finds."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from certlib.attack import empirical_lipschitz
from certlib.ir.compose import analyze
from certlib.onnx.importer import import_model


def head_model(body_nodes, inits, in_shape, body_out, body_dim, classes=3, seed=0, opset=18, int_inits=None):
    """body_nodes map "x" to tensor ``body_out`` (per-sample size ``body_dim``
    after flattening); a Flatten + Gemm head makes the logits "y"."""
    rng = np.random.default_rng(seed)
    inits = dict(inits)
    inits["W_head"] = rng.normal(size=(classes, body_dim))
    nodes = list(body_nodes) + [
        helper.make_node("Flatten", [body_out], ["flat_out"], name="head_flatten"),
        helper.make_node("Gemm", ["flat_out", "W_head"], ["y"], name="head", transB=1),
    ]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])
    tensors = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()]
    tensors += [numpy_helper.from_array(np.asarray(v, dtype=np.int64), k) for k, v in (int_inits or {}).items()]
    g = helper.make_graph(nodes, "g", [inp], [out], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def check_model(m, n=8, seed=0, method="exact", attack_steps=60, x=None):
    """Import, compare with onnxruntime, bound, attack.  Returns (graph,
    analysis, empirical lower bound, sound upper bound of the logits)."""
    g = import_model(m)
    rng = np.random.default_rng(seed)
    if x is None:
        x = (rng.random((n, *g.input_shape)) * 2 - 1).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ours, _ = g.forward(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    a = analyze(g, method)
    assert a.sound
    upper = a.body.value * np.linalg.svd(a.head_weight, compute_uv=False)[0]
    lower = empirical_lipschitz(g, x, steps=attack_steps, seed=seed)
    assert 0 < lower <= upper, (lower, upper)
    return g, a, lower, upper
