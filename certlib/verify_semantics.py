"""Certification under a floating-point semantics (proofs/float_semantics.md):
the float64 logits and their error bound at x, plus the execution-error bound
e_ball over the whole ball, from :mod:`certlib.ir.semantics`."""

from __future__ import annotations

import numpy as np

from certlib.certify import Result, certify
from certlib.ir.graph import Graph
from certlib.ir.semantics import Semantics, ball_forward, prepare


def certify_semantics(g: Graph, x: np.ndarray, y: np.ndarray, a, eps: float, sem: Semantics,
                      batch_size: int = 256, progress=None) -> tuple[Result, dict]:
    """(Result under ``sem``, extras).  A sample is certified iff every margin of
    the float64 logits minus sqrt(2) (e64 + e_ball) exceeds eps K_yj (strict):
    the executed logits at any x' of the ball are within e_ball of the exact
    ones, which are within eps K of the exact ones at x, which are within e64
    of the computed ones.  Radii are capped at eps (e_ball is a bound for the
    ball of radius eps only).  extras: e64, e_ball, norms (per sample, per node:
    upper bounds on the exact input norm at x) and the Result with e64 alone
    (its margins bound the exact margins at x)."""
    rules = prepare(g, sem)
    outs = []
    for i in range(0, len(x), batch_size):
        outs.append(ball_forward(g, rules, sem, x[i:i + batch_size], a.node_bounds, eps))
        if progress is not None:
            progress(min(i + batch_size, len(x)))
    if outs:
        f, e64, eb, norms = (np.concatenate([o[k] for o in outs]) for k in range(4))
    else:
        f, e64, eb = np.zeros((0, g.num_classes)), np.zeros(0), np.zeros(0)
        norms = np.zeros((0, len(g.nodes)))
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.nextafter(e64 + eb, np.inf)
    res = certify(f, total, y, a.K, a.body, eps)
    res.radius = np.minimum(res.radius, eps)
    at_x = certify(f, e64, y, a.K, a.body, eps)
    return res, {"e64": e64, "e_ball": eb, "norms": norms, "at_x": at_x, "logits": f}


__all__ = ["certify_semantics"]
