"""Core op handlers: the linear and affine families (Conv, Gemm, MatMul,
constant arithmetic, BatchNormalization), Relu, and the trivial reshapes
(Flatten, Reshape, Identity, Dropout, Constant).  Registered into
:data:`certlib.onnx.ops.registry.HANDLERS` on import.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from certlib.ir.graph import U64, ActivationNode, AffineNode, LinearNode, ReshapeNode, compose_rel
from certlib.onnx.ops.registry import (Ctx, Skip, _attrs, _dynamic_input, _emit, _finite, _per_sample, attr_str,
                                       const_err, conv_weight, handler, rel_err, same_split)
from certlib.verifiers.operators import Conv2d, Dense


@handler("Conv")
def _conv(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    w = conv_weight(node, ctx, c[1])
    a = _attrs(node)
    kh, kw = w.shape[2:]
    strides = tuple(a.get("strides", (1, 1)))
    dil = tuple(a.get("dilations", (1, 1)))
    group = int(a.get("group", 1))
    auto_pad = attr_str(a.get("auto_pad"), "NOTSET")
    _, h, wd = ctx.shape
    if auto_pad in ("NOTSET", "VALID"):
        pads = tuple(a.get("pads", (0, 0, 0, 0))) if auto_pad == "NOTSET" else (0, 0, 0, 0)
        if len(pads) != 4:
            raise Skip(f"pads {list(pads)} must have 4 entries for a 2-D convolution")
        pads = (pads[0], pads[1], pads[2], pads[3])
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for ax, (n, k, s, d) in enumerate(((h, kh, strides[0], dil[0]), (wd, kw, strides[1], dil[1]))):
            out = -(-n // s)
            total = max(0, (out - 1) * s + d * (k - 1) + 1 - n)
            pads[ax], pads[ax + 2] = same_split(total, auto_pad)
        pads = tuple(pads)
    else:
        raise Skip(f"auto_pad={auto_pad} not supported")
    try:
        op = Conv2d(w, ctx.shape, stride=strides, padding=pads, dilation=dil, groups=group)
    except ValueError as e:
        raise Skip(str(e)) from None
    bias = _finite(c[2], node, "bias") if len(c) > 2 and c[2] is not None else None
    berr = np.broadcast_to(const_err(ctx, node, 2), bias.shape).copy() if bias is not None else 0.0
    _emit(ctx, node, LinearNode(node.name, "Conv", ctx.shape, op.output_shape, op=op, bias=bias,
                                weight_rel_err=rel_err(const_err(ctx, node, 1), w, node, "weight"),
                                bias_abs_err=berr), op.output_shape)


def _dense(node, ctx: Ctx, weight: np.ndarray, bias, wrel: float = 0.0, berr=0.0) -> None:
    if len(ctx.shape) != 1:
        raise Skip(f"dense layer on a non-flat tensor of shape {ctx.shape} (flatten first)")
    if weight.ndim != 2 or 0 in weight.shape:
        raise Skip(f"weight of shape {weight.shape} is not a non-empty matrix")
    if weight.shape[1] != ctx.shape[0]:
        raise Skip(f"weight {weight.shape} does not match input size {ctx.shape[0]}")
    if bias is not None:
        if bias.size not in (1, weight.shape[0]) or (bias.ndim > 1 and bias.size != 1
                                                    and max(bias.shape) != bias.size):
            raise Skip(f"bias of shape {bias.shape} does not broadcast to {weight.shape[0]} outputs")
        berr = np.broadcast_to(np.asarray(berr, dtype=np.float64).reshape(-1), (weight.shape[0],)).copy() \
            if np.any(berr) else 0.0
        bias = np.broadcast_to(bias.reshape(-1), (weight.shape[0],)).astype(np.float64)
    op = Dense(weight)
    _emit(ctx, node, LinearNode(node.name, node.op_type, ctx.shape, op.output_shape, op=op, bias=bias,
                                weight_rel_err=wrel, bias_abs_err=berr if bias is not None else 0.0),
          op.output_shape)


@handler("Gemm")
def _gemm(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    if c[0] is not None:
        raise Skip("constant A with a dynamic B is not supported")
    a = _attrs(node)
    if a.get("transA", 0):
        raise Skip("transA=1 on the data input is not supported")
    b = _finite(c[1], node, "B")
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    w = (b if a.get("transB", 0) else b.T) * alpha
    # a stored float32 B times a float32 alpha is exact in float64; a computed B
    # (const_eval, float64) rounds once more
    wrel = rel_err(const_err(ctx, node, 1), b, node, "B")
    if wrel and alpha != 1.0:
        wrel = compose_rel(wrel, U64)
    bias, berr = None, 0.0
    if len(c) > 2 and c[2] is not None:
        cc = _finite(c[2], node, "C")
        bias = cc * beta
        e = np.asarray(const_err(ctx, node, 2), dtype=np.float64)
        if np.any(e):
            berr = (e * abs(beta) + (U64 * np.abs(bias) if beta != 1.0 else 0.0)) * (1 + 4 * U64)
    _dense(node, ctx, w, bias, wrel, berr)


@handler("MatMul")
def _matmul(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    if c[0] is not None or c[1] is None or np.ndim(c[1]) != 2:
        raise Skip("only x @ W with a constant 2-D W is supported")
    w = _finite(c[1], node, "W")
    _dense(node, ctx, w.T, None, rel_err(const_err(ctx, node, 1), w, node, "W"))


@handler("Add", "Sub", "Mul", "Div")
def _arith(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    op = node.op_type
    const_first = c[0] is not None
    kc = _finite(c[0] if const_first else c[1], node, "constant")
    k = _per_sample(kc, ctx.shape, node)
    kerr = _per_sample(np.broadcast_to(const_err(ctx, node, 0 if const_first else 1), kc.shape), ctx.shape, node)
    one, zero = np.ones_like(k), np.zeros_like(k)
    if op == "Add":
        scale, shift = one, k
    elif op == "Sub":
        scale, shift = (-one, k) if const_first else (one, -k)
    elif op == "Mul":
        scale, shift = k, zero
    else:
        if const_first:
            raise Skip("constant / x is not Lipschitz")
        if np.any(k == 0):
            raise Skip("division by zero")
        scale, shift = 1.0 / k, zero
    scale = np.broadcast_to(scale, np.broadcast_shapes(scale.shape, shift.shape))
    # Div stores fl(1/k): relative error <= u (the other ops copy constants exactly).
    # A constant computed in the graph (error kerr): an additive one is charged
    # absolutely (shift_abs_err), a scale relatively: r for Mul, r/(1-r) then one
    # rounding for 1/k (proofs/normalisation.md, "Constants computed in the graph")
    err, shift_err = (U64 if op == "Div" else 0.0), 0.0
    if np.any(kerr):
        if op in ("Add", "Sub"):
            shift_err = np.broadcast_to(kerr, np.broadcast_shapes(kerr.shape, shift.shape)).copy()
        else:
            r = rel_err(kerr, k, node, "constant")
            err = r if op == "Mul" else compose_rel(U64, r / (1 - r) * (1 + 4 * U64))
    _emit(ctx, node, AffineNode(node.name, op, ctx.shape, ctx.shape, scale=scale, shift=shift,
                                const_err=err, shift_abs_err=shift_err), ctx.shape)


@handler("Neg")
def _neg(node, ctx: Ctx) -> None:
    _dynamic_input(node, ctx)
    _emit(ctx, node, AffineNode(node.name, "Neg", ctx.shape, ctx.shape, scale=np.array(-1.0),
                                shift=np.array(0.0)), ctx.shape)


@handler("BatchNormalization")
def _bn(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    if len(node.output) > 1 and any(node.output[1:]):
        raise Skip("training-mode BatchNormalization is not supported")
    if any(x is None for x in c[1:5]):
        raise Skip("BatchNormalization needs constant scale, bias, mean and variance")
    gamma_, beta, mean, var = (_finite(x, node, n) for x, n in zip(c[1:5], ("scale", "B", "mean", "var")))
    channels = ctx.shape[0] if ctx.shape else 0
    for arr, nm in ((gamma_, "scale"), (beta, "B"), (mean, "mean"), (var, "var")):
        if arr.shape != (channels,):
            raise Skip(f"{nm} has shape {arr.shape}, expected ({channels},) for input shape {ctx.shape}")
    eps = float(_attrs(node).get("epsilon", np.float32(1e-5)))  # a float32 attribute (spec default)
    if np.any(var + eps <= 0):
        raise Skip("non-positive variance + epsilon")
    s = gamma_ / np.sqrt(var + eps)
    shape = (-1,) + (1,) * (len(ctx.shape) - 1)
    scale, shift = s.reshape(shape), (beta - mean * s).reshape(shape)
    # s = fl(gamma / fl(sqrt(fl(var + eps)))): <= 3 roundings, relative error < 3.01u
    # (charged as const_err = 8u).  shift = fl(beta - fl(mean * s)) is off the exact
    # beta - mean*s_exact by <= u|beta - m| + u|mean s| + |mean s| 3.01u/(1 - 3.01u)
    # <= 6u (|beta| + |mean s|): charged ABSOLUTELY (under cancellation |shift|
    # is far below it; proofs/normalisation.md, "BatchNormalization")
    shift_err = (np.abs(beta) + np.abs(mean * s)) * (8 * U64 * (1 + 4 * U64))
    _emit(ctx, node, AffineNode(node.name, "BatchNormalization", ctx.shape, ctx.shape,
                                scale=scale, shift=shift, const_err=8 * U64,
                                shift_abs_err=shift_err.reshape(shape)), ctx.shape)


@handler("Relu")
def _relu(node, ctx: Ctx) -> None:
    _dynamic_input(node, ctx)
    _emit(ctx, node, ActivationNode(node.name, "Relu", ctx.shape, ctx.shape, activation="relu"), ctx.shape)


@handler("Flatten")
def _flatten(node, ctx: Ctx) -> None:
    _dynamic_input(node, ctx)
    rank = len(ctx.shape) + 1
    ax = int(_attrs(node).get("axis", 1))  # Flatten's axis ranges over [-rank, rank]
    if (ax + rank if -rank <= ax < 0 else ax) != 1:
        raise Skip(f"Flatten with axis {ax} on rank {rank} does not keep the batch axis alone")
    out = (int(np.prod(ctx.shape)),)
    _emit(ctx, node, ReshapeNode(node.name, "Flatten", ctx.shape, out), out)


@handler("Reshape")
def _reshape(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    if c[1] is None:
        raise Skip("Reshape with a non-constant shape")
    target = [int(v) for v in np.asarray(c[1]).reshape(-1)]
    if not target:
        raise Skip("Reshape to a scalar")
    full = [-2] + list(ctx.shape)  # -2 marks the unknown batch
    allowzero = int(_attrs(node).get("allowzero", 0))
    out = []
    for i, t in enumerate(target):
        if t == 0 and not allowzero:
            if i >= len(full):
                raise Skip("Reshape copies a dimension that does not exist")
            t = full[i]
        out.append(t)
    if ctx.batch and out[0] == ctx.batch:
        out[0] = -2  # the fixed batch size: each sample's entries stay together
    if out[0] not in (-2, -1):
        raise Skip("Reshape must keep the batch dimension first")
    rest = out[1:]
    if out[0] == -1 and -1 in rest:
        raise Skip("Reshape with two inferred dimensions")
    if -2 in rest:
        raise Skip("Reshape moves the batch dimension")
    total = int(np.prod(ctx.shape))
    if -1 in rest:
        known = int(np.prod([r for r in rest if r != -1]))
        if known == 0 or total % known:
            raise Skip(f"cannot reshape {ctx.shape} to {target}")
        rest = [total // known if r == -1 else r for r in rest]
    if int(np.prod(rest)) != total:
        raise Skip(f"Reshape to {target} mixes samples of the batch")
    _emit(ctx, node, ReshapeNode(node.name, "Reshape", ctx.shape, tuple(rest)), tuple(rest))


@handler("Identity", "Dropout")
def _identity(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    if node.op_type == "Dropout" and int(_attrs(node).get("is_test", 1)) == 0:
        raise Skip("Dropout with is_test=0 drops entries at random")
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = c[2] if len(c) > 2 else None
        if mode is None:
            raise Skip("Dropout with a non-constant training_mode")
        if np.any(np.asarray(mode)):
            raise Skip("Dropout with training_mode=1 drops entries at random (not the identity)")
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        if ctx.consumers.get(node.output[1]):
            raise Skip("Dropout mask output is used")
    ctx.current = node.output[0]


@handler("Constant")
def _constant(node, ctx: Ctx) -> None:
    a = _attrs(node)
    if "value" not in a:
        raise Skip("only Constant(value=tensor) is supported")
    ctx.consts[node.output[0]] = numpy_helper.to_array(a["value"])
