"""Compose per-operator Bounds into the body bound L and the pair constants K_ij.

The network is split into a body g (every node before the last dense layer) and
the head (that dense layer, with any following elementwise affine or reshape).
For logits f = W g(x) + b:  |(f_i - f_j)(x) - (f_i - f_j)(x')| <=
||w_i - w_j||_2 * L_g * ||x - x'||_2, so K_ij = L_g * ||w_i - w_j||_2
(proofs/gloro_margin.md).

L_g is the upward-rounded product of one Bound per stage (SOUNDNESS.md rule 3):
linear operators bounded by the chosen verifier, elementwise affine maps by
max|scale| (or folded into the adjacent conv/dense, with the rounding of the
fold added), reshapes by 1, ReLU/MinMax by 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from certlib.bounds import Bound, Estimate, UnsoundError, up, up_add, up_mul, up_sqrt
from certlib.errors import UnsupportedModelError
from certlib.ir.graph import (U64, ActivationNode, AffineNode, Graph, IndexNode, LinearNode, ParallelBound, ParallelNode,
                           ReshapeNode, describe, gamma)
from certlib.verifiers.operators import Conv2d, Dense
from certlib.ir.op_bounds import (DENSE_LIMIT, METHODS, SDP_MAX_DIM, _explicit_for,  # noqa: F401
                               _sdp_preflight, _verifier, conv_matrix)
from certlib.ir.residual import block_rule
from certlib.ir.blocks import (_sum_rounding_margin, circular_conv, conv_norm_cheap, is_crelu,  # noqa: F401
                            fuse_linear_branches, selection_multiplicity, sqrt_taps_fro)


@dataclass
class LayerBound:
    name: str
    op: str
    bound: float
    method: str
    seconds: float = 0.0
    sound: bool = True

    def as_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "bound": self.bound, "method": self.method,
                "seconds": round(self.seconds, 4)}


@dataclass
class Analysis:
    """Result of bounding a graph.  ``body`` is a Bound when ``sound``; with
    ``estimate_only`` it is an Estimate and nothing here may certify."""

    body: Bound | Estimate
    head_weight: np.ndarray          # rows w_k (after folding following affines)
    head_rounding: float             # per-entry relative rounding already in head_weight
    K: np.ndarray                    # (C, C) upper bounds of L_body * ||w_i - w_j||
    layers: list = field(default_factory=list)
    node_bounds: list = field(default_factory=list)  # per graph node (for forward error)
    method: str = "exact"
    sound: bool = True
    seconds: float = 0.0
    head_index: int = -1
    fold_inputs: bool = True


def split_head(g: Graph) -> int:
    """Index of the head dense node; after it only affine/reshape nodes."""
    for i in range(len(g.nodes) - 1, -1, -1):
        n = g.nodes[i]
        if isinstance(n, (AffineNode, ReshapeNode)):
            continue
        if isinstance(n, LinearNode) and isinstance(n.op, Dense):
            return i
        break
    raise UnsupportedModelError(
        "the network must end with a dense (Gemm/MatMul) layer, optionally followed by "
        "elementwise affine maps: that layer is the GloRo head")


def _fold_rounding_margin(op, const_err: float = 0.0) -> float:
    """||E||_2 bound for E = fl(s*K) - s*K elementwise |E| <= u |fl(s*K)|(1+u):
    a conv with kernel E has norm <= sum over taps ||E_tap||_2 <= sqrt(taps) ||E||_F."""
    w = op.weight if isinstance(op, Dense) else op.kernel
    return up(sqrt_taps_fro(w) * 1.0001 * (U64 + const_err) * (1 + 4 * U64))


def _scale_vector(a: AffineNode, axis_len: int):
    """The affine's scale as a per-channel vector (axis 0 of the sample), or None."""
    s = np.asarray(a.scale, dtype=np.float64)
    shape = a.in_shape
    if s.ndim == 0:
        return np.full(axis_len, float(s))
    if s.ndim != len(shape):
        s = s.reshape((1,) * (len(shape) - s.ndim) + s.shape)
    if all(d == 1 for d in s.shape[1:]) and s.shape[0] in (1, axis_len):
        return np.broadcast_to(s.reshape(-1), (axis_len,)).astype(np.float64)
    return None


def _chain_items(nodes: list, start: int, stop: int, fold_inputs: bool = True):
    """Fold trivial and per-channel affine maps into neighbouring linear ops.
    Returns (node_indices, op_or_None, factor, label) items; a folded item's
    factor is ("folded", s, index of the affine node).  A per-channel scale
    AFTER a linear op scales its output rows; with ``fold_inputs`` one directly
    BEFORE a linear op (input normalisation (x - mean) / std) scales its input
    columns, so the pair is bounded exactly instead of by max|1/std| * ||K||."""
    items = []
    i = start
    while i < stop:
        n = nodes[i]
        if isinstance(n, AffineNode) and np.all(np.abs(n.scale) == 1.0):
            items.append(([i], None, 1.0, "affine (|scale|=1)"))
        elif isinstance(n, AffineNode):
            items.append(([i], None, up(n.lipschitz()), "affine (max|scale|)"))
        elif isinstance(n, ReshapeNode):
            items.append(([i], None, 1.0, "reshape (isometry)"))
        elif isinstance(n, LinearNode):
            items.append(([i], n.op, None, describe(n)))
        elif isinstance(n, ActivationNode):
            items.append(([i], None, float(n.lipschitz), n.activation))
        elif isinstance(n, IndexNode):
            items.append(([i], None, float(n.lipschitz),
                          f"{n.fn} (moves/drops entries)" if n.lipschitz == 1.0 else f"{n.fn} (copies entries)"))
        elif isinstance(n, ParallelNode):
            items.append(([i], None, None, describe(n)))
        else:
            raise UnsupportedModelError(f"no Lipschitz rule for IR node {n.kind} ({n.name})")
        i += 1
    out = _merge_pairs(items, lambda prev, it: _fold_output_scale(nodes, prev, it))
    if fold_inputs:
        out = _merge_pairs(out, lambda prev, it: _fold_input_scale(nodes, prev, it))
    return out


def _merge_pairs(items: list, merge) -> list:
    """One left-to-right pass: ``merge(previous item, item)`` returns the item
    that replaces both, or None to keep them apart."""
    out = []
    for it in items:
        merged = merge(out[-1], it) if out else None
        if merged is not None:
            out[-1] = merged
        else:
            out.append(it)
    return out


def _fold_output_scale(nodes: list, prev, it):
    """A per-channel affine directly after a linear op: folded into its output rows."""
    n = nodes[it[0][0]]
    if not (prev[1] is not None and isinstance(n, AffineNode) and it[2] != 1.0
            and not nodes[prev[0][0]].transposed):
        return None
    op = prev[1]
    cout = op.weight.shape[0] if isinstance(op, Dense) else op.kernel.shape[0]
    s = _scale_vector(n, cout)
    if s is None or len(n.in_shape) != (1 if isinstance(op, Dense) else 3):
        return None
    if isinstance(op, Dense):
        new = Dense(op.weight * s[:, None])
    else:
        new = Conv2d(op.kernel * s[:, None, None, None], op.input_shape, op.stride, op.padding, op.dilation,
                     op.groups)
    return (prev[0] + it[0], new, ("folded", s, it[0][0]), prev[3] + " + affine (folded)")


def _fold_circular(nodes: list, items: list) -> list:
    """Merge a wrap Pad item and the plain conv item after it into one
    circular-convolution item (factor ("circular", kernel, grid, groups))."""
    def merge(prev, it):
        if not (len(prev[0]) == 1 and len(it[0]) == 1 and it[1] is not None
                and not isinstance(it[2], tuple) and not isinstance(prev[2], tuple)):
            return None
        circ = circular_conv(nodes[prev[0][0]], nodes[it[0][0]])
        if circ is None:
            return None
        return (prev[0] + it[0], None, ("circular", *circ), "wrap pad + " + it[3] + " (circular)")
    return _merge_pairs(items, merge)


def _fold_input_scale(nodes: list, prev, it):
    """A per-channel affine item directly before a linear item: folded into its
    input columns (K diag(s); zero padding commutes with a per-channel scale,
    so the pair's linear part is exactly the scaled operator)."""
    n = nodes[it[0][0]]
    if not (it[1] is not None and not isinstance(it[2], tuple) and isinstance(n, LinearNode)
            and not n.transposed and prev[1] is None and isinstance(nodes[prev[0][0]], AffineNode)
            and prev[2] != 1.0 and len(prev[0]) == 1):
        return None
    a, op = nodes[prev[0][0]], it[1]
    cin = op.weight.shape[1] if isinstance(op, Dense) else op.input_shape[0]
    s = _scale_vector(a, cin)
    if s is None or len(a.in_shape) != (1 if isinstance(op, Dense) else 3):
        return None
    if isinstance(op, Dense):
        new = Dense(op.weight * s[None, :])
    else:
        cg, og = op.kernel.shape[1], op.kernel.shape[0] // op.groups
        cols = np.array([[s[(o // og) * cg + c] for c in range(cg)] for o in range(op.kernel.shape[0])])
        new = Conv2d(op.kernel * cols[:, :, None, None], op.input_shape, op.stride, op.padding, op.dilation,
                     op.groups)
    return (prev[0] + it[0], new, ("folded", s, prev[0][0]), "affine (folded) + " + it[3])


class _Bounder:
    """Bounds a node list stage by stage (recursing into ParallelNodes)."""

    def __init__(self, method: str, estimate_only: bool, progress, fold_inputs: bool = True):
        self.method, self.estimate_only, self.progress = method, estimate_only, progress
        self.fold_inputs = fold_inputs
        self.verify = None
        if estimate_only:
            from certlib.verifiers.power import estimate as power_estimate

            self.estimate = power_estimate
        else:
            self.verify = _verifier(method)
        self.layers: list[LayerBound] = []

    def op_bound(self, op, margin_const_err=None) -> tuple[float, str]:
        """One linear operator's bound (or Estimate value) and how it was found."""
        if self.estimate_only:
            # 500 iterations on the true operator (as published code at evaluation),
            # in float64 so the value itself carries no float32 rounding
            est = self.estimate(op, n_iter=500, dtype=np.float64)
            if not isinstance(est, Estimate):
                raise UnsoundError("power.estimate must return an Estimate")
            return float(est.value), "power-estimate (UNSOUND)"
        target = _explicit_for(op, self.method)
        b = self.verify(target)
        if not isinstance(b, Bound):
            raise UnsoundError(f"verifier {self.method} returned {type(b).__name__}, not a Bound")
        how = b.method + (" (explicit matrix)" if target is not op else "")
        value = b.value
        if margin_const_err is not None:
            value = up_add(value, _fold_rounding_margin(op, margin_const_err))
            how += " (+fold rounding)"
        return value, how

    def chain(self, nodes: list, stop: int | None = None, prefix: str = "") -> tuple[float, list]:
        """Upward-rounded product of the stage bounds of nodes[:stop], and the
        per-node bounds for the forward-error recursion."""
        stop = len(nodes) if stop is None else stop
        node_bounds: list = [1.0] * len(nodes)
        body = 1.0
        items = _chain_items(nodes, 0, stop, self.fold_inputs)
        if self.method == "exact" and not self.estimate_only:
            items = _fold_circular(nodes, items)
        for idx, op, factor, label in items:
            t1 = time.perf_counter()
            n0 = nodes[idx[0]]
            circ = isinstance(factor, tuple) and factor[0] == "circular"   # named after its conv
            name = prefix + (nodes[idx[-1] if circ else idx[0]].name or f"node{idx[0]}")
            if isinstance(n0, ParallelNode):
                value, nb = self.parallel(n0, name + "/")
                node_bounds[idx[0]] = nb
                how, label = getattr(nb, "how", "composition (SOUNDNESS.md 3)"), describe(n0)
            elif isinstance(factor, tuple) and factor[0] == "circular":
                from certlib.verifiers.svd import circular_conv_bound

                b = circular_conv_bound(*factor[1:])
                if not isinstance(b, Bound):
                    raise UnsoundError("circular_conv_bound must return a Bound")
                value, how = b.value, b.method + " (wrap pad + conv = circular conv)"
                node_bounds[idx[1]] = conv_norm_cheap(nodes[idx[1]].op)   # forward-error recursion only
            elif op is None:
                value, how = float(factor), "rule"
            else:
                folded = isinstance(factor, tuple)
                value, how = self.op_bound(op, nodes[factor[2]].const_err if folded else None)
            body = up_mul(body, value)
            if isinstance(factor, tuple) and factor[0] == "circular":
                node_bounds[idx[0]] = n0.lipschitz
            elif not isinstance(n0, ParallelNode):
                node_bounds[idx[0]] = value
            if isinstance(factor, tuple) and factor[0] == "folded":  # ||A|| <= ||sA|| / min|s|
                smin = float(np.min(np.abs(factor[1])))
                lin = idx[1] if factor[2] == idx[0] else idx[0]
                node_bounds[lin] = up(value / smin) if smin > 0 else math.inf
                node_bounds[factor[2]] = up(nodes[factor[2]].lipschitz())
            if op is not None or factor != 1.0 or n0.kind in ("activation", "parallel"):
                self.layers.append(LayerBound(name, label, value, how, time.perf_counter() - t1,
                                              not self.estimate_only))
            if self.progress is not None:
                self.progress(name)
        return body, node_bounds

    def parallel(self, node: ParallelNode, prefix: str) -> tuple[float, ParallelBound]:
        """A merged block: fused into one linear operator when every branch is
        linear (rule 2: x + Conv(x) is one conv), else composed by rule 3."""
        fused = fuse_linear_branches(node)
        if fused is not None:
            op, terms = fused
            if self.estimate_only:
                value, _ = self.op_bound(op)
            else:
                value, how = self.op_bound(op)
                value = up_add(value, _sum_rounding_margin(op, terms))
            return value, ParallelBound(value, [[1.0] * len(b) for b in node.branches])
        m = selection_multiplicity(node)
        if m is not None:  # concat of entry selections: sqrt(max copies of one entry)
            value = float(math.isqrt(m)) if math.isqrt(m) ** 2 == m else up_sqrt(m)
            return value, ParallelBound(value, [[1.0] * len(b) for b in node.branches])
        if is_crelu(node):  # concat(relu x, relu -x): 1 (relu and negation are exact)
            return 1.0, ParallelBound(1.0, [[1.0] * len(b) for b in node.branches])
        totals, inner = [], []
        for k, br in enumerate(node.branches):
            L, nb = self.chain(br, prefix=f"{prefix}{k}/")
            totals.append(L)
            inner.append(nb)
        if node.merge == "add":  # sum of the branch bounds (|sign| = 1)
            value = 0.0
            for L in totals:
                value = up_add(value, L)
            res = None if self.estimate_only or value <= 1.0 else block_rule(node, self.op_bound)
            if res is not None and res[0] < value:   # x + A s(Bx + b) as one block
                nb = ParallelBound(res[0], inner)
                nb.how = res[1]
                return res[0], nb
        else:  # concat / elementwise max / min: sqrt(sum L_b^2)
            sq = 0.0
            for L in totals:
                sq = up_add(sq, up_mul(L, L))
            value = up_sqrt(sq)
        return value, ParallelBound(value, inner)


def analyze(g: Graph, method: str = "exact", estimate_only: bool = False, progress=None,
            fold_inputs: bool = True) -> Analysis:
    """Bound every stage of the body and compute the K_ij matrix.  ``fold_inputs``
    folds a per-channel scale before a linear op into it (tighter; certificates
    need False: the checker bounds such a scale on its own).

    With ``estimate_only`` the per-operator numbers are raw power-iteration
    Estimates (what published code certifies with) and the result is marked
    unsound."""
    t0 = time.perf_counter()
    h = split_head(g)
    if method == "sdp" and not estimate_only:
        _sdp_preflight(g, _chain_items(g.nodes, 0, h, fold_inputs))
    bounder = _Bounder(method, estimate_only, progress, fold_inputs)
    body, node_bounds = bounder.chain(g.nodes, h)
    layers = bounder.layers
    # head: dense rows, then elementwise per-class affine maps folded in
    head = g.nodes[h]
    W = head.op.weight.copy()
    rounding = 0.0
    for n in g.nodes[h + 1:]:
        node_bounds[g.nodes.index(n)] = up(n.lipschitz()) if isinstance(n, AffineNode) else 1.0
        if isinstance(n, AffineNode):
            s = _scale_vector(n, W.shape[0]) if len(n.in_shape) == 1 else None
            if s is None:
                raise UnsupportedModelError("an elementwise map after the head is not per-class")
            if not np.all(np.abs(s) == 1.0) or n.const_err:
                rounding += (U64 + n.const_err) * (1 + U64)
            W = W * s[:, None]
    node_bounds[h] = float("nan")  # filled below (the head's spectral norm is not needed)
    if estimate_only:
        body_val: Bound | Estimate = Estimate(body, "power-estimate")
    else:
        body_val = Bound(body, method, "upward-rounded product of per-stage bounds")
    K = pair_constants(W, float(body), rounding)
    # the forward-error recursion needs a bound for the head as well: ||W||_2 <= ||W||_F
    node_bounds[h] = up(float(np.linalg.norm(W)) * (1 + gamma(W.size + 2)) * (1 + rounding + U64))
    return Analysis(body_val, W, rounding, K, layers, node_bounds, method if not estimate_only else "power",
                    not estimate_only, time.perf_counter() - t0, h, fold_inputs)


def pair_constants(W: np.ndarray, L: float, rounding: float = 0.0) -> np.ndarray:
    """K[i, j] >= L * ||w_i - w_j||_2 in exact arithmetic (diagonal 0).

    fl(w_j - w_i) has relative error <= u per entry and the computed norm
    (sum of D squares, sqrt) relative error <= gamma_{D+2}; both are covered by
    the factor (1 + gamma_{D+4}).  ``rounding`` is a per-entry relative error
    already present in W (from folding a scale), covered by adding
    rounding*(||w_i|| + ||w_j||)."""
    W = np.asarray(W, dtype=np.float64)
    C, D = W.shape
    fac = 1.0 + gamma(D + 4)
    rows = np.linalg.norm(W, axis=1) * fac
    K = np.zeros((C, C))
    for i in range(C):
        d = np.linalg.norm(W - W[i], axis=1) * fac
        if rounding:
            d = d + rounding * 1.01 * (rows + rows[i])
        K[i] = d
    K = np.nextafter(K * L, np.inf) * (1 + 2 * U64)
    np.fill_diagonal(K, 0.0)
    return K


__all__ = ["Analysis", "LayerBound", "METHODS", "DENSE_LIMIT", "SDP_MAX_DIM", "analyze", "conv_matrix",
           "fuse_linear_branches", "pair_constants", "selection_multiplicity", "split_head"]
