"""ONNX op handlers: one small handler per op family, in an explicit registry.

Each handler reads one ONNX node on the main chain, checks its attributes and
constant inputs, and appends the matching IR node (certlib.graph) to the
context, or raises :class:`Skip` with the reason it cannot be bounded.
Multi-node forms (MinMax / GroupSort) are in :mod:`certlib.onnx_patterns`.
Used by :mod:`certlib.onnx_dag`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from certlib.errors import Unsupported
from certlib.graph import U64, ActivationNode, AffineNode, LinearNode, ReshapeNode
from certlib.verifiers.operators import Conv2d, Dense


@dataclass
class Ctx:
    model: onnx.ModelProto
    opset: int
    consts: dict = field(default_factory=dict)
    current: str = ""
    shape: tuple = ()
    nodes: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    consumers: dict = field(default_factory=dict)
    #: a final Softmax/LogSoftmax that was dropped (argmax unchanged)
    dropped: str = ""
    #: the batch size the model is imported at (0: any); a Reshape target
    #: whose first entry equals it keeps every sample apart (row-major)
    batch: int = 0

    def const(self, name: str):
        return self.consts.get(name)

    def fail(self, node, why: str) -> None:
        self.problems.append(Unsupported(node.name, node.op_type, self.opset, why))


class Skip(Exception):
    """Raised by a handler to report an unsupported node (message = why)."""


Handler = Callable[[onnx.NodeProto, Ctx], None]
HANDLERS: dict[str, Handler] = {}
#: op -> (first model opset, newest schema version) the handler covers
OPSETS: dict[str, tuple[int, int]] = {}
#: the opset the handlers were written against: an op whose schema changed
#: after it (onnx.defs) is refused until a handler is checked against the change
HANDLED_OPSET = 22


def handler(*ops: str, first_opset: int = 7):
    """Register a handler for ``ops`` for model opsets >= ``first_opset`` and
    every schema version up to the one in force at HANDLED_OPSET."""
    def deco(fn: Handler) -> Handler:
        for op in ops:
            HANDLERS[op] = fn
            OPSETS[op] = (first_opset, schema_version(op, HANDLED_OPSET) or 0)
        return fn
    return deco


def schema_version(op: str, opset: int, domain: str = "") -> int | None:
    """The since_version of ``op``'s schema in force at ``opset`` (onnx.defs),
    or None when the op does not exist there."""
    try:
        return int(onnx.defs.get_schema(op, opset, domain).since_version)
    except Exception:
        return None


def same_interface(op: str, old: int, new: int) -> bool:
    """True when schema versions ``old`` and ``new`` of op have the same
    attributes (name, type, default), inputs and outputs (name, arity) and
    differ only in their allowed element types (as versions 21-25 of the
    data-movement ops do): float models then mean the same thing."""
    try:
        a, b = onnx.defs.get_schema(op, old), onnx.defs.get_schema(op, new)
    except Exception:
        return False

    def iface(sc):
        attrs = sorted((k, int(v.type), v.default_value.SerializeToString()) for k, v in sc.attributes.items())
        io = [(p.name, int(p.option)) for p in list(sc.inputs)] + [("->",)] + \
             [(p.name, int(p.option)) for p in list(sc.outputs)]
        return attrs, io, sc.min_input, sc.max_input, sc.min_output, sc.max_output

    return iface(a) == iface(b)


def check_opset(node, ctx: "Ctx") -> None:
    """Raise Skip unless the node's op exists at the model's opset and its
    handler covers the schema version in force there."""
    v = schema_version(node.op_type, ctx.opset)
    if v is None:
        raise Skip(f"{node.op_type} is not an ONNX operator at opset {ctx.opset}")
    first, newest = OPSETS.get(node.op_type, (1, v))
    if ctx.opset < first:
        raise Skip(f"handled for opsets >= {first}; the model uses opset {ctx.opset}")
    if v > newest and not same_interface(node.op_type, newest, v):
        raise Skip(f"{node.op_type} version {v} (opset {ctx.opset}) is newer than the versions certlib "
                   f"handles (<= {newest}); re-export with opset <= {HANDLED_OPSET}")


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _dynamic_input(node, ctx: Ctx, allow_const_inputs: int = 0) -> list:
    """Check that node reads the current chain tensor; return its const inputs."""
    dyn = [i for i in node.input if i and i not in ctx.consts]
    if len(dyn) != 1:
        raise Skip("reads several non-constant tensors"
                   if len(dyn) > 1 else "has no non-constant input")
    if dyn[0] != ctx.current:
        raise Skip("does not read the tensor being walked (internal error: please report)")
    return [ctx.consts[i] if i in ctx.consts else None for i in node.input]


def _emit(ctx: Ctx, node, ir_node, out_shape: tuple) -> None:
    ctx.nodes.append(ir_node)
    ctx.current = node.output[0]
    ctx.shape = tuple(int(s) for s in out_shape)


def _finite(arr: np.ndarray, node, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.floating):
        raise Skip(f"{what} has non-float dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise Skip(f"{what} contains NaN or Inf")
    return a


def attr_str(v, default: str) -> str:
    """A string attribute (onnx gives bytes), or ``default`` when absent."""
    if v is None:
        return default
    return v.decode() if isinstance(v, bytes) else str(v)


def same_split(total: int, mode: str) -> tuple[int, int]:
    """(begin, end) of a total padding under auto_pad SAME_UPPER (odd extra at
    the end) or SAME_LOWER (odd extra at the beginning)."""
    small, big = total // 2, total - total // 2
    return (small, big) if mode == "SAME_UPPER" else (big, small)


def conv_weight(node, ctx: Ctx, weight, what: str = "convolutions") -> np.ndarray:
    """The finite 4-D kernel of a 2-D (transposed) convolution on a (C, H, W) sample."""
    if len(ctx.shape) != 3:
        raise Skip(f"only 2-D {what} are supported (input shape {ctx.shape})")
    w = _finite(weight, node, "weight")
    if w.ndim != 4:
        raise Skip(f"only 2-D {what} are supported")
    return w


# ---------------------------------------------------------------- handlers
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
    _emit(ctx, node, LinearNode(node.name, "Conv", ctx.shape, op.output_shape, op=op, bias=bias),
          op.output_shape)


def _dense(node, ctx: Ctx, weight: np.ndarray, bias) -> None:
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
        bias = np.broadcast_to(bias.reshape(-1), (weight.shape[0],)).astype(np.float64)
    op = Dense(weight)
    _emit(ctx, node, LinearNode(node.name, node.op_type, ctx.shape, op.output_shape, op=op, bias=bias),
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
    w = (b if a.get("transB", 0) else b.T) * float(a.get("alpha", 1.0))
    bias = None
    if len(c) > 2 and c[2] is not None:
        bias = _finite(c[2], node, "C") * float(a.get("beta", 1.0))
    _dense(node, ctx, w, bias)


@handler("MatMul")
def _matmul(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    if c[0] is not None or c[1] is None or np.ndim(c[1]) != 2:
        raise Skip("only x @ W with a constant 2-D W is supported")
    _dense(node, ctx, _finite(c[1], node, "W").T, None)


def _per_sample(const: np.ndarray, shape: tuple, node) -> np.ndarray:
    c = np.asarray(const, dtype=np.float64)
    full = (1, *shape)
    try:
        np.broadcast_shapes(c.shape, full)
    except ValueError:
        raise Skip(f"constant of shape {c.shape} does not broadcast to {full}") from None
    if np.broadcast_shapes(c.shape, full) != full:
        raise Skip(f"constant of shape {c.shape} would change the shape {full}")
    while c.ndim > len(shape):
        c = c[0]
    return c


@handler("Add", "Sub", "Mul", "Div")
def _arith(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    op = node.op_type
    k = _per_sample(_finite(c[0] if c[0] is not None else c[1], node, "constant"), ctx.shape, node)
    const_first = c[0] is not None
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
    # Div stores fl(1/k): relative error <= u (the other ops copy constants exactly)
    err = U64 if op == "Div" else 0.0
    _emit(ctx, node, AffineNode(node.name, op, ctx.shape, ctx.shape, scale=scale, shift=shift,
                                const_err=err), ctx.shape)


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
    eps = float(_attrs(node).get("epsilon", 1e-5))
    if np.any(var + eps <= 0):
        raise Skip("non-positive variance + epsilon")
    s = gamma_ / np.sqrt(var + eps)
    shape = (-1,) + (1,) * (len(ctx.shape) - 1)
    scale, shift = s.reshape(shape), (beta - mean * s).reshape(shape)
    # s = fl(gamma / fl(sqrt(fl(var + eps)))): <= 3 roundings, relative error < 3.01u;
    # shift = fl(beta - fl(mean * s)): error <= (|beta| + |mean s|) (2u + 3.01u);
    # 8u covers both relative to the magnitudes the forward recursion charges
    _emit(ctx, node, AffineNode(node.name, "BatchNormalization", ctx.shape, ctx.shape,
                                scale=scale, shift=shift, const_err=8 * U64), ctx.shape)


@handler("Relu")
def _relu(node, ctx: Ctx) -> None:
    _dynamic_input(node, ctx)
    _emit(ctx, node, ActivationNode(node.name, "Relu", ctx.shape, ctx.shape, activation="relu"), ctx.shape)


@handler("Flatten")
def _flatten(node, ctx: Ctx) -> None:
    _dynamic_input(node, ctx)
    if int(_attrs(node).get("axis", 1)) != 1:
        raise Skip("Flatten with axis != 1 mixes the batch dimension")
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
    _dynamic_input(node, ctx)
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
