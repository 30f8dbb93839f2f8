"""Recognise a dense stack in the IR body and bound it as a whole with the
multi-layer LipSDP (certlib.verifiers.lipsdp; proofs/lipsdp.md).

The body nodes must all be: reshapes (identity on the flat vector), Dense
layers on vectors (stored weight exact: ``weight_rel_err == 0``), elementwise
affine maps with exact constants (a diagonal dense layer), and activations
with a quadratic constraint: ReLU, LeakyReLU, Abs (slope sectors), MaxMin in
any of its layouts and GroupSort (comparators).  Anything else: None, and the
per-layer product stands.
"""

from __future__ import annotations

import numpy as np

from certlib.ir.evaluate import ACTIVATIONS
from certlib.ir.graph import ActivationNode, AffineNode, LinearNode, ReshapeNode
from certlib.verifiers.operators import Dense

_SECTORS = {"relu": (0.0, 1.0), "abs": (-1.0, 1.0)}


def _pairs(act: ActivationNode, n: int):
    """Comparator stages (lists of (hi position, lo position)) of a MaxMin /
    GroupSort node on a vector of n entries, read off the node's own function
    applied to position labels (so any layout is handled the same way)."""
    if act.activation in ("minmax", "minmax_rev", "minmax_pairs", "minmax_pairs_rev"):
        import torch

        adjacent = act.activation.startswith("minmax_pairs")
        idx = torch.arange(n).reshape(1, n)
        if adjacent:
            t = idx.reshape(1, n // 2, 2)
            a, b = t[:, :, 0].ravel(), t[:, :, 1].ravel()
        else:
            a, b = idx[:, : n // 2].ravel(), idx[:, n // 2:].ravel()
        # the output slot of the first member (a) gets the max for "maxmin" orders
        hi_first = not act.activation.endswith("_rev")
        return [[(int(p), int(q)) if hi_first else (int(q), int(p)) for p, q in zip(a, b)]]
    if act.activation == "groupsort":
        P, g, Q = act.params["P"], act.params["g"], act.params["Q"]
        if P * g * Q != n:
            return None
        desc = act.params.get("descending", True)
        pos = np.arange(n).reshape(P, g, Q)
        stages = []
        for r in range(g):      # odd-even transposition sort: g rounds sort any input
            pr = []
            for i in range(r % 2, g - 1, 2):
                for p in range(P):
                    for q in range(Q):
                        lo_i, hi_i = int(pos[p, i, q]), int(pos[p, i + 1, q])
                        pr.append((lo_i, hi_i) if desc else (hi_i, lo_i))
            if pr:
                stages.append(pr)
        return stages
    return None


def dense_stack(nodes: list, stop: int):
    """(n0, stages) for nodes[:stop] when they form a supported dense stack
    with at least one nonlinear stage, else None."""
    stages, n0, nonlinear = [], None, False
    for n in nodes[:stop]:
        size = int(np.prod(n.in_shape))
        n0 = size if n0 is None else n0
        if isinstance(n, ReshapeNode):
            continue
        if isinstance(n, LinearNode):
            if not isinstance(n.op, Dense) or n.transposed or n.weight_rel_err or len(n.in_shape) != 1:
                return None
            stages.append(("dense", np.asarray(n.op.weight, dtype=np.float64)))
        elif isinstance(n, AffineNode):
            if n.const_err:
                return None
            s = np.broadcast_to(np.asarray(n.scale, dtype=np.float64), n.in_shape).ravel()
            stages.append(("dense", np.diag(s)))
        elif isinstance(n, ActivationNode):
            if tuple(n.in_shape) != tuple(n.out_shape) or n.activation not in ACTIVATIONS:
                return None
            if n.activation in _SECTORS:
                stages.append(("slope", *_SECTORS[n.activation]))
            elif n.activation == "leaky_relu":
                a = float(n.params["alpha"])
                stages.append(("slope", min(a, 1.0), max(a, 1.0)))
            else:
                cmp = _pairs(n, size) if (len(n.in_shape) == 1 or n.activation == "groupsort") else None
                if cmp is None:
                    return None
                stages += [("compare", p) for p in cmp]
            nonlinear = True
        else:
            return None
    if n0 is None or not nonlinear:
        return None
    return n0, stages
