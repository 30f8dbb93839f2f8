"""Small ONNX models built with onnx.helper for import tests."""

import numpy as np
import torch
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inits, in_shape, out_dim, opset=18, in_name="x", out_name="y", dynamic=False):
    dims = ["N"] + (["H"] * (len(in_shape)) if dynamic else list(in_shape))
    inp = helper.make_tensor_value_info(in_name, TensorProto.FLOAT, dims)
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", out_dim])
    g = helper.make_graph(nodes, "g", [inp], [out],
                          [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def plain_net(seed=0, dynamic=False):
    """Sub/Div normalisation, strided padded conv, BN, ReLU, flatten, Gemm, MatMul."""
    rng = np.random.default_rng(seed)
    inits = {
        "mean": np.array([0.5, 0.4], dtype=np.float32).reshape(1, 2, 1, 1),
        "std": np.array([0.25, 0.5], dtype=np.float32).reshape(1, 2, 1, 1),
        "w": rng.normal(size=(4, 2, 3, 3)), "b": rng.normal(size=4),
        "g": rng.uniform(0.5, 2, 4), "beta": rng.normal(size=4), "mu": rng.normal(size=4),
        "var": rng.uniform(0.5, 2, 4),
        "W1": rng.normal(size=(8, 36)) / 6, "c1": rng.normal(size=8),
        "W2": rng.normal(size=(8, 3)),
    }
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["a"], name="norm.sub"),
        helper.make_node("Div", ["a", "std"], ["b0"], name="norm.div"),
        helper.make_node("Conv", ["b0", "w", "b"], ["c"], name="conv", pads=[1, 0, 1, 2], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mu", "var"], ["d"], name="bn"),
        helper.make_node("Relu", ["d"], ["e"], name="relu"),
        helper.make_node("Flatten", ["e"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W1", "c1"], ["h"], name="fc1", transB=1, alpha=0.5),
        helper.make_node("Relu", ["h"], ["i"], name="relu2"),
        helper.make_node("MatMul", ["i", "W2"], ["y"], name="fc2"),
    ]
    return make_model(nodes, inits, (2, 6, 6), 3, dynamic=dynamic)


def unsupported_net():
    """Three nodes certlib cannot bound: Erf, Sin and a custom-domain op."""
    rng = np.random.default_rng(0)
    inits = {"W": rng.normal(size=(3, 16))}
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flat"),
        helper.make_node("Erf", ["f"], ["g"], name="bad_erf"),
        helper.make_node("Sin", ["g"], ["h"], name="bad_sin"),
        helper.make_node("Gemm", ["h", "W"], ["y"], name="head", transB=1),
    ]
    return make_model(nodes, inits, (1, 4, 4), 3)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial random weights (scales != 1, biases != 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model
