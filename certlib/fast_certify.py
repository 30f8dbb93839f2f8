"""Certification from fast float32 logits, with the float64 path as fallback
(proofs/fast_forward.md, "identical decisions").

The float32 logits f32 carry a proven bound e32 on their distance to the
exact logits, so ``certify(f32, e32, ...)`` is sound on its own.  To make the
predictions and the certified set *identical* to the float64 path's, a sample
is kept only when its decision cannot differ from the float64 path's: the
float64 logits f64 are within e64 <= e32 of the exact ones, hence within
2 e32 of f32, so each margin f_y - f_j differs by at most 2 sqrt(2) e32, and
the float64 slack is at most sqrt(2) e32 (+ relative 6u).  Samples whose
margin comes within that band of 0 (prediction) or of eps K_yj
(certification) are recomputed on the float64 path.
"""

from __future__ import annotations

import numpy as np

from certlib.certify import SQRT2_UP, Result, certify
from certlib.ir.graph import U64

TINY = 2.0 ** -900


def settled(f32: np.ndarray, e32: np.ndarray, K: np.ndarray, eps: float, other=1.0):
    """(mask of the samples whose float32 decision -- prediction, certified
    or not -- equals the float64 path's, and whether each is certified).
    ``other``: the float64 path's error bound is at most ``other * e32`` (a
    number), or at most ``other`` itself (a per-sample array: forward32's
    ``other`` bound)."""
    f = np.asarray(f32, dtype=np.float64)
    N, C = f.shape
    e = np.asarray(e32, dtype=np.float64)
    eo = np.asarray(other, dtype=np.float64) if np.ndim(other) else float(other) * e
    finite = np.all(np.isfinite(f), axis=1) & np.isfinite(e)
    if N == 0:
        return finite, finite
    with np.errstate(invalid="ignore", over="ignore"):
        pred = np.argmax(np.where(np.isfinite(f), f, -np.inf), axis=1)
        raw = f[np.arange(N), pred][:, None] - f
        band = (2 * SQRT2_UP * (1 + 2.0 ** -20)) * (e + eo)[:, None] + 8 * U64 * np.abs(raw) + TINY
        slack64 = (SQRT2_UP * (1 + 2.0 ** -20)) * eo[:, None] + 8 * U64 * (np.abs(raw) + band) + TINY
        epsK = eps * K[pred]
        others = np.ones((N, C), dtype=bool)
        others[np.arange(N), pred] = False
        pred_ok = np.all(np.where(others, raw > band, True), axis=1)
        yes = np.all(np.where(others, raw - band - slack64 > epsK * (1 + 4 * U64) + TINY, True), axis=1)
        no = np.any(np.where(others, raw + band <= epsK * (1 - 4 * U64), False), axis=1)
    return finite & np.isfinite(eo) & pred_ok & (yes | no), yes


def certify_fast(f32, e32, labels, K, body, eps, fallback, other=1.0) -> tuple:
    """Certify with float32 logits where settled; ``fallback(indices)`` returns
    float64 (logits, err) for the others; ``other`` as in :func:`settled`.
    Returns (Result, logits, err, recomputed indices), with the float64 values
    in the recomputed rows."""
    f = np.array(f32, dtype=np.float64)
    e = np.array(e32, dtype=np.float64)
    ok, yes = settled(f, e, K, eps, other)
    # safety net: certify() itself on the float32 values must agree with the
    # band's decision (it does whenever the band argument holds)
    r32 = certify(f, e, labels, K, body, eps)
    ok &= (r32.certified == yes) & (r32.pred == np.argmax(f, axis=1) if len(f) else ok)
    redo = np.flatnonzero(~ok)
    if len(redo):
        f64, err64 = fallback(redo)
        f[redo] = f64
        e[redo] = err64
    return certify(f, e, labels, K, body, eps), f, e, redo


__all__ = ["settled", "certify_fast"]
