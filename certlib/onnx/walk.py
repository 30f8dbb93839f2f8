"""Walk an ONNX graph into the series-parallel IR (certlib.ir.graph).

The walk follows the data tensor from the graph input.  A node with one data
input (every other input a constant) is a *unary* node: its handler from
:data:`certlib.onnx.ops.registry.HANDLERS` appends IR nodes.  A tensor read by several
nodes (or a Split with several outputs) is a *fork*: every reader starts a
branch, walked until it reaches a *merge* (Add, Sub, Sum, Concat, Max, Min
with several data inputs).  Branches that meet at one merge become one
:class:`~certlib.ir.graph.ParallelNode` (proofs/composition.md: add -> sum of the
branch bounds, concat/max/min -> root of the sum of squares); the walk then
continues after the merge.  Graphs that are not series-parallel (a merge that
reads a tensor from outside its block) are refused with the merge named.

Multi-node patterns that act as one operator (MinMax written as Split + Max +
Min + Concat, ...) are found first by the finders in :data:`PATTERNS` and
handled as one unary node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from certlib.errors import Unsupported
from certlib.ir.graph import IndexNode, ParallelNode
from certlib.onnx.ops import HANDLERS, PATTERNS, Ctx, Skip, _attrs, _dynamic_input, check_opset
from certlib.onnx.ops.registry import sample_axis

MERGE_OPS = ("Add", "Sub", "Sum", "Concat", "Max", "Min")


class _Abort(Exception):
    """The walk cannot continue (the problem is already recorded)."""


@dataclass
class _Branch:
    nodes: list
    end: str          # last tensor of the branch
    shape: tuple
    merge: int | None  # index of the merge node that stopped the walk


class Walker:
    def __init__(self, ctx: Ctx, nodes: list, out_name: str, shapes: dict):
        self.ctx, self.nodes, self.out_name, self.shapes = ctx, nodes, out_name, shapes
        self.patterns: dict = {}
        for finder in PATTERNS:
            self.patterns.update(finder(nodes, ctx))
        inner = {i for start, (consumed, _) in self.patterns.items() for i in consumed if i != start}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            if i in inner:
                continue
            for t in n.input:
                if t and t not in ctx.consts:
                    self.consumers.setdefault(t, []).append(i)

    # --------------------------------------------------------------- helpers
    def _dyn(self, node) -> list:
        return [t for t in node.input if t and t not in self.ctx.consts]

    def _is_merge(self, i: int) -> bool:
        return i not in self.patterns and len(self._dyn(self.nodes[i])) >= 2

    def _fail(self, node, why: str) -> None:
        self.ctx.fail(node, why)

    def _unary(self, i: int) -> None:
        """Apply node i (a handler or a pattern) to the current tensor."""
        ctx, node = self.ctx, self.nodes[i]
        try:
            if i in self.patterns:
                self.patterns[i][1](ctx)
            elif node.domain not in ("", "ai.onnx"):
                raise Skip(f"custom domain {node.domain!r}")
            elif node.op_type in ("Softmax", "LogSoftmax") and node.output[0] == self.out_name:
                _dynamic_input(node, ctx)
                axis = _attrs(node).get("axis", 1 if ctx.opset < 13 else -1)
                if len(ctx.shape) != 1 or sample_axis(axis, ctx.shape, f"{node.op_type} axis") != 0:
                    raise Skip(f"final {node.op_type} must act on a vector of logits (shape {ctx.shape}, "
                               f"axis {axis})")
                ctx.current = node.output[0]  # dropped: argmax unchanged
                ctx.dropped = node.op_type
            elif node.op_type in HANDLERS:
                check_opset(node, ctx)
                HANDLERS[node.op_type](node, ctx)
            else:
                raise Skip("no handler: certlib cannot bound this operator yet")
        except Skip as e:
            self._fail(node, str(e))
            # keep walking to report every problem
            out = self.patterns[i][0] if i in self.patterns else None
            ctx.current = node.output[0] if node.output else ctx.current
            if out is not None:  # a pattern: continue after its last node
                last = max(out)
                ctx.current = self.nodes[last].output[0]
            ctx.shape = self.shapes.get(ctx.current, ctx.shape)

    def _starters(self, t: str) -> list:
        """What reads tensor t: ("merge", i) | ("node", i) | ("slice", split i, output k)."""
        out = []
        for i in self.consumers.get(t, []):
            n = self.nodes[i]
            if self._is_merge(i):
                out.append(("merge", i))
            elif n.op_type == "Split" and i not in self.patterns and len([o for o in n.output if o]) > 1:
                out += [("slice", i, k) for k in range(len(n.output))]
            else:
                out.append(("node", i))
        return out

    def _split_slice(self, i: int, k: int) -> None:
        """Output k of a Split as an IndexNode slice of the current tensor."""
        ctx, node = self.ctx, self.nodes[i]
        try:
            c = _dynamic_input(node, ctx)
            a = _attrs(node)
            axis = sample_axis(a.get("axis", 0), ctx.shape, "Split axis") + 1
            dim = ctx.shape[axis - 1]
            if len(c) > 1 and c[1] is not None:
                sizes = [int(v) for v in np.asarray(c[1]).reshape(-1)]
            elif "split" in a:
                sizes = [int(v) for v in a["split"]]
            else:
                parts = len(node.output)
                chunk = -(-dim // parts)
                sizes = [min(chunk, dim - j * chunk) for j in range(parts)]
            if sum(sizes) != dim or len(sizes) != len(node.output) or min(sizes) <= 0:
                raise Skip(f"split sizes {sizes} do not partition the axis of length {dim}")
            start = sum(sizes[:k])
            slices = [(0, d, 1) for d in ctx.shape]
            slices[axis - 1] = (start, start + sizes[k], 1)
            shape = list(ctx.shape)
            shape[axis - 1] = sizes[k]
            ctx.nodes.append(IndexNode(f"{node.name}[{k}]", "Split", ctx.shape, tuple(shape), fn="slice",
                                       params={"slices": slices}))
            ctx.current, ctx.shape = node.output[k], tuple(shape)
        except Skip as e:
            self._fail(node, str(e))
            ctx.current = node.output[k]
            ctx.shape = self.shapes.get(ctx.current, ctx.shape)

    # ------------------------------------------------------------------ walk
    def run(self, t: str, shape: tuple, start=None) -> _Branch:
        """Walk from tensor t (first applying ``start``: a starter tuple) until
        the graph output or the first merge; returns the branch."""
        ctx = self.ctx
        saved = (ctx.nodes, ctx.current, ctx.shape)
        ctx.nodes, ctx.current, ctx.shape = [], t, shape
        try:
            if start is not None:
                if start[0] == "slice":
                    self._split_slice(start[1], start[2])
                else:
                    self._unary(start[1])
            while True:
                t = ctx.current
                st = self._starters(t)
                if t == self.out_name and not st:
                    return _Branch(ctx.nodes, t, ctx.shape, None)
                if not st:
                    ctx.problems.append(Unsupported(t, "-", ctx.opset, "tensor is neither used nor the graph "
                                                                       "output (a dead branch)"))
                    raise _Abort
                if len(st) == 1 and st[0][0] == "merge":
                    return _Branch(ctx.nodes, t, ctx.shape, st[0][1])
                if len(st) == 1 and st[0][0] == "node":
                    self._unary(st[0][1])
                    continue
                merge = self._fork(t, st)
                if merge is not None:  # the block's continuation stopped at an outer merge
                    return _Branch(ctx.nodes, ctx.current, ctx.shape, merge)
        finally:
            ctx.nodes, ctx.current, ctx.shape = saved

    def _fork(self, t: str, starters: list) -> int | None:
        """Walk every branch from t, merge them into ParallelNodes, and leave
        ctx after the block; returns the merge that stopped the walk after it."""
        ctx = self.ctx
        shape, head = ctx.shape, ctx.nodes
        branches = []
        for st in starters:
            if st[0] == "merge":
                branches.append(_Branch([], t, shape, st[1]))
            else:
                branches.append(self.run(t, shape, st))
        ctx.nodes, ctx.current, ctx.shape = head, t, shape
        # combine branches meeting at one merge (whose inputs they all are)
        # until one branch is left
        while len(branches) > 1:
            merges = {b.merge for b in branches}
            done = False
            for m in merges:
                if m is None:
                    continue
                group = [b for b in branches if b.merge == m]
                ordered = self._match(m, group)
                if ordered is None:
                    continue
                node = self._merge_node(m, ordered)
                rest = [b for b in branches if b.merge != m]
                out = self.nodes[m].output[0]
                nxt = self.run(out, node.out_shape)
                branches = rest + [_Branch([node] + nxt.nodes, nxt.end, nxt.shape, nxt.merge)]
                done = True
                break
            if not done:
                names = sorted({self.nodes[m].name or self.nodes[m].op_type for m in merges if m is not None})
                why = ("branches of tensor %r do not meet at one merge node (%s): the graph is not "
                       "series-parallel" % (t, ", ".join(names) or "they reach the output separately"))
                ctx.problems.append(Unsupported(t, "-", ctx.opset, why))
                raise _Abort
        b = branches[0]
        ctx.nodes = head + b.nodes
        ctx.current, ctx.shape = b.end, b.shape
        return b.merge

    def _match(self, m: int, group: list):
        """Order the branches by the merge's data inputs, or None when the
        merge reads a tensor that no branch of this fork ends in."""
        want = self._dyn(self.nodes[m])
        if len(want) != len(group):
            return None
        pool, ordered = list(group), []
        for t in want:
            hit = next((b for b in pool if b.end == t), None)
            if hit is None:
                return None
            pool.remove(hit)
            ordered.append(hit)
        return ordered

    def _merge_node(self, m: int, branches: list) -> ParallelNode:
        node, ctx = self.nodes[m], self.ctx
        op = node.op_type
        shapes = [b.shape for b in branches]
        in_shape = self.ctx.shape
        try:
            if op not in MERGE_OPS:
                dyn = self._dyn(node)
                raise Skip(f"{op} reads {len(dyn)} tensors computed from the data ({', '.join(dyn)}); certlib "
                           "needs every input but the first to be a constant (a product or a data-dependent "
                           "parameter is not Lipschitz-bounded)")
            if any(t in ctx.consts for t in node.input if t):
                raise Skip("merges branches with a constant input")
            if op in ("Add", "Sub", "Sum", "Max", "Min"):
                if len(set(shapes)) != 1:
                    raise Skip(f"merges branches of different shapes {shapes} (broadcasting is not supported)")
                merge = {"Add": "add", "Sub": "add", "Sum": "add", "Max": "max", "Min": "min"}[op]
                signs = (1.0, -1.0) if op == "Sub" else (1.0,) * len(branches)
                return ParallelNode(node.name, op, in_shape, shapes[0], branches=[b.nodes for b in branches],
                                    merge=merge, signs=signs)
            if op == "Concat":
                rank = len(shapes[0])
                if any(len(s) != rank for s in shapes):
                    raise Skip("Concat of tensors of different rank")
                axis = sample_axis(_attrs(node).get("axis", 0), shapes[0], "Concat axis") + 1
                if any(s[:axis - 1] + s[axis:] != shapes[0][:axis - 1] + shapes[0][axis:] for s in shapes):
                    raise Skip(f"Concat of incompatible shapes {shapes}")
                out = list(shapes[0])
                out[axis - 1] = sum(s[axis - 1] for s in shapes)
                return ParallelNode(node.name, op, in_shape, tuple(out), branches=[b.nodes for b in branches],
                                    merge="concat", axis=axis - 1)
            raise Skip(f"{op} of two data tensors is not Lipschitz-bounded by certlib")
        except Skip as e:
            self._fail(node, str(e))
            raise _Abort from None


def walk(ctx: Ctx, nodes: list, in_name: str, shape: tuple, out_name: str, shapes: dict) -> list:
    """The IR node list of the whole graph (problems are recorded in ctx)."""
    w = Walker(ctx, nodes, out_name, shapes)
    # a merge reached by the main walk (not from a fork) reads a tensor from
    # outside any block: report it
    try:
        b = w.run(in_name, shape)
        if b.merge is not None:
            m = nodes[b.merge]
            ctx.fail(m, "merges a tensor with one that does not branch from it (not series-parallel)")
            return []
        ctx.current, ctx.shape = b.end, b.shape
        return b.nodes
    except _Abort:
        return []
