"""The op registry: the walk context, the handler and pattern tables, and the
attribute readers every handler shares.

A handler reads one ONNX node on the main chain, checks its attributes and
constant inputs, and appends the matching IR node (:mod:`certlib.ir.graph`) to
the context, or raises :class:`Skip` with the reason it cannot be bounded.
Handlers live one module per op family beside this one (``core``, ``shape``,
``nonlinear``) and register themselves with :func:`handler`; multi-node forms
(MinMax / GroupSort) live in ``patterns`` and register into :data:`PATTERNS`.
Importing :mod:`certlib.onnx.ops` loads every family.  Nothing here imports a
handler module or the walker (:mod:`certlib.onnx.walk`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from certlib.errors import Unsupported


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
    #: constant name -> elementwise absolute error bound of its stored value
    #: (computed inside the graph; certlib.onnx.const_eval)
    const_err: dict = field(default_factory=dict)
    #: constant name -> why its folding error cannot be bounded
    unbounded: dict = field(default_factory=dict)

    def const(self, name: str):
        return self.consts.get(name)

    def fail(self, node, why: str) -> None:
        self.problems.append(Unsupported(node.name, node.op_type, self.opset, why))


class Skip(Exception):
    """Raised by a handler to report an unsupported node (message = why)."""


Handler = Callable[[onnx.NodeProto, Ctx], None]
HANDLERS: dict[str, Handler] = {}
#: pattern finders: f(nodes, ctx) -> {start index: (consumed indices, emit)}; filled
#: by :mod:`certlib.onnx.ops.patterns` on import
PATTERNS: list = []
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
    for i in node.input:
        if i in ctx.unbounded:
            raise Skip(ctx.unbounded[i])
        if i in ctx.const_err and node.op_type not in CHARGES_CONST_ERR:
            raise Skip(f"constant {i!r} is computed inside the graph (error up to "
                       f"{float(np.max(ctx.const_err[i])):.3g}) and {node.op_type} cannot charge its error")
    return [ctx.consts[i] if i in ctx.consts else None for i in node.input]


#: handlers that charge the error of a constant computed inside the graph
#: (Ctx.const_err; proofs/normalisation.md, "Constants computed in the graph")
CHARGES_CONST_ERR = ("Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div")


def const_err(ctx: Ctx, node, k: int):
    """The absolute error bound of node's k-th (constant) input: 0 when stored exactly."""
    return ctx.const_err.get(node.input[k], 0.0) if k < len(node.input) else 0.0


def rel_err(err, value: np.ndarray, node, what: str) -> float:
    """max err/|value| (an elementwise relative bound); refuse an error on a zero entry."""
    err = np.broadcast_to(np.asarray(err, dtype=np.float64), np.shape(value))
    if not np.any(err):
        return 0.0
    v = np.abs(np.asarray(value, dtype=np.float64))
    if np.any((v == 0) & (err > 0)):
        raise Skip(f"{what} is computed inside the graph with an error on an entry equal to 0")
    r = float(np.max(np.where(err > 0, err / np.where(v > 0, v, 1.0), 0.0))) * (1 + 4 * 2.0 ** -53)
    if not r < 1e-4:
        raise Skip(f"{what} is computed inside the graph with a relative error {r:.3g}")
    return r


def norm_axes(axes, rank: int, what: str = "axes") -> list:
    """THE axis normaliser: ONNX axes (negative counts from the end) of a
    tensor of ``rank`` dimensions, batch included; refuse out-of-range or
    repeated axes.  Every axis attribute of every handler and pattern goes
    through here (or :func:`sample_axis`), with the rank of the tensor it acts on."""
    out = []
    for a in axes:
        a = int(a)
        if not -rank <= a < rank:
            raise Skip(f"{what} {list(axes)} out of range for rank {rank}")
        out.append(a + rank if a < 0 else a)
    if len(set(out)) != len(out):
        raise Skip(f"{what} {list(axes)} repeat an axis")
    return out


def sample_axis(v, sample_shape: tuple, what: str = "axis") -> int:
    """The per-sample axis index (0-based) of ONNX axis ``v`` on a tensor whose
    per-sample shape is ``sample_shape``; the batch axis is refused."""
    a = norm_axes([v], len(sample_shape) + 1, what)[0]
    if a == 0:
        raise Skip(f"{what} {int(v)} is the batch axis (rank {len(sample_shape) + 1})")
    return a - 1


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


def node_maps(nodes):
    """(tensor -> index of the node producing it, tensor -> indices of the
    nodes reading it, once per occurrence: Add(z, z) reads z twice)."""
    prod = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    readers: dict = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t:
                readers.setdefault(t, []).append(i)
    return prod, readers
