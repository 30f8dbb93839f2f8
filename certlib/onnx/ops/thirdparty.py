"""Multi-node forms that third-party Lipschitz libraries export, recognised as
one IR node each (finders registered into :data:`registry.PATTERNS`;
proofs/thirdparty_forms.md):

* W: legacy circular padding, ``Concat([Slice(t, tail), t, Slice(t, head)],
  axis)`` (torch's TorchScript export of ``padding_mode="circular"``): a wrap
  pad of that axis.  Two of them in a row (H then W) become one wrap pad of both
  axes, so the composer folds wrap pad + conv into one circular convolution;
* C: centering, ``Sub(t, ReduceMean(t, axes, keepdims=1))`` (LayerCentering):
  :class:`certlib.ir.norm_ops.CenterNode`, 1-Lipschitz;
* P: l2-norm pooling, ``Pow(t, 2)`` -> ``AveragePool`` ->
  [``Mul(Sign(a), Relu(Abs(a)))``: equal to a] -> [``Mul(c)``] -> ``Pow(0.5)``
  (or ``Sqrt``): :class:`certlib.ir.norm_ops.L2PoolNode`, Lipschitz
  ``sqrt(c m / taps)`` (the window-overlap rule).

A finder claims nodes only when every intermediate tensor is used inside the
form; the emit function checks shapes, axes and constants and raises Skip
otherwise (the nodes are then reported unsupported).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from certlib.bounds import up_sqrt
from certlib.ir.graph import IndexNode
from certlib.ir.norm_ops import MAX_TAPS, CenterNode, L2PoolNode
from certlib.onnx.ops import shape as shp
from certlib.onnx.ops.patterns import _closed
from certlib.onnx.ops.registry import PATTERNS, Skip, _attrs, _emit, node_maps, sample_axis


def _const_scalar(ctx, name: str):
    v = ctx.consts.get(name)
    if v is None or np.asarray(v).size != 1:
        return None
    return float(np.asarray(v, dtype=np.float64).ravel()[0])


def _safe(finder):
    def run(nodes, ctx):
        out, used = {}, set()
        prod, readers = node_maps(nodes)
        for i, n in enumerate(nodes):
            try:
                got = finder(nodes, ctx, prod, readers, i)
            except (IndexError, KeyError, TypeError, ValueError):   # malformed: not a form
                got = None
            if got is None:
                continue
            idx, start, final, emit = got
            if idx & used or not _closed(nodes, idx, nodes[final].output[0], ctx):
                continue
            used |= idx
            out[start] = (idx, emit)
        return out
    run.__name__ = finder.__name__
    return run


# ---------------------------------------------------------- W: wrap concat
def _find_wrap(nodes, ctx, prod, readers, ci):
    cat = nodes[ci]
    if cat.op_type != "Concat" or len(cat.input) not in (2, 3):
        return None
    ins = list(cat.input)
    srcs = [t for t in ins if prod.get(t) is None or nodes[prod[t]].op_type != "Slice"
            or nodes[prod[t]].input[0] not in ins]
    if len(srcs) != 1:
        return None
    t = srcs[0]
    k = ins.index(t)
    if ins.count(t) != 1 or (len(ins) == 3 and k != 1):
        return None      # [tail, t, head] or [tail, t] or [t, head] only
    sl = [prod[x] for x in ins if x != t]
    if any(nodes[i].input[0] != t or not all(x in ctx.consts for x in nodes[i].input[1:] if x) for i in sl):
        return None
    before, after = (prod[ins[0]] if k > 0 else None), (prod[ins[-1]] if k < len(ins) - 1 else None)
    idx = set(sl) | {ci}
    start = min(j for j in idx if t in nodes[j].input)
    return idx, start, ci, lambda c: _emit_wrap(c, nodes, t, before, after, ci)


def _emit_wrap(ctx, nodes, t, before, after, ci) -> None:
    if t != ctx.current:
        raise Skip("wrap-padding Concat is not on the main chain")
    s = tuple(ctx.shape)
    cat = nodes[ci]
    j = sample_axis(_attrs(cat).get("axis", 0), s, f"{cat.op_type} axis")
    n = s[j]
    b = e = 0
    for i, head in ((before, False), (after, True)):
        if i is None:
            continue
        p = shp.slice_params(nodes[i], ctx, s)
        if any(p[a] != (0, s[a], 1) for a in range(len(s)) if a != j):
            raise Skip("a Slice of the wrap form cuts another axis than the Concat's")
        lo, hi, st = p[j]
        if st != 1 or (head and lo != 0) or (not head and hi != n):
            raise Skip(f"Slice {p[j]} is not the {'head' if head else 'tail'} of the axis (not a wrap pad)")
        if head:
            e = hi
        else:
            b = n - lo
    begin, end = [0] * len(s), [0] * len(s)
    begin[j], end[j] = b, e
    prev = ctx.nodes[-1] if ctx.nodes else None
    if (isinstance(prev, IndexNode) and prev.fn == "gather" and prev.params.get("mode") == "wrap"
            and tuple(prev.out_shape) == s and prev.params["index"][j] is None):
        # wrap pad of another axis just before: one wrap pad of both (exact)
        ctx.nodes.pop()
        begin = [x + y for x, y in zip(begin, prev.params["begin"])]
        end = [x + y for x, y in zip(end, prev.params["end"])]
        s = tuple(prev.in_shape)
    out = tuple(d + x + y for d, x, y in zip(s, begin, end))
    ctx.shape = s
    shp._copy_pad(cat, ctx, "wrap", begin, end, out)


# ------------------------------------------------------------- C: centering
def _find_center(nodes, ctx, prod, readers, si):
    sub = nodes[si]
    if sub.op_type != "Sub" or len(sub.input) != 2:
        return None
    r = prod.get(sub.input[1])
    if r is None or nodes[r].op_type != "ReduceMean" or nodes[r].input[0] != sub.input[0]:
        return None
    if not all(x in ctx.consts for x in nodes[r].input[1:] if x):
        return None
    idx = {r, si}
    return idx, min(idx), si, lambda c: _emit_center(c, nodes[r], sub)


def _emit_center(ctx, red, sub) -> None:
    if sub.input[0] != ctx.current:
        raise Skip("centering is not on the main chain")
    a = _attrs(red)
    if int(a.get("keepdims", 1)) != 1:
        raise Skip("ReduceMean with keepdims=0 before the Sub")
    c = [ctx.consts.get(x) for x in red.input] + [None]
    axes = shp.axes_of(red, ctx, c, 18)
    if not axes:
        raise Skip("ReduceMean over every axis (the batch axis too)")
    ax = sorted({sample_axis(v, tuple(ctx.shape), "ReduceMean axes") for v in axes})
    if len(ax) != len(axes):
        raise Skip(f"ReduceMean axes {list(axes)} repeat an axis")
    node = CenterNode(sub.name or "center", "ReduceMean+Sub", ctx.shape, ctx.shape, lipschitz=1.0,
                      params={"axes": ax})
    _emit(ctx, sub, node, ctx.shape)


# ------------------------------------------------------------- P: l2 pool
def _one_reader(readers, t):
    r = readers.get(t, [])
    return r[0] if len(r) == 1 else None


def _find_l2pool(nodes, ctx, prod, readers, pi):
    pool = nodes[pi]
    if pool.op_type != "AveragePool":
        return None
    sq = prod.get(pool.input[0])
    if sq is None:
        return None
    n = nodes[sq]
    if n.op_type != "Pow" or _const_scalar(ctx, n.input[1]) != 2.0:   # Mul(t, t): the walker sees a branch
        return None
    t = n.input[0]
    idx = {sq, pi}
    cur = pool.output[0]
    # Mul(Sign(a), Relu(Abs(a))) or Mul(Sign(a), Abs(a)): equals a exactly
    rd = readers.get(cur, [])
    if len(rd) == 2 and sorted(nodes[i].op_type for i in rd) == ["Abs", "Sign"]:
        sg = next(i for i in rd if nodes[i].op_type == "Sign")
        ab = next(i for i in rd if nodes[i].op_type == "Abs")
        mag = ab
        rl = _one_reader(readers, nodes[ab].output[0])
        if rl is not None and nodes[rl].op_type == "Relu":
            mag = rl
        mu = _one_reader(readers, nodes[mag].output[0])
        if mu is None or nodes[mu].op_type != "Mul" or \
                sorted(nodes[mu].input) != sorted([nodes[sg].output[0], nodes[mag].output[0]]):
            return None
        idx |= {sg, ab, mag, mu}
        cur = nodes[mu].output[0]
    scale = 1.0
    nx = _one_reader(readers, cur)
    if nx is not None and nodes[nx].op_type == "Mul":
        other = [x for x in nodes[nx].input if x != cur]
        if len(other) != 1 or _const_scalar(ctx, other[0]) is None:
            return None
        scale = _const_scalar(ctx, other[0])
        idx.add(nx)
        cur = nodes[nx].output[0]
        nx = _one_reader(readers, cur)
    if nx is None:
        return None
    last = nodes[nx]
    if not (last.op_type == "Sqrt" or (last.op_type == "Pow" and _const_scalar(ctx, last.input[1]) == 0.5)):
        return None
    idx.add(nx)
    return idx, sq, nx, lambda c: _emit_l2pool(c, t, pool, scale, last)


def _emit_l2pool(ctx, t, pool, c, last) -> None:
    from certlib.onnx.ops.nonlinear import _check_out, _geometry, _ints, _need_2d

    if t != ctx.current:
        raise Skip("l2-norm pool is not on the main chain")
    _need_2d(ctx)
    if not (math.isfinite(c) and 0 < c <= 2.0 ** 40):
        raise Skip(f"l2-norm pool scale {c} is not in (0, 2^40]")
    a = _attrs(pool)
    kernel = _ints(a, "kernel_shape", None, 2, 1)
    strides, dil, (gh, gw) = _geometry(pool, ctx, kernel, a, dilations_since=19)
    _check_out(pool, ctx, strides, dil, kernel, (gh, gw))
    if dil != (1, 1) or gh.begin or gh.end or gw.begin or gw.end:
        raise Skip("l2-norm pool with padding, ceil_mode overhang or dilation (only plain windows)")
    taps = kernel[0] * kernel[1]
    if taps > MAX_TAPS:
        raise Skip(f"l2-norm pool window of {taps} entries (at most {MAX_TAPS})")
    m = gh.share * gw.share
    q = Fraction(c) * m / taps          # L^2 = c m / taps, exactly
    sq = float(q)
    if Fraction(sq) < q:
        sq = math.nextafter(sq, math.inf)
    L = up_sqrt(sq)
    r = math.isqrt(q.numerator) if q.denominator == 1 else None
    if r is not None and r * r == q.numerator:
        L = float(r)
    out = (ctx.shape[0], gh.out, gw.out)
    node = L2PoolNode(last.name or "l2pool", "LpPool(2)", ctx.shape, out, lipschitz=L,
                      params={"kernel": tuple(kernel), "strides": tuple(strides), "c": c})
    _emit(ctx, last, node, out)


FINDERS = [_safe(f) for f in (_find_wrap, _find_center, _find_l2pool)]


def _register() -> None:
    names = {getattr(f, "__name__", "") for f in PATTERNS}
    for f in FINDERS:
        if f.__name__ not in names:
            PATTERNS.append(f)


_register()
