"""Compose per-operator Bounds into the body bound L and the pair constants K_ij.

The network is split into a body g (every node before the last dense layer) and
the head (that dense layer, with any following elementwise affine or reshape).
For logits f = W g(x) + b:  |(f_i - f_j)(x) - (f_i - f_j)(x')| <=
||w_i - w_j||_2 * L_g * ||x - x'||_2, so K_ij = L_g * ||w_i - w_j||_2
(proofs/gloro_margin.md).

L_g is the upward-rounded product of one Bound per stage (proofs/composition.md):
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
from certlib.ir.graph import (U64, AffineNode, Graph, LinearNode, ParallelBound, ParallelNode, ReshapeNode, describe,
                              gamma)
from certlib.verifiers.operators import Dense
from certlib.ir.op_bounds import (DENSE_LIMIT, METHODS, SDP_MAX_DIM, _explicit_for,  # noqa: F401
                               _sdp_preflight, _verifier, conv_matrix)
from certlib.ir.polynomial import polynomial_bound
from certlib.ir.residual import block_rule
from certlib.ir.fold import _chain_items, _fold_circular, _fold_rel, _fold_rounding_margin, _scale_vector
from certlib.ir.blocks import (_sum_rounding_margin, conv_norm_cheap, fuse_linear_branches, is_crelu,  # noqa: F401
                               selection_multiplicity)


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
    #: how ``body`` was composed: "product" of the stage bounds (the layers
    #: above), or "lipsdp": the multi-layer LipSDP of a dense stack
    #: (proofs/lipsdp.md), below that product; ``body_info`` says more
    body_rule: str = "product"
    body_info: dict = field(default_factory=dict)

    def body_how(self) -> str:
        """One line for reports: how the body bound was composed."""
        if self.body_rule == "lipsdp":
            return (f"multi-layer LipSDP over the dense stack, re-proven by Rump (product of stage bounds: "
                    f"{self.body_info.get('product', float('nan')):.9g})")
        return "product of the stage bounds"


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
        #: id(op) -> (op, proven bound, how): an operator met again (a block
        #: rule, every level of a polynomial block) is not proven twice
        self._proven: dict = {}

    def op_bound(self, op, margin_rel=None) -> tuple[float, str]:
        """One linear operator's bound (or Estimate value) and how it was found."""
        if self.estimate_only:
            # 500 iterations on the true operator (as published code at evaluation),
            # in float64 so the value itself carries no float32 rounding
            est = self.estimate(op, n_iter=500, dtype=np.float64)
            if not isinstance(est, Estimate):
                raise UnsoundError("power.estimate must return an Estimate")
            return float(est.value), "power-estimate (UNSOUND)"
        hit = self._proven.get(id(op))
        if hit is None or hit[0] is not op:
            target = _explicit_for(op, self.method)
            b = self.verify(target)
            if not isinstance(b, Bound):
                raise UnsoundError(f"verifier {self.method} returned {type(b).__name__}, not a Bound")
            hit = self._proven[id(op)] = (op, b.value, b.method + (" (explicit matrix)" if target is not op else ""))
        _, value, how = hit
        if margin_rel is not None:
            value = up_add(value, _fold_rounding_margin(op, margin_rel))
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
                how, label = getattr(nb, "how", "composition (proofs/composition.md)"), describe(n0)
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
                lin_node = next(nodes[j] for j in idx if isinstance(nodes[j], LinearNode))
                rel = factor[3] if isinstance(factor, tuple) else lin_node.weight_rel_err
                value, how = self.op_bound(op, rel or None)
            body = up_mul(body, value)
            if isinstance(factor, tuple) and factor[0] == "circular":
                node_bounds[idx[0]] = n0.lipschitz
            elif not isinstance(n0, ParallelNode):
                node_bounds[idx[0]] = value
            if isinstance(factor, tuple) and factor[0] == "folded":  # ||A|| <= ||S A|| / min|S|
                smin = factor[1]
                lin = next(j for j in idx if isinstance(nodes[j], LinearNode))
                node_bounds[lin] = up(value / smin) if smin > 0 else math.inf
                for j in factor[2]:  # every folded affine keeps its own bound
                    node_bounds[j] = up(nodes[j].lipschitz())
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
            poly = None if self.estimate_only else polynomial_bound(node, self.op_bound)
            if poly is not None and (res is None or poly[0] < res[0]):   # q(A), A skew: one normal operator
                res = poly
            if res is not None and res[0] < value:   # x + A s(Bx + b) or q(A) as one block
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
    rounding = head.weight_rel_err  # stored head weight vs exact (computed in the graph)
    for n in g.nodes[h + 1:]:
        node_bounds[g.nodes.index(n)] = up(n.lipschitz()) if isinstance(n, AffineNode) else 1.0
        if isinstance(n, AffineNode):
            s = _scale_vector(n, W.shape[0]) if len(n.in_shape) == 1 else None
            if s is None:
                raise UnsupportedModelError("an elementwise map after the head is not per-class")
            if not np.all(np.abs(s) == 1.0) or n.const_err:
                rounding = _fold_rel(rounding, n)
            W = W * s[:, None]
    node_bounds[h] = float("nan")  # filled below (the head's spectral norm is not needed)
    rule, info = "product", {}
    if method == "sdp" and not estimate_only:
        if progress is not None:
            progress("the body as one dense stack (multi-layer LipSDP)")
        ml, info = _multilayer(g, h, body)
        if ml is not None:
            body, rule = ml.value, "lipsdp"
    if estimate_only:
        body_val: Bound | Estimate = Estimate(body, "power-estimate")
    elif rule == "lipsdp":
        body_val = Bound(body, method, "multi-layer LipSDP, re-proven by Rump (proofs/lipsdp.md)", info=info)
    else:
        body_val = Bound(body, method, "upward-rounded product of per-stage bounds")
    K = pair_constants(W, float(body), rounding)
    # the forward-error recursion needs a bound for the head as well: ||W||_2 <= ||W||_F
    node_bounds[h] = up(float(np.linalg.norm(W)) * (1 + gamma(W.size + 2)) * (1 + rounding + U64))
    return Analysis(body_val, W, rounding, K, layers, node_bounds, method if not estimate_only else "power",
                    not estimate_only, time.perf_counter() - t0, h, fold_inputs, rule, info)


def _multilayer(g: Graph, h: int, product: float):
    """The multi-layer LipSDP Bound of a dense-stack body (None when the body
    is not one, the LMI is too large, or no certificate was proven; the
    per-layer product then stands), and what happened."""
    from certlib.ir.dense_stack import dense_stack
    from certlib.verifiers.lipsdp import lipsdp_bound

    st = dense_stack(g.nodes, h)
    if st is None:
        return None, {"lipsdp": "not a dense stack"}
    try:
        b = lipsdp_bound(*st)
    except (ValueError, RuntimeError) as e:
        return None, {"lipsdp": f"not used: {e}"}
    if not isinstance(b, Bound):
        raise UnsoundError("lipsdp_bound must return a Bound")
    info = {"lipsdp": b.value, "product": product, **{k: b.info[k] for k in ("solver", "dim", "seconds")}}
    return (b if b.value < product else None), info


def pair_constants(W: np.ndarray, L: float, rounding: float = 0.0) -> np.ndarray:
    """K[i, j] >= L * ||w_i - w_j||_2 in exact arithmetic (diagonal 0), by the rule the independent
    checker applies (proofs/gloro_margin.md): with s = fsum(fl(fl(w_j - w_i)^2)) (correctly rounded),
    K = up(L * up(sqrt(up(up(s + D eta) * up(1 + 8u))))), up = nextafter(., +inf): bit for bit the
    checker's value, so a certificate's K is accepted.  Rows whose squares overflow fall back to the
    scaled norm times (1 + gamma_{D+4}).  ``rounding`` is a per-entry relative error already present
    in W (from folding a scale), covered by adding rounding*(||w_i|| + ||w_j||)."""
    W = np.asarray(W, dtype=np.float64)
    C, D = W.shape
    fac = 1.0 + gamma(D + 4)
    up8 = math.nextafter(1.0 + 8 * U64, math.inf)
    rows = np.linalg.norm(W, axis=1) * fac
    K = np.zeros((C, C))
    for i in range(C):
        s = np.array([math.fsum(v) for v in (W - W[i]) ** 2])
        k = np.nextafter(np.sqrt(np.nextafter(np.nextafter(s + D * 2.0 ** -1074, np.inf) * up8, np.inf)), np.inf)
        k = np.nextafter(L * k, np.inf)
        if not np.all(np.isfinite(k)):                            # squares overflow: the scaled norm
            k = np.nextafter(np.linalg.norm(W - W[i], axis=1) * fac * L, np.inf) * (1 + 2 * U64)
        if rounding:
            k = np.nextafter(k + np.nextafter(L * rounding * 1.01 * (rows + rows[i]), np.inf), np.inf)
        K[i] = k
    np.fill_diagonal(K, 0.0)
    return K


def body_stages(g: Graph, stop: int, fold_inputs: bool = False) -> list:
    """The composition factors of nodes ``[0, stop)`` as :func:`analyze` bounds
    them, in order: ``(node indices, operator or None, factor, label)`` items
    (``factor`` None: bounded by a verifier or a block rule; a number: a fixed
    Lipschitz constant; ``("folded", ...)``: an affine folded into its linear
    neighbour).  The certificate writer pairs these with ``Analysis.layers``."""
    return _chain_items(g.nodes, 0, stop, fold_inputs=fold_inputs)


__all__ = ["Analysis", "LayerBound", "METHODS", "DENSE_LIMIT", "SDP_MAX_DIM", "analyze", "body_stages",
           "conv_matrix", "fuse_linear_branches", "pair_constants", "selection_multiplicity", "split_head"]
