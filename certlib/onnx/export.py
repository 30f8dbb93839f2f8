"""LiResNet -> "vanilla" ONNX, built directly with ``onnx.helper``.

The graph uses plain ops only, so any ONNX consumer (onnxruntime, the certlib
importer, other verifiers) reads it without custom handlers:

``Sub(0.5) -> Conv (stem) -> MinMax -> [Conv (FUSED residual kernel) -> MinMax]*L
-> Conv (neck) -> MinMax -> Flatten -> Gemm (dense) -> MinMax -> Gemm (head)``

MinMax is ``Split(axis=1, 2 halves) -> Max, Min -> Concat(axis=1)``.  The head
Gemm holds the row-NORMALISED weight as a constant, so the exported numbers
are exactly what the torch model computes with (float32).  Names follow
:meth:`certlib.models.LiResNet.stage_shapes`: nodes ``stem.conv``,
``block3.conv``, ``neck.conv``, ``neck.dense``, ``head``, MinMax nodes
``stem.minmax.split`` / ``.max`` / ``.min`` / ``.concat``; initializers
``<node>.weight`` / ``<node>.bias``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from certlib.models.liresnet import LiResNet

__all__ = ["export_onnx", "build_onnx", "MIN_OPSET"]

#: Lowest supported opset (Split with a split-sizes input, Gemm/Conv/Flatten as used).
MIN_OPSET = 13


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


class _GraphBuilder:
    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name=name))
        return name

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, out: str | None = None,
             **attrs) -> list[str]:
        outputs = [out or name] if n_out == 1 else [f"{name}:{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs

    def conv(self, x: str, name: str, weight: torch.Tensor, bias: torch.Tensor, stride, padding) -> str:
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        w = self.init(f"{name}.weight", _array(weight))
        b = self.init(f"{name}.bias", _array(bias))
        return self.node(
            "Conv", [x, w, b], name,
            kernel_shape=list(weight.shape[-2:]), strides=[sh, sw], pads=[ph, pw, ph, pw],
            dilations=[1, 1], group=1,
        )[0]

    def gemm(self, x: str, name: str, weight: torch.Tensor, bias: torch.Tensor, out: str | None = None) -> str:
        w = self.init(f"{name}.weight", _array(weight))
        b = self.init(f"{name}.bias", _array(bias))
        return self.node("Gemm", [x, w, b], name, out=out, alpha=1.0, beta=1.0, transA=0, transB=1)[0]

    def minmax(self, x: str, prefix: str, channels: int) -> str:
        half = channels // 2
        if self.opset >= 18:
            a, b = self.node("Split", [x], f"{prefix}.split", n_out=2, axis=1, num_outputs=2)
        else:
            sizes = self.init(f"{prefix}.split.sizes", np.array([half, half], dtype=np.int64))
            a, b = self.node("Split", [x, sizes], f"{prefix}.split", n_out=2, axis=1)
        hi = self.node("Max", [a, b], f"{prefix}.max")[0]
        lo = self.node("Min", [a, b], f"{prefix}.min")[0]
        return self.node("Concat", [hi, lo], f"{prefix}.concat", axis=1)[0]


def build_onnx(model: LiResNet, opset: int = 18) -> onnx.ModelProto:
    """The ONNX ModelProto of ``model`` (float32, dynamic batch ``N``), checked
    with ``onnx.checker``; nothing is written to disk."""
    if not isinstance(model, LiResNet):
        raise TypeError(f"export_onnx expects a certlib LiResNet, got {type(model).__name__}")
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise ValueError(f"opset must be in [{MIN_OPSET}, {max_opset}], got {opset}")
    cfg = model.config
    g = _GraphBuilder(opset)
    with torch.no_grad():
        shift = g.init("input.shift", np.array(0.5, dtype=np.float32))
        x = g.node("Sub", ["input", shift], "input.sub")[0]

        st = model.stem
        x = g.conv(x, "stem.conv", st.weight, st.bias, st.stride, st.padding)
        x = g.minmax(x, "stem.minmax", cfg.width)

        for i, block in enumerate(model.blocks):
            x = g.conv(x, f"block{i}.conv", block.fused_kernel(), block.bias, 1, block.padding)
            x = g.minmax(x, f"block{i}.minmax", cfg.width)

        nc = model.neck_conv
        x = g.conv(x, "neck.conv", nc.weight, nc.bias, nc.stride, nc.padding)
        x = g.minmax(x, "neck.minmax", 2 * cfg.width)
        x = g.node("Flatten", [x], "neck.flatten", axis=1)[0]
        x = g.gemm(x, "neck.dense", model.neck_dense.weight, model.neck_dense.bias)
        x = g.minmax(x, "neck.dense.minmax", cfg.dense_dim)

        g.gemm(x, "head", model.head.normalized_weight(), model.head.bias, out="logits")

    inp = helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["N", cfg.in_channels, cfg.input_size, cfg.input_size]
    )
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", cfg.num_classes])
    graph = helper.make_graph(g.nodes, f"liresnet_{cfg.name}", [inp], [out], initializer=g.inits)
    ir_version = helper.OP_SET_ID_VERSION_MAP[("ai.onnx", opset)]
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=ir_version,
        producer_name="certlib",
        doc_string="LiResNet exported by certlib.onnx.export (plain ops, fused residual kernels, "
        "normalised LLN head). Input in [0,1].",
    )
    helper.set_model_props(proto, {
        "certlib.architecture": "liresnet",
        "certlib.config": json.dumps(cfg.to_dict(), sort_keys=True),
    })
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model: LiResNet, path: str | os.PathLike | None, opset: int = 18) -> onnx.ModelProto:
    """Export ``model`` to ONNX at ``path`` (skipped when ``path`` is None) and
    return the ModelProto.

    Input ``"input"``: float32 ``["N", C, H, W]`` in [0,1]; output
    ``"logits"``: float32 ``["N", classes]``.  Weights are stored as float32
    initializers; backbone blocks as ONE Conv with the fused kernel
    ``I_centre + depth**-0.5 * W * scale``; the head with its normalised rows.
    ``opset >= 18`` uses Split's ``num_outputs`` attribute, 13..17 a
    split-sizes input.  The graph passes ``onnx.checker.check_model``.
    """
    proto = build_onnx(model, opset)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto
