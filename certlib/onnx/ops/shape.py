"""ONNX handlers for linear maps other than Conv/Gemm and for shape and index
operations (registered into :data:`certlib.onnx.ops.registry.HANDLERS` on import), and
finders for multi-node MinMax forms (in :mod:`certlib.onnx.ops.patterns`,
registered into :data:`certlib.onnx.ops.registry.PATTERNS`).

Lipschitz rules (proofs/index_ops.md): Transpose, Pad (constant zero), Slice,
SpaceToDepth and DepthToSpace move, drop or zero-pad entries, so they are
1-Lipschitz and exact; Squeeze/Unsqueeze are reshapes (isometries);
ConvTranspose is the adjoint of a convolution, whose norm it shares.  Anything
that does not map exactly onto those IR nodes raises :class:`Skip` with the
reason (proofs/composition.md: never guess).
"""

from __future__ import annotations

import numpy as np

from certlib.ir.graph import IndexNode, LinearNode, ReshapeNode
from certlib.onnx.ops.registry import (Skip, _attrs, _dynamic_input, _emit, _finite, attr_str, conv_weight, handler,
                                       same_split, schema_version)
from certlib.onnx.ops.registry import norm_axes, sample_axis  # noqa: F401  (the one axis normaliser)
from certlib.verifiers.operators import Conv2d

#: no batch is this large: a Slice end at or beyond it keeps the whole batch axis
BIG = 2 ** 31 - 1


def _version(node, ctx) -> int:
    """The version of node's operator in force at the model's opset (the
    model's opset when onnx does not know the op)."""
    return schema_version(node.op_type, max(int(ctx.opset), 1)) or int(ctx.opset)


def _ints(v, what: str) -> list:
    a = np.asarray(v)
    if a.dtype == object or not np.issubdtype(a.dtype, np.integer):
        raise Skip(f"{what} must be integers, got dtype {a.dtype}")
    return [int(x) for x in a.reshape(-1)]


def _inputs(node, ctx, params: dict) -> list:
    """Check the data input is the chain tensor and every present parameter
    input (index -> name) is a constant; return the constant inputs."""
    for k, what in params.items():
        if len(node.input) > k and node.input[k] and node.input[k] not in ctx.consts:
            raise Skip(f"{what} (input {k}) is not a constant")
    c = _dynamic_input(node, ctx)
    if c[0] is not None:
        raise Skip("the data input is a constant")
    return c + [None] * (5 - len(c))


def _opt(node, c, k):
    """Optional constant input k, or None when absent."""
    return c[k] if len(node.input) > k and node.input[k] else None


def axes_of(node, ctx, c, since: int, k: int = 1):
    """The ``axes`` of Squeeze/Unsqueeze/Reduce*/Pad: input k from opset
    ``since`` on, the attribute before; None when absent."""
    if _version(node, ctx) >= since:
        v = _opt(node, c, k)
        return None if v is None else _ints(v, "axes")
    a = _attrs(node).get("axes")
    return None if a is None else [int(x) for x in a]


# ------------------------------------------------------------ reshapes
@handler("Squeeze")
def _squeeze(node, ctx) -> None:
    c = _inputs(node, ctx, {1: "axes"})
    axes = axes_of(node, ctx, c, 13)
    if axes is None:
        raise Skip("Squeeze without axes would also squeeze a batch of size 1")
    full = (None,) + tuple(ctx.shape)
    axes = norm_axes(axes, len(full))
    if 0 in axes:
        raise Skip("Squeeze of the batch axis")
    if any(full[a] != 1 for a in axes):
        raise Skip(f"Squeeze of axes {axes} whose size is not 1 (shape {ctx.shape})")
    out = tuple(d for i, d in enumerate(ctx.shape) if i + 1 not in axes)
    _emit(ctx, node, ReshapeNode(node.name, "Squeeze", ctx.shape, out), out)


@handler("Unsqueeze")
def _unsqueeze(node, ctx) -> None:
    c = _inputs(node, ctx, {1: "axes"})
    axes = axes_of(node, ctx, c, 13)
    if not axes:
        raise Skip("Unsqueeze without axes")
    rank = len(ctx.shape) + 1 + len(axes)
    axes = norm_axes(axes, rank)
    if 0 in axes:
        raise Skip("Unsqueeze in front of the batch axis")
    dims = iter(ctx.shape)
    out = tuple(1 if i in axes else next(dims) for i in range(1, rank))
    _emit(ctx, node, ReshapeNode(node.name, "Unsqueeze", ctx.shape, out), out)


# -------------------------------------------------------- index maps
@handler("Transpose")
def _transpose(node, ctx) -> None:
    _inputs(node, ctx, {})
    r = len(ctx.shape) + 1
    perm = _attrs(node).get("perm")
    perm = list(range(r - 1, -1, -1)) if perm is None else [int(p) for p in perm]
    if sorted(perm) != list(range(r)):
        raise Skip(f"perm {perm} is not a permutation of the {r} axes")
    if perm[0] != 0:
        raise Skip(f"perm {perm} moves the batch axis")
    p = [a - 1 for a in perm[1:]]
    out = tuple(ctx.shape[a] for a in p)
    _emit(ctx, node, IndexNode(node.name, "Transpose", ctx.shape, out, fn="transpose", params={"perm": p}), out)


@handler("Pad")
def _pad(node, ctx) -> None:
    v = _version(node, ctx)
    a = _attrs(node)
    mode = attr_str(a.get("mode"), "constant")
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise Skip(f"mode={mode} is not an ONNX pad mode certlib knows")
    r = len(ctx.shape) + 1
    if v < 11:
        _inputs(node, ctx, {})
        if "pads" not in a:
            raise Skip("Pad without a pads attribute")
        pads, value, axes = [int(p) for p in a["pads"]], a.get("value", 0.0), None
    else:
        c = _inputs(node, ctx, {1: "pads", 2: "constant_value", 3: "axes"})
        if _opt(node, c, 1) is None:
            raise Skip("Pad without pads")
        pads = _ints(c[1], "pads")
        value = _opt(node, c, 2)
        value = 0.0 if value is None else value
        axes = _ints(c[3], "axes") if v >= 18 and _opt(node, c, 3) is not None else None
    val = np.asarray(value)
    if mode == "constant" and (val.size > 1 or not np.all(val == 0)):
        raise Skip(f"constant value {val.tolist()} is not 0 (only zero padding is supported)")
    axes = list(range(r)) if axes is None else norm_axes(axes, r)
    if len(pads) != 2 * len(axes):
        raise Skip(f"{len(pads)} pads for {len(axes)} axes")
    begin, end = [0] * r, [0] * r
    for k, ax in enumerate(axes):
        begin[ax], end[ax] = pads[k], pads[k + len(axes)]
    if begin[0] or end[0]:
        raise Skip("pads the batch axis")
    out = tuple(d + b + e for d, b, e in zip(ctx.shape, begin[1:], end[1:]))
    if min(out, default=1) < 1:
        raise Skip(f"pads {pads} crop shape {ctx.shape} to nothing")
    if mode != "constant":
        _copy_pad(node, ctx, mode, begin[1:], end[1:], out)
        return
    _emit(ctx, node, IndexNode(node.name, "Pad", ctx.shape, out, fn="pad",
                               params={"pads": begin[1:] + end[1:]}), out)


def _copy_pad(node, ctx, mode: str, begin: list, end: list, out: tuple) -> None:
    """edge / reflect / wrap padding: every output entry copies one input
    entry (source index per axis); an entry copied m times in all makes the map
    sqrt(m)-Lipschitz (exact: perturb that entry).  m is the product over axes
    of the largest per-axis copy count."""
    from certlib.bounds import up_sqrt

    index, m = [], 1
    for n, b, e in zip(ctx.shape, begin, end):
        if b == 0 and e == 0:
            index.append(None)
            continue
        if b < 0 or e < 0:
            raise Skip(f"negative pads with mode={mode}")
        i = np.arange(-b, n + e)
        if mode == "edge":
            src = np.clip(i, 0, n - 1)
        elif mode == "wrap":
            if b > n or e > n:
                raise Skip(f"wrap pads {b, e} longer than the axis ({n})")
            src = np.mod(i, n)
        else:  # reflect, without repeating the edge
            if b > n - 1 or e > n - 1:
                raise Skip(f"reflect pads {b, e} need an axis longer than them ({n})")
            src = np.where(i < 0, -i, np.where(i > n - 1, 2 * (n - 1) - i, i))
        index.append(src.tolist())
        m *= int(np.bincount(src).max())
    r = int(np.sqrt(m))
    lip = float(r) if r * r == m else up_sqrt(m)
    _emit(ctx, node, IndexNode(node.name, "Pad", ctx.shape, out, fn="gather", lipschitz=lip,
                               params={"index": index, "mode": mode, "begin": list(begin), "end": list(end)}),
          out)


def slice_params(node, ctx, shape: tuple) -> list:
    """The (start, stop, step) per per-sample dim that an ONNX Slice selects
    from a tensor of per-sample ``shape`` (negative indices counted from the
    end, then clamped, as the spec says); its parameter inputs must be
    constants (checked by the caller).  Refuses negative steps and any
    change to the batch axis."""
    if _version(node, ctx) < 10:
        a = _attrs(node)
        if "starts" not in a or "ends" not in a:
            raise Skip("Slice without starts/ends")
        starts, ends = [int(x) for x in a["starts"]], [int(x) for x in a["ends"]]
        axes, steps = a.get("axes"), None
    else:
        c = [ctx.consts.get(t) if t else None for t in node.input] + [None] * 5
        if c[1] is None or c[2] is None:
            raise Skip("Slice starts/ends are not constants")
        starts, ends = _ints(c[1], "starts"), _ints(c[2], "ends")
        axes = _ints(c[3], "axes") if _opt(node, c, 3) is not None else None
        steps = _ints(c[4], "steps") if _opt(node, c, 4) is not None else None
    n = len(starts)
    axes = list(range(n)) if axes is None else norm_axes(axes, len(shape) + 1)
    steps = [1] * n if steps is None else steps
    if not (len(ends) == len(axes) == len(steps) == n):
        raise Skip("starts, ends, axes and steps differ in length")
    out = [(0, d, 1) for d in shape]
    for ax, s, e, st in zip(axes, starts, ends, steps):
        if st == 0:
            raise Skip("Slice step 0")
        if ax == 0:
            if st != 1 or not (s == 0 or s <= -BIG) or e < BIG:
                raise Skip("Slice of the batch axis")
            continue
        if st < 0:
            raise Skip("negative Slice steps (reversal) are not supported")
        d = shape[ax - 1]
        s, e = (s + d if s < 0 else s), (e + d if e < 0 else e)
        s, e = min(max(s, 0), d), min(max(e, 0), d)
        if e <= s:
            raise Skip(f"Slice selects nothing on axis {ax}")
        out[ax - 1] = (s, e, st)
    return out


@handler("Slice")
def _slice(node, ctx) -> None:
    _inputs(node, ctx, {1: "starts", 2: "ends", 3: "axes", 4: "steps"})
    slices = slice_params(node, ctx, ctx.shape)
    out = tuple(len(range(*s)) for s in slices)
    _emit(ctx, node, IndexNode(node.name, "Slice", ctx.shape, out, fn="slice", params={"slices": slices}), out)


@handler("SpaceToDepth", "DepthToSpace")
def _space_depth(node, ctx) -> None:
    _inputs(node, ctx, {})
    if len(ctx.shape) != 3:
        raise Skip(f"needs a (C, H, W) input, got shape {ctx.shape}")
    a = _attrs(node)
    b = int(a.get("blocksize", 0))
    if b < 1:
        raise Skip("blocksize missing or < 1")
    C, H, W = ctx.shape
    if node.op_type == "SpaceToDepth":
        if H % b or W % b:
            raise Skip(f"H={H}, W={W} not divisible by blocksize {b}")
        out, params = (C * b * b, H // b, W // b), {"blocksize": b}
    else:
        mode = attr_str(a.get("mode"), "DCR")
        if mode not in ("DCR", "CRD"):
            raise Skip(f"mode={mode}")
        if C % (b * b):
            raise Skip(f"C={C} not divisible by blocksize^2 = {b * b}")
        out, params = (C // (b * b), H * b, W * b), {"blocksize": b, "mode": mode}
    fn = "space_to_depth" if node.op_type == "SpaceToDepth" else "depth_to_space"
    _emit(ctx, node, IndexNode(node.name, node.op_type, ctx.shape, out, fn=fn, params=params), out)


# ----------------------------------------------------------- ConvTranspose
def _convt_pads(a: dict, n: tuple, k_eff: tuple, s: tuple, op: tuple) -> tuple:
    """(begin pads, end pads) per spatial axis, by the ONNX spec."""
    auto = attr_str(a.get("auto_pad"), "NOTSET")
    full = [si * (ni - 1) + ki + oi for ni, ki, si, oi in zip(n, k_eff, s, op)]
    if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):
        if "output_shape" in a:
            target = [int(v) for v in a["output_shape"]]
            if len(target) != 2:
                raise Skip(f"output_shape {target} must give the 2 spatial sizes")
            if auto not in ("NOTSET", "SAME_UPPER", "SAME_LOWER"):
                raise Skip(f"output_shape with auto_pad={auto}")
        else:
            if any(op):  # onnx shape inference adds it to n * s, onnxruntime does not
                raise Skip(f"auto_pad={auto} with output_padding {list(op)}: the output size is ambiguous")
            target = [ni * si for ni, si in zip(n, s)]
        total = [f - t for f, t in zip(full, target)]
        if min(total) < 0:
            # the spec would need negative pads here; runtimes differ
            raise Skip(f"output size {target} exceeds the full transposed convolution {full}")
        begin, end = zip(*(same_split(t, auto) for t in total))
        return tuple(begin), tuple(end)
    if auto == "VALID":
        return (0, 0), (0, 0)
    if auto != "NOTSET":
        raise Skip(f"auto_pad={auto}")
    p = [int(v) for v in a.get("pads", (0, 0, 0, 0))]
    if len(p) != 4 or min(p) < 0:
        raise Skip(f"pads {p}")
    return (p[0], p[1]), (p[2], p[3])


@handler("ConvTranspose")
def _conv_transpose(node, ctx) -> None:
    c = _inputs(node, ctx, {1: "weight", 2: "bias"})
    w = conv_weight(node, ctx, c[1], "transposed convolutions")
    a = _attrs(node)
    cin, H, W = ctx.shape
    g = int(a.get("group", 1))
    if w.shape[0] != cin or g < 1 or cin % g:
        raise Skip(f"weight {w.shape} with group={g} does not match {cin} input channels")
    kh, kw = w.shape[2:]
    if "kernel_shape" in a and tuple(int(v) for v in a["kernel_shape"]) != (kh, kw):
        raise Skip(f"kernel_shape {list(a['kernel_shape'])} != weight {w.shape}")
    s = tuple(int(v) for v in a.get("strides", (1, 1)))
    d = tuple(int(v) for v in a.get("dilations", (1, 1)))
    op = tuple(int(v) for v in a.get("output_padding", (0, 0)))
    if len(s) != 2 or len(d) != 2 or len(op) != 2 or min(s + d) < 1 or min(op) < 0:
        raise Skip(f"strides {s}, dilations {d}, output_padding {op}")
    k_eff = (d[0] * (kh - 1) + 1, d[1] * (kw - 1) + 1)
    begin, end = _convt_pads(a, (H, W), k_eff, s, op)
    out = [si * (ni - 1) + ki + oi - b - e for ni, ki, si, oi, b, e in zip((H, W), k_eff, s, op, begin, end)]
    if min(out) < 1:
        raise Skip(f"empty output {out}")
    # The forward map is y -> x[r] = full[r + begin] (0 past the full size):
    # the adjoint of the conv of x (pads begin / end') whose windows are
    # exactly the n input positions; end' = max(0, end - output_padding).
    # When output_padding - end >= stride, trailing rows are reached by no
    # window (torch allows it, onnxruntime refuses it): refused.
    end_c = tuple(max(0, e - o) for e, o in zip(end, op))
    if any(o - e >= si for e, o, si in zip(end, op, s)):
        raise Skip(f"output_padding {list(op)} >= stride {list(s)} plus end pads: rows no tap reaches")
    conv_in = (w.shape[1] * g, out[0], out[1])
    try:
        conv = Conv2d(w, conv_in, stride=s, padding=(begin[0], begin[1], end_c[0], end_c[1]), dilation=d, groups=g)
    except ValueError as e:
        raise Skip(str(e)) from None
    if conv.output_shape != (cin, H, W):
        raise Skip(f"not the exact adjoint of a convolution (its output {conv.output_shape} != input {ctx.shape})")
    bias = _opt(node, c, 2)
    if bias is not None:
        bias = _finite(bias, node, "bias").reshape(-1)
        if bias.size != conv_in[0]:
            raise Skip(f"bias of size {bias.size} for {conv_in[0]} output channels")
    _emit(ctx, node, LinearNode(node.name, "ConvTranspose", ctx.shape, conv_in, op=conv, bias=bias,
                                transposed=True, output_padding=op), conv_in)

