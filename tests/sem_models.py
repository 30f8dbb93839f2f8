"""Small models for the floating-point semantics tests (proofs/float_semantics.md)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def cancel_model(big: float = 1024.0) -> nn.Module:
    """x -> x + big -> (.) - big -> logits (0.1 - x, x): exactly f1 - f0 = 2x - 0.1, body Lipschitz 1.
    Executed in a format whose spacing at ``big`` exceeds 2|x|, x + big rounds to big and class 0 wins."""
    up, down, head = nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 2)
    with torch.no_grad():
        up.weight.fill_(1.0)
        up.bias.fill_(big)
        down.weight.fill_(1.0)
        down.bias.fill_(-big)
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.copy_(torch.tensor([0.1, 0.0]))
    return nn.Sequential(nn.Flatten(), up, down, head).eval()


def export(model: nn.Module, path, shape=(1, 1, 1)) -> None:
    torch.onnx.export(model, (torch.zeros(2, *shape),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)


def cancel_data(n: int = 4):
    x = np.full((n, 1, 1, 1), 0.3, dtype=np.float32)
    x[1:] = np.linspace(0.25, 0.45, n - 1, dtype=np.float32).reshape(-1, 1, 1, 1)
    return x, np.ones(n, dtype=np.int64)


def cancel_onnx(path, big: float = 1024.0) -> None:
    """The same model written node by node (Flatten, three Gemm), named, every weight an initializer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f = np.float32
    inits = [numpy_helper.from_array(np.array(v, dtype=f), n) for n, v in [
        ("w1", [[1.0]]), ("b1", [big]), ("w2", [[1.0]]), ("b2", [-big]), ("w3", [[-1.0], [1.0]]), ("b3", [0.1, 0.0])]]
    nodes = [helper.make_node("Flatten", ["x"], ["h0"], name="flat"),
             helper.make_node("Gemm", ["h0", "w1", "b1"], ["h1"], name="up", transB=1),
             helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2"], name="down", transB=1),
             helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], name="head", transB=1)]
    g = helper.make_graph(nodes, "cancel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
