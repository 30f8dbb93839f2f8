"""The IR executed in a floating-point format (float32, bfloat16, float16):
the falsifier for certificates issued under that semantics
(``certlib attack --semantics``; proofs/float_semantics.md).

Every constant is converted to the format once (round to nearest), every node
computes in the format with torch (CPU: oneDNN / ATen kernels, which
accumulate 16-bit dot products in float32), under :func:`ieee_float32`
(no TF32, no NNPACK Winograd/FFT, no cuDNN).  This is ONE executor within
the error model; a certificate covers every executor the model allows."""

from __future__ import annotations

import numpy as np
import torch

from certlib.errors import UnsupportedModelError
from certlib.ir.evaluate import ACTIVATIONS
from certlib.ir.fast import ieee_float32
from certlib.ir.graph import ActivationNode, AffineNode, Graph, IndexNode, LinearNode, ReshapeNode, apply_conv
from certlib.verifiers.operators import Dense

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _c(v, dtype):
    return torch.as_tensor(np.asarray(v, dtype=np.float64)).to(dtype)


def _linear(node: LinearNode, h, dtype):
    op = node.op
    b = None if node.bias is None else _c(node.bias, dtype)
    if isinstance(op, Dense):
        y = h @ _c(op.weight, dtype).T
        return y if b is None else y + b
    return apply_conv(op, node.transposed, h, _c(op.kernel, dtype), b)


def execute(g: Graph, x, precision: str) -> np.ndarray:
    """Logits of ``g`` run in ``precision`` (returned as float64; inf/nan kept)."""
    dtype = DTYPES[precision]
    with torch.no_grad(), ieee_float32():
        h = torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dtype)
        for node in g.nodes:
            if isinstance(node, LinearNode):
                h = _linear(node, h, dtype)
            elif isinstance(node, AffineNode):
                h = h * _c(node.scale, dtype) + _c(node.shift, dtype)
            elif isinstance(node, (ReshapeNode, IndexNode)):
                h = node.apply(h, False)[0]
            elif isinstance(node, ActivationNode) and node.activation in ("leaky_relu", "prelu"):
                s = node.params["alpha"] if node.activation == "leaky_relu" else node.params["slope"]
                h = torch.where(h >= 0, h, h * _c(s, dtype))
            elif isinstance(node, ActivationNode):
                h = ACTIVATIONS[node.activation][0](h, node.params).to(dtype)
            else:
                raise UnsupportedModelError(f"{node.name} ({node.onnx_op}): no {precision} executor for this node")
            if h.dtype != dtype:
                raise UnsupportedModelError(f"{node.name} ({node.onnx_op}): did not run in {precision}")
        return h.double().numpy()


__all__ = ["execute", "DTYPES"]
