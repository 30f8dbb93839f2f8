"""GloRo certification with per-pair constants (proofs/gloro_margin.md, proofs/margin_slack.md).

For a sample with float64 logits f (computed by the IR with a rigorous bound
``err`` on ||f_computed - f_exact||_2), predicted class y = argmax f and each
j != y:

    margin_j = f_y - f_j,   slack = sqrt(2) * err  (+ rounding of the subtraction)
    certified  iff  margin_j - slack > eps * K_yj   for every j != y   (strict)

and the certified radius is min_j (margin_j - slack) / K_yj (0 when not
certified).  Ties, NaN and Inf never certify.  Only a :class:`Bound`-derived
K is accepted: ``certify`` refuses an Analysis built from estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from certlib.bounds import Bound, UnsoundError
from certlib.ir.graph import U64

SQRT2_UP = math.nextafter(math.sqrt(2.0), math.inf)


def parse_eps(text: str | float) -> float:
    """Parse '36/255', '0.3' or a float into the smallest double >= the real value
    (so a certificate at the returned eps covers the eps the user wrote)."""
    if isinstance(text, (int, float)):
        v = float(text)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {text!r}")
        return v
    s = str(text).strip()
    try:
        fr = Fraction(s)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"eps must be a number or a fraction like 36/255, got {text!r}") from None
    if fr < 0:
        raise ValueError(f"eps must be >= 0, got {text!r}")
    v = float(fr)
    if Fraction(v) < fr:
        v = math.nextafter(v, math.inf)
    return v


@dataclass
class Result:
    pred: np.ndarray        # int, -1 when logits are not finite
    correct: np.ndarray     # bool
    certified: np.ndarray   # bool
    radius: np.ndarray      # float, certified radius (0 when not certified)
    margins: np.ndarray     # (N, C) f_y - f_j - slack (float64), +inf at j == y
    slack: np.ndarray       # (N,)
    eps: float

    @property
    def n(self) -> int:
        return int(self.pred.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float(self.correct.mean()) if self.n else 0.0

    @property
    def vra(self) -> float:
        return float((self.certified & self.correct).mean()) if self.n else 0.0


def certify(logits: np.ndarray, err: np.ndarray, labels: np.ndarray, K: np.ndarray,
            body: Bound, eps: float) -> Result:
    """Certify every sample at radius eps.  ``body`` must be a proven Bound (it
    is the L_body from which K was built); anything else raises UnsoundError."""
    if not isinstance(body, Bound):
        raise UnsoundError(f"certify needs a proven Bound, got {type(body).__name__}")
    f = np.asarray(logits, dtype=np.float64)
    N, C = f.shape
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (C, C) or np.any(~np.isfinite(K)) or np.any(K < 0):
        raise ValueError("K must be a finite non-negative (C, C) matrix")
    err = np.asarray(err, dtype=np.float64)
    finite = np.all(np.isfinite(f), axis=1) & np.isfinite(err)
    pred = np.where(finite, np.argmax(np.where(np.isfinite(f), f, -np.inf), axis=1), -1)
    fy = f[np.arange(N), np.maximum(pred, 0)]
    # raw = fl(f_y - f_j) has relative error <= u; the lower bound below is
    # computed with three more roundings, each <= u * (|raw| + slack): the
    # subtracted 6u(|raw| + slack) + 2^-1000 covers all of them (proofs/margin_slack.md)
    with np.errstate(invalid="ignore", over="ignore"):
        return _decide(f, err, finite, pred, fy, labels, K, eps, N, C)


def _decide(f, err, finite, pred, fy, labels, K, eps, N, C) -> Result:
    raw = fy[:, None] - f
    slack = err * SQRT2_UP * (1 + 2 * U64)
    mag = np.abs(raw) + slack[:, None]
    margins = raw - slack[:, None] - mag * (6 * U64) - 2.0 ** -1000
    margins = np.nextafter(margins, -np.inf)
    Ky = K[np.maximum(pred, 0)]  # (N, C) K_{y, j}
    rhs = np.nextafter(eps * Ky, np.inf)
    others = np.ones((N, C), dtype=bool)
    others[np.arange(N), np.maximum(pred, 0)] = False
    ok = np.where(others, margins > rhs, True)
    certified = finite & np.all(ok, axis=1)
    # radius: min_j margin_j / K_yj, rounded down; a zero K_yj (identical rows)
    # means the two logits differ only by the bias: certified at every radius
    # iff the margin is positive.
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(Ky > 0, margins / Ky, np.where(margins > 0, np.inf, -np.inf))
    r = np.where(others, np.nextafter(r, -np.inf), np.inf)
    radius = np.min(r, axis=1)
    radius = np.where(finite & (radius > 0), radius, 0.0)
    labels = np.asarray(labels)
    margins_out = np.where(others, margins, np.inf)
    return Result(pred.astype(np.int64), (pred == labels), certified, radius, margins_out,
                  slack, eps)


def estimate_vra(logits: np.ndarray, labels: np.ndarray, K_estimate: np.ndarray, eps: float) -> float:
    """VRA computed from ESTIMATED constants (published code's way).  Not a
    certificate: reported with "sound": false for comparison only."""
    f = np.asarray(logits, dtype=np.float64)
    N = f.shape[0]
    pred = np.argmax(f, axis=1)
    fy = f[np.arange(N), pred]
    mask = np.ones_like(f, dtype=bool)
    mask[np.arange(N), pred] = False
    ok = np.where(mask, fy[:, None] - f > eps * K_estimate[pred], True).all(axis=1)
    return float((ok & (pred == np.asarray(labels))).mean()) if N else 0.0
