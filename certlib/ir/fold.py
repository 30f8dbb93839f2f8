"""Folding of elementwise affine maps into the adjacent linear operators.

A per-channel scale directly after a conv/dense is folded into its output rows,
one directly before (input normalisation) into its input columns, and a wrap
pad followed by a conv becomes one circular convolution.  Each folded item
records a lower bound on min|s_1 ... s_k| and the composed relative error of
the folded kernel against the exact one, which :mod:`certlib.ir.compose`
charges as a rounding margin (proofs/normalisation.md, proofs/margin_slack.md
"Folds").
"""

from __future__ import annotations

import math

import numpy as np

from certlib.bounds import up
from certlib.errors import UnsupportedModelError
from certlib.ir.blocks import circular_conv, sqrt_taps_fro
from certlib.ir.graph import (U64, ActivationNode, AffineNode, IndexNode, LinearNode, ParallelNode, ReshapeNode,
                              compose_rel, describe)
from certlib.verifiers.operators import Conv2d, Dense


def _fold_rounding_margin(op, rel: float) -> float:
    """||E||_2 bound for E = K~ - S K, the stored folded kernel K~ against the
    exact scaled kernel, elementwise |E| <= rel |S K| <= rel/(1-rel) |K~|
    (``rel`` from :func:`_fold_rel`, which composes every folded scale's error):
    a conv with kernel E has norm <= sum over taps ||E_tap||_2 <= sqrt(taps) ||E||_F."""
    if not rel < 1e-4:
        raise UnsupportedModelError(f"folded constants carry a relative error {rel:.3g}: too large to bound")
    w = op.weight if isinstance(op, Dense) else op.kernel
    return up(sqrt_taps_fro(w) * 1.0001 * rel * (1 + 4 * U64))


def _fold_rel(prev_rel: float, a: AffineNode) -> float:
    """Relative error of fl(K' * s) against the exact K * s_1 ... s_k, given
    K' off by ``prev_rel``: one rounding u per multiplication, plus the stored
    scale's own error (proofs/margin_slack.md, "Folds")."""
    return compose_rel(prev_rel, compose_rel(U64, a.const_err))


def _smin_down(prev: float, a: AffineNode, s: np.ndarray) -> float:
    """Lower bound on min |exact s_1 ... s_k| (the folded scales' product)."""
    m = float(np.min(np.abs(s))) * (1 - a.const_err)
    return math.nextafter(prev * m * (1 - 4 * U64), 0.0) if m > 0 else 0.0


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
    factor is ("folded", lower bound on min|s_1...s_k|, indices of the affine
    nodes, relative error of the folded kernel against the exact one).  A per-channel scale
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
    # a second scale after an already folded item composes with the first:
    # the folded kernel is S_k ... S_1 W, its error every fold's rounding
    lin = nodes[prev[0][0]]
    rel0, smin0, aff0 = (prev[2][3], prev[2][1], prev[2][2]) if isinstance(prev[2], tuple) else \
        (lin.weight_rel_err, 1.0, [])
    factor = ("folded", _smin_down(smin0, n, s), aff0 + [it[0][0]], _fold_rel(rel0, n))
    return (prev[0] + it[0], new, factor, prev[3] + " + affine (folded)")


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
    factor = ("folded", _smin_down(1.0, a, s), [prev[0][0]], _fold_rel(nodes[it[0][0]].weight_rel_err, a))
    return (prev[0] + it[0], new, factor, "affine (folded) + " + it[3])
