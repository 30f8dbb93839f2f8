"""Multi-node GroupSort-2 (MinMax) forms that exporters emit, recognised as
one activation (finders appended to :data:`certlib.onnx.walk.PATTERNS`).

Every form sorts disjoint pairs of entries (max first or min first).  In the
flattened per-sample order a form is described by (P, Q): the tensor viewed as
(P, 2, Q) and each pair (o, 0, q), (o, 1, q) sorted.  That is the IR
activation ``minmax_pairs`` (channel 2k with 2k+1) on the view (2P, Q), or
``minmax`` (channel halves) when P = 1, surrounded by reshapes (isometries);
proofs/index_ops.md.

Forms (each optionally preceded by a Reshape of its input and followed by a
Reshape of its output, when those tensors are used only inside the form):

* S: Slice + Slice (the two halves of one axis) + Max + Min + Concat;
* R: ReduceMax + ReduceMin over one axis of size 2 (keepdims=1, or keepdims=0
  then Unsqueeze) + Concat along that axis (torch ``max/min(dim)`` + ``cat``
  or ``stack``);
* T: TopK(k=2, sorted) over an axis of size 2, values output only (torch
  ``sort`` / ``topk``); k a constant or ``Gather(Shape(input), axis)``; with
  k = g > 2 the same form is a full sort of groups of g (``groupsort``);
* Split (two equal halves of axis 1) + Max + Min + Concat (certlib's own
  LiResNet export).

A finder only claims nodes whose intermediate tensors are used nowhere else;
the emit function checks every shape and axis against the tensor it is given
and raises Skip (the nodes are then reported unsupported) unless the form is
exactly one of the activations.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from certlib.ir.graph import ActivationNode, ReshapeNode
from certlib.onnx.ops import shape as shp
from certlib.onnx.ops.registry import HANDLERS, PATTERNS, Ctx, Skip, _attrs, _emit, sample_axis

PASS = ("Reshape", "Unsqueeze", "Squeeze", "Cast")  # may sit between Gather(Shape) and TopK's k


def _closed(nodes, idx, final: str, ctx) -> bool:
    """Every tensor the nodes idx produce, except ``final``, is read only by
    nodes in idx (as often as they read it) and is not a graph output."""
    inside = Counter(t for i in idx for t in nodes[i].input if t)
    outs = {o.name for o in ctx.model.graph.output}
    for i in idx:
        for o in nodes[i].output:
            if o and o != final and (o in outs or len(ctx.consumers.get(o, [])) != inside[o]):
                return False
    return True


def _consts(node, ctx, skip_first: bool = True) -> bool:
    return all(t in ctx.consts for t in node.input[1 if skip_first else 0:] if t)


# ------------------------------------------------------------ core forms
def _core_slice(nodes, prod, ctx, ci):
    cat = nodes[ci]
    p = [prod.get(t) for t in cat.input]
    if len(p) != 2 or None in p or sorted(nodes[i].op_type for i in p) != ["Max", "Min"]:
        return None
    mx, mn = p if nodes[p[0]].op_type == "Max" else p[::-1]
    ins = list(nodes[mx].input)
    if len(ins) != 2 or len(set(ins)) != 2 or sorted(nodes[mn].input) != sorted(ins):
        return None
    sl = [prod.get(t) for t in ins]
    if None in sl or any(nodes[i].op_type != "Slice" or not _consts(nodes[i], ctx) for i in sl):
        return None
    if nodes[sl[0]].input[0] != nodes[sl[1]].input[0]:
        return None
    order = "maxmin" if p[0] == mx else "minmax"
    return {sl[0], sl[1], mx, mn, ci}, nodes[sl[0]].input[0], ("S", sl, ci, order)


def _core_reduce(nodes, prod, ctx, ci):
    cat = nodes[ci]
    p = [prod.get(t) for t in cat.input]
    if len(p) != 2 or None in p:
        return None
    unsq = [i for i in p if nodes[i].op_type == "Unsqueeze"]
    if unsq and len(unsq) != 2:
        return None
    red = [prod.get(nodes[i].input[0]) for i in p] if unsq else p
    if None in red or sorted(nodes[i].op_type for i in red) != ["ReduceMax", "ReduceMin"]:
        return None
    if nodes[red[0]].input[0] != nodes[red[1]].input[0] or not all(_consts(nodes[i], ctx) for i in red + unsq):
        return None
    order = "maxmin" if nodes[red[0]].op_type == "ReduceMax" else "minmax"
    return set(red) | set(unsq) | {ci}, nodes[red[0]].input[0], ("R", red, unsq, ci, order)


def _core_topk(nodes, prod, ctx, ti):
    node = nodes[ti]
    t = node.input[0]
    knodes, gather = [], None
    if len(node.input) > 1 and node.input[1] and node.input[1] not in ctx.consts:
        i = prod.get(node.input[1])
        while i is not None and nodes[i].op_type in PASS and _consts(nodes[i], ctx):
            knodes.append(i)
            i = prod.get(nodes[i].input[0])
        if i is None or nodes[i].op_type != "Gather" or not _consts(nodes[i], ctx):
            return None
        sh = prod.get(nodes[i].input[0])
        if sh is None or nodes[sh].op_type != "Shape" or nodes[sh].input[0] != t:
            return None
        gather = (sh, i)
        knodes += [i, sh]
    return {ti, *knodes}, t, ("T", ti, gather)


def _find_groupsort(nodes, ctx) -> dict:
    """start node index -> (consumed node indices, emit(ctx))."""
    prod = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    readers: dict = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            readers.setdefault(t, []).append(i)
    found, used = {}, set()
    for i, n in enumerate(nodes):
        try:
            core = None
            if n.op_type == "Concat" and len(n.input) == 2:
                core = _core_slice(nodes, prod, ctx, i) or _core_reduce(nodes, prod, ctx, i)
            elif n.op_type == "TopK":
                core = _core_topk(nodes, prod, ctx, i)
        except (IndexError, KeyError, TypeError, ValueError):  # malformed nodes: not a form
            core = None
        if core is None:
            continue
        idx, t, info = core
        out = n.output[0]
        if idx & used or not _closed(nodes, idx, out, ctx):
            continue
        src, r1, r2 = t, None, None
        p = prod.get(t)
        if (p is not None and nodes[p].op_type == "Reshape" and _consts(nodes[p], ctx) and p not in used
                and _closed(nodes, idx | {p}, out, ctx)):
            r1, src = p, nodes[p].input[0]
            idx = idx | {p}
        rd = readers.get(out, [])
        if (len(rd) == 1 and nodes[rd[0]].op_type == "Reshape" and nodes[rd[0]].input[0] == out
                and _consts(nodes[rd[0]], ctx) and _closed(nodes, idx | {rd[0]}, nodes[rd[0]].output[0], ctx)):
            r2 = rd[0]
            idx = idx | {r2}
        final = max(idx)
        start = min(j for j in idx if src in nodes[j].input)
        used |= idx
        found[start] = (idx, lambda c, a=(nodes, src, r1, r2, final, info): _emit_named(c, *a))
    return found


def _emit_named(ctx, nodes, src, r1, r2, final, info) -> None:
    """_emit_form, naming the form's nodes in a refusal (the walker reports
    the form under its first node)."""
    try:
        _emit_form(ctx, nodes, src, r1, r2, final, info)
    except (Skip, IndexError, KeyError, TypeError, ValueError) as e:  # malformed: refuse, no traceback
        names = [nodes[i].name or nodes[i].op_type for i in sorted(_members(info, r1, r2))]
        raise Skip(f"GroupSort-2 form [{', '.join(names)}]: {e}") from None


def _members(info, r1, r2) -> set:
    kind = info[0]
    core = {*info[1], info[2]} if kind == "S" else {*info[1], *info[2], info[3]} if kind == "R" else {info[1]}
    return core | {i for i in (r1, r2) if i is not None}


# ----------------------------------------------------------------- emit
def _reshaped(node, ctx, shape: tuple) -> tuple:
    """Per-sample shape after Reshape ``node`` (the importer's own rule)."""
    tmp = Ctx(ctx.model, ctx.opset, ctx.consts, node.input[0], tuple(shape), batch=ctx.batch)
    HANDLERS["Reshape"](node, tmp)
    return tmp.shape


def _axis(v, rank: int, what: str) -> int:
    """A per-sample axis index (0-based) from an ONNX axis of a rank-``rank``
    tensor (batch included): :func:`registry.sample_axis`."""
    return sample_axis(v, (0,) * (rank - 1), what)


def _emit_form(ctx, nodes, src, r1, r2, final, info) -> None:
    if src != ctx.current:
        raise Skip("GroupSort form is not on the main chain")
    s0 = tuple(ctx.shape)
    s1 = _reshaped(nodes[r1], ctx, s0) if r1 is not None else s0
    rank = len(s1) + 1
    kind = info[0]
    if kind == "S":
        _, sl, ci, order = info
        a, b = (shp.slice_params(nodes[i], ctx, s1) for i in sl)
        full = [(0, d, 1) for d in s1]
        diff = {k for k in range(len(s1)) if a[k] != full[k] or b[k] != full[k]}
        if len(diff) != 1:
            raise Skip("the two Slices do not cut one axis in two")
        j = diff.pop()
        d = s1[j]
        if d % 2 or sorted([a[j], b[j]]) != [(0, d // 2, 1), (d // 2, d, 1)]:
            raise Skip(f"the two Slices are not the two halves of an axis of size {d}")
        if _axis(_attrs(nodes[ci]).get("axis", 0), rank, "Concat axis") != j:
            raise Skip("Concat along another axis than the Slices")
        P, Q = int(np.prod(s1[:j])), d // 2 * int(np.prod(s1[j + 1:]))
    elif kind == "R":
        _, red, unsq, ci, order = info
        got = set()
        for i in red:
            n = nodes[i]
            c = [ctx.consts.get(x) for x in n.input] + [None]
            axes = shp.axes_of(n, ctx, c, 18)
            if not axes or len(axes) != 1:
                raise Skip(f"{n.op_type} must reduce exactly one axis")
            got.add((_axis(axes[0], rank, "reduce axis"), int(_attrs(n).get("keepdims", 1))))
        if len(got) != 1:
            raise Skip("ReduceMax and ReduceMin differ in axis or keepdims")
        j, keep = got.pop()
        if bool(keep) == bool(unsq):
            raise Skip("keepdims and Unsqueeze do not restore the reduced axis")
        for i in unsq:
            c = [ctx.consts.get(x) for x in nodes[i].input] + [None]
            ax = shp.axes_of(nodes[i], ctx, c, 13)
            if not ax or len(ax) != 1 or _axis(ax[0], rank, "Unsqueeze axis") != j:
                raise Skip("Unsqueeze does not restore the reduced axis")
        if _axis(_attrs(nodes[ci]).get("axis", 0), rank, "Concat axis") != j:
            raise Skip("Concat along another axis than the reduction")
        if s1[j] != 2:
            raise Skip(f"max/min over an axis of size {s1[j]} (only pairs are a GroupSort-2)")
        P, Q = int(np.prod(s1[:j])), int(np.prod(s1[j + 1:]))
    else:
        _, ti, gather = info
        n = nodes[ti]
        a = _attrs(n)
        j = _axis(a.get("axis", -1), rank, "TopK axis")
        if not int(a.get("sorted", 1)):
            raise Skip("TopK with sorted=0 (order unspecified)")
        g = s1[j]
        if gather is not None:
            sh, gi = gather
            sa = _attrs(nodes[sh])
            idx = shp._ints(ctx.consts[nodes[gi].input[1]], "Gather index")
            gax = shp.norm_axes([_attrs(nodes[gi]).get("axis", 0)], 1, "Gather axis")  # a 1-D shape tensor
            if int(sa.get("start", 0)) != 0 or "end" in sa or gax != [0] or len(idx) != 1 \
                    or _axis(idx[0], rank, "Gather index") != j:
                raise Skip("TopK's k is not the size of its axis")
        else:
            k = a.get("k") if shp._version(n, ctx) < 10 else ctx.consts.get(n.input[1])
            if k is None or shp._ints(k, "k") != [g]:
                raise Skip(f"TopK with k != the size {g} of its axis (a partial sort)")
        order = "maxmin" if int(a.get("largest", 1)) else "minmax"
        P, Q = int(np.prod(s1[:j])), int(np.prod(s1[j + 1:]))
        if g != 2:  # a full sort of each group of g: GroupSort-g, 1-Lipschitz
            s2 = _reshaped(nodes[r2], ctx, s1) if r2 is not None else s1
            if int(np.prod(s2)) != int(np.prod(s0)):  # pragma: no cover
                raise Skip("GroupSort shapes do not match")
            ctx.nodes.append(ActivationNode(n.name or "TopK", "GroupSort", s0, s0, activation="groupsort",
                                            params={"P": P, "g": g, "Q": Q, "descending": order == "maxmin"}))
            if s2 != s0:
                ctx.nodes.append(ReshapeNode((n.name or "TopK") + "/unview", "Reshape", s0, s2))
            ctx.current, ctx.shape = nodes[final].output[0], tuple(s2)
            return
    s2 = _reshaped(nodes[r2], ctx, s1) if r2 is not None else s1
    core = nodes[info[{"S": 2, "R": 3, "T": 1}[kind]]]   # the Concat or the TopK
    _pairs(ctx, nodes[final], core.name or core.op_type, s0, P, Q, order, s2)


def _pairs(ctx, last, name: str, s_in: tuple, P: int, Q: int, order: str, s_out: tuple) -> None:
    """Emit the sort of pairs (o, 0, q), (o, 1, q) of the (P, 2, Q) view."""
    if int(np.prod(s_in)) != 2 * P * Q or int(np.prod(s_out)) != 2 * P * Q:  # pragma: no cover
        raise Skip("GroupSort shapes do not match")
    for shape in (s_in, s_out):
        if P == 1 and shape and shape[0] % 2 == 0:
            T, act = shape, "minmax"
            break
        if shape and shape[0] == 2 * P:
            T, act = shape, "minmax_pairs"
            break
    else:
        T, act = (2 * P, Q), "minmax_pairs"
    act += "" if order == "maxmin" else "_rev"
    if T != s_in:
        ctx.nodes.append(ReshapeNode(name + "/view", "Reshape", s_in, T))
    ctx.nodes.append(ActivationNode(name, "GroupSort", T, T, activation=act))
    if T != s_out:
        ctx.nodes.append(ReshapeNode(name + "/unview", "Reshape", T, s_out))
    ctx.current, ctx.shape = last.output[0], tuple(s_out)


# ------------------------------------------ MinMax as Split + Max + Min + Concat
def _find_minmax(nodes: list, ctx: Ctx) -> dict:
    """Map Concat node index -> (set of consumed node indices, source tensor, order)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    found = {}
    for ci, n in enumerate(nodes):
        if n.op_type != "Concat" or len(n.input) != 2:
            continue
        p = [producer.get(t) for t in n.input]
        if None in p:
            continue
        kinds = [nodes[i].op_type for i in p]
        if sorted(kinds) != ["Max", "Min"]:
            continue
        mx, mn = (nodes[p[0]], nodes[p[1]]) if kinds[0] == "Max" else (nodes[p[1]], nodes[p[0]])
        if len(mx.input) != 2 or set(mx.input) != set(mn.input) or len(set(mx.input)) != 2:
            continue
        srcs = {producer.get(t) for t in mx.input}
        if len(srcs) != 1 or None in srcs:
            continue
        si = srcs.pop()
        sp = nodes[si]
        if sp.op_type != "Split" or len(sp.output) != 2 or set(sp.output) != set(mx.input):
            continue
        a = _attrs(sp)
        if len(sp.input) > 1 and sp.input[1]:
            sizes = ctx.consts.get(sp.input[1])
            if sizes is None or len(set(np.asarray(sizes).tolist())) != 1:
                continue
        elif "split" in a and len(set(a["split"])) != 1:
            continue
        # every intermediate tensor must be used only inside the pattern
        inner = list(sp.output) + [mx.output[0], mn.output[0]]
        if any(len(ctx.consumers.get(t, [])) != (2 if t in sp.output else 1) for t in inner):
            continue
        order = "maxmin" if kinds[0] == "Max" else "minmax"
        # the axes are checked against the rank of the tensor in _minmax
        axes = (int(a.get("axis", 0)), int(_attrs(n).get("axis", 0)))
        found[ci] = ({si, producer[mx.output[0]], producer[mn.output[0]]}, sp.input[0], order, axes)
    return found


def _minmax(node, ctx: Ctx, src: str, order: str, axes: tuple) -> None:
    if src != ctx.current:
        raise Skip("MinMax is not on the main chain")
    split_ax, cat_ax = (sample_axis(v, ctx.shape, w) for v, w in zip(axes, ("Split axis", "Concat axis")))
    if split_ax != 0 or cat_ax != 0:
        raise Skip(f"MinMax Split/Concat axes {list(axes)} are not the channel axis of a tensor of shape "
                   f"{ctx.shape}")
    if not ctx.shape or ctx.shape[0] % 2:
        raise Skip(f"MinMax needs an even channel count, got shape {ctx.shape}")
    act = ActivationNode(node.name or "minmax", "MinMax", ctx.shape, ctx.shape,
                         activation="minmax" if order == "maxmin" else "minmax_rev")
    _emit(ctx, node, act, ctx.shape)


def _find_minmax_patterns(nodes, ctx) -> dict:
    """start node index -> (consumed node indices, emit(ctx) function)."""
    out = {}
    for ci, (consumed, src, order, axes) in _find_minmax(nodes, ctx).items():
        start = next(i for i in consumed if nodes[i].op_type == "Split")
        concat = nodes[ci]
        out[start] = (consumed | {ci}, lambda c, n=concat, s=src, o=order, a=axes: _minmax(n, c, s, o, a))
    return out


def _register() -> None:
    for finder in (_find_minmax_patterns, _find_groupsort):
        if finder not in PATTERNS:
            PATTERNS.append(finder)


_register()
