"""Linear polynomial regions: single-entry single-exit subgraphs that compute
q(A) t for ONE convolution A, imported as series-parallel IR in Horner form
(proofs/polynomial_blocks.md, "Import").

SOC (skew orthogonal convolution) exports its truncated series
``out = t + z1 + ... + zK``, ``z_k = Conv_A(z_{k-1}) / k``: every ``z_k`` feeds
both the next Conv and the running sum, so the graph is not series-parallel.
The region's nodes are Conv (constant weight copied exactly, no bias or an
all-zero one), Mul/Div by a scalar constant, Add/Sub of two region tensors,
Neg and Identity.  Each region tensor is tracked as a polynomial in A applied
to t with exact rational coefficients (``fractions.Fraction`` of the stored
constants; Div by c multiplies by 1/Fraction(c)), and the exit polynomial
``q(A) = a0 I + a1 A + ... + aK A^K`` is emitted as

    q(A) x = a0 x + A(a1 x + A(a2 x + ... A(aK x)))

each level a ParallelNode(add) of [AffineNode(a_i)] (empty when a_i = 1, absent
when a_i = 0) and [inner level, LinearNode(A)]; with a0 = 0 the whole is wrapped
in a one-branch ParallelNode, so q(A) is always ONE block.  A stored a_i that is not the
exact rational carries ``const_err = u`` (AffineNode.const_err).  The emitted
IR is the same function in exact real arithmetic; the float64 forward's own
rounding is tracked by the IR as usual.

The finder fires only when the region is NOT series-parallel (an internal
tensor other than t is read twice): LiResNet's x + Conv(x) keeps the walker's
handling.  Inside a region that fires, anything else (two different Convs, a
shape-changing Conv, a weight computed in the graph, a non-scalar constant) is
refused with the nodes named.
"""

from __future__ import annotations

import heapq
from fractions import Fraction

import numpy as np

from certlib.ir.graph import U64, AffineNode, LinearNode, ParallelNode
from certlib.ir.polynomial import same_op
from certlib.onnx.ops.registry import HANDLERS, PATTERNS, Ctx, Skip, check_opset, node_maps

#: ops a region may contain
REGION_OPS = ("Conv", "Mul", "Div", "Add", "Sub", "Neg", "Identity")
#: the largest degree of q imported (a longer series is refused)
MAX_DEGREE = 64
#: stored coefficients must be normal doubles in [2^-1000, 2^1000] (relative error u)
COEF_RANGE = (2.0 ** -1000, 2.0 ** 1000)


def _eligible(n, ctx: Ctx, tensors: set) -> bool:
    """n is a region op whose data inputs are all region tensors (in the right slots)."""
    if n.domain not in ("", "ai.onnx") or n.op_type not in REGION_OPS or len(n.output) != 1:
        return False
    ins = [t for t in n.input if t]
    if n.op_type in ("Add", "Sub"):
        return len(n.input) == 2 and all(t in tensors for t in n.input)
    if n.op_type in ("Mul", "Div"):
        if len(ins) != 2:
            return False
        data = n.input[0] if n.op_type == "Div" else next((t for t in ins if t not in ctx.consts), None)
        other = [t for t in ins if t != data] if data is not None else []
        return data in tensors and len(other) == 1 and other[0] in ctx.consts
    if n.op_type == "Conv":
        return bool(ins) and n.input[0] in tensors and all(t in ctx.consts for t in n.input[1:] if t)
    return len(ins) == 1 and ins[0] in tensors               # Neg, Identity


def _region(nodes, ctx: Ctx, t: str, readers: dict, outs: set):
    """The node indices of the smallest single-exit region from t that is
    not series-parallel, and its exit tensor; None when the smallest valid
    region is series-parallel (the walker's business) or none exists."""
    tensors, grown = {t}, []
    heap = sorted(set(readers.get(t, [])))
    seen = set(heap)
    while heap:     # graph order: every producer of a node's inputs is visited before it
        i = heapq.heappop(heap)
        n = nodes[i]
        if _eligible(n, ctx, tensors):
            grown.append(i)
            tensors.add(n.output[0])
            for r in readers.get(n.output[0], []):
                if r not in seen:
                    seen.add(r)
                    heapq.heappush(heap, r)
    if t in outs:
        return None
    inside: dict = {}          # tensor -> reads by the prefix so far
    open_, multi = set(), set()  # produced tensors read outside the prefix (or outputs); read twice
    for j, i in enumerate(grown):
        n = nodes[i]
        for x in n.input:
            if x:
                inside[x] = inside.get(x, 0) + 1
                if x in open_ and inside[x] == len(readers.get(x, [])) and x not in outs:
                    open_.discard(x)
        o = n.output[0]
        rd = readers.get(o, [])
        open_.add(o)            # its readers come later in graph order (or none: a dead end)
        if len(rd) >= 2:
            multi.add(o)
        if inside.get(t, 0) == len(readers.get(t, [])) and open_ == {o}:
            return (grown[:j + 1], o) if multi - {o} else None
    return None


def find_polynomial(nodes, ctx: Ctx) -> dict:
    """start node index -> (consumed node indices, emit(ctx)) for every
    non-series-parallel linear polynomial region."""
    prod, readers = node_maps(nodes)
    outs = {o.name for o in ctx.model.graph.output}
    found, used = {}, set()
    starts = [t for t, rd in readers.items() if t not in ctx.consts and len(rd) >= 2]
    starts.sort(key=lambda t: prod.get(t, -1))
    for t in starts:
        try:
            got = _region(nodes, ctx, t, readers, outs)
        except (IndexError, KeyError, TypeError, ValueError):      # malformed: not a region
            got = None
        if got is None or set(got[0]) & used:
            continue
        idx, exit_ = got
        used |= set(idx)
        found[idx[0]] = (set(idx), lambda c, idx=idx, t=t, e=exit_: _emit(c, nodes, idx, t, e))
    return found


def _scalar(ctx: Ctx, node, name: str, rank: int) -> Fraction:
    v = np.asarray(ctx.consts[name])
    if ctx.unbounded.get(name) or np.any(ctx.const_err.get(name, 0.0)):
        raise Skip(f"constant {name!r} is computed inside the graph with a rounding error (polynomial regions "
                   "need constants stored exactly)")
    if v.size != 1 or v.ndim > rank or not np.issubdtype(v.dtype, np.floating):
        raise Skip(f"constant {name!r} (shape {v.shape}, {v.dtype}) is not a float scalar: a polynomial region "
                   "scales by scalars only")
    x = float(v.astype(np.float64).ravel()[0])
    if not np.isfinite(x):
        raise Skip(f"constant {name!r} is not finite")
    return Fraction(x)


def _conv_node(ctx: Ctx, node, shape: tuple) -> LinearNode:
    """The LinearNode of one Conv of the region (the core handler's checks)."""
    saved = (ctx.nodes, ctx.current, ctx.shape)
    ctx.nodes, ctx.current, ctx.shape = [], node.input[0], shape
    try:
        check_opset(node, ctx)
        HANDLERS["Conv"](node, ctx)
        lin = ctx.nodes[-1]
    finally:
        ctx.nodes, ctx.current, ctx.shape = saved
    if tuple(lin.out_shape) != tuple(shape):
        raise Skip(f"Conv {node.name!r} maps shape {shape} to {lin.out_shape}: a polynomial region needs a "
                   "convolution that keeps the shape")
    if lin.weight_rel_err or np.any(ctx.const_err.get(node.input[1], 0.0)):
        raise Skip(f"Conv {node.name!r} reads a weight computed inside the graph (a polynomial region needs the "
                   "weight copied exactly)")
    if lin.bias is not None:
        if np.any(lin.bias != 0) or np.any(lin.bias_abs_err):
            raise Skip(f"Conv {node.name!r} has a non-zero bias: the region is not linear")
        lin.bias = None
    return lin


def _emit(ctx: Ctx, nodes, idx: list, t: str, exit_: str) -> None:
    if ctx.current != t:
        raise Skip("linear polynomial region is not on the main chain")
    shape = tuple(ctx.shape)
    rank = len(shape) + 1
    poly: dict = {t: [Fraction(1)]}
    A, first = None, None
    for i in idx:
        n = nodes[i]
        if n.op_type != "Conv":
            check_opset(n, ctx)
        op = n.op_type
        if op == "Conv":
            lin = _conv_node(ctx, n, shape)
            if A is None:
                A, first = lin, n
            elif not same_op(A.op, lin.op):
                raise Skip(f"the linear region from {t!r} applies two different convolutions ({first.name!r} and "
                           f"{n.name!r}): certlib imports a polynomial of ONE operator only")
            p = [Fraction(0)] + poly[n.input[0]]
        elif op in ("Mul", "Div"):
            data = n.input[0] if op == "Div" else next(x for x in n.input if x not in ctx.consts)
            c = _scalar(ctx, n, next(x for x in n.input if x != data), rank)
            if op == "Div":
                if c == 0:
                    raise Skip(f"{n.name!r} divides by zero")
                c = 1 / c
            p = [c * a for a in poly[data]]
        elif op in ("Add", "Sub"):
            a, b = poly[n.input[0]], poly[n.input[1]]
            s = 1 if op == "Add" else -1
            m = max(len(a), len(b))
            p = [(a[k] if k < len(a) else 0) + s * (b[k] if k < len(b) else 0) for k in range(m)]
        elif op == "Neg":
            p = [-a for a in poly[n.input[0]]]
        else:
            p = poly[n.input[0]]
        if len(p) - 1 > MAX_DEGREE:
            raise Skip(f"the linear region from {t!r} has degree {len(p) - 1} > {MAX_DEGREE}")
        poly[n.output[0]] = p
    q = list(poly[exit_])
    while len(q) > 1 and q[-1] == 0:
        q.pop()
    name = nodes[idx[-1]].name or exit_
    ctx.nodes.extend(horner(q, A, shape, name))
    ctx.current, ctx.shape = exit_, shape


def _coef(a: Fraction, shape: tuple, name: str) -> AffineNode:
    s = float(a)
    if not COEF_RANGE[0] <= abs(s) <= COEF_RANGE[1]:
        raise Skip(f"polynomial coefficient {s!r} is outside [2^-1000, 2^1000]")
    return AffineNode(name, "Mul", shape, shape, scale=np.array(s), shift=np.array(0.0),
                      const_err=0.0 if Fraction(s) == a else U64)


def horner(q: list, A: LinearNode | None, shape: tuple, name: str) -> list:
    """IR nodes computing q(A) x = a0 x + A(a1 x + A(... A(aK x))) (q: exact
    Fraction coefficients a0..aK, aK != 0 unless K = 0)."""
    K = len(q) - 1
    if K == 0 or A is None:
        return [] if q[0] == 1 else [_coef(q[0], shape, f"{name}/a0")]
    level = [] if q[K] == 1 else [_coef(q[K], shape, f"{name}/a{K}")]
    for i in range(K - 1, -1, -1):
        lin = LinearNode(f"{name}/A{i + 1}", "Conv", shape, shape, op=A.op)
        inner = level + [lin]
        if q[i] == 0:
            level = inner
            continue
        own = [] if q[i] == 1 else [_coef(q[i], shape, f"{name}/a{i}")]
        level = [ParallelNode(f"{name}/h{i}", "Add", shape, shape, branches=[own, inner], merge="add",
                              signs=(1.0, 1.0))]
    if q[0] == 0:    # one block for the whole of q (the rule bounds blocks, not chains of them)
        level = [ParallelNode(f"{name}/h0", "Add", shape, shape, branches=[level], merge="add", signs=(1.0,))]
    return level


def _register() -> None:
    if all(getattr(f, "__name__", "") != find_polynomial.__name__ for f in PATTERNS):
        PATTERNS.append(find_polynomial)


_register()
