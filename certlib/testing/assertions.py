"""Assertions for users' test suites.  Both go through :func:`certlib.verify` /
:func:`certlib.lipschitz_bound`: a pass is a proof, never an estimate."""

from __future__ import annotations

import numpy as np

__all__ = ["assert_certified", "assert_lipschitz_at_most", "CertificationFailure"]


class CertificationFailure(AssertionError):
    """assert_certified failed; ``details`` holds one dict per failing sample."""

    def __init__(self, message: str, details: list[dict]):
        super().__init__(message)
        self.details = details


def _batch(x, y):
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    y = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    if y.ndim == 0:                 # one sample
        x, y = x[None], y[None]
    return x, y.astype(np.int64)


def assert_certified(model, x, y, eps, *, method: str = "exact", input_shape=None):
    """Assert that every sample of (x, y) is classified as y and certified at l2 radius eps.

    ``x`` is one sample (C,H,W) with an int label ``y``, or a batch with labels.
    On failure the message gives, per failing sample, the prediction, the proven
    margin to the worst other class, the margin eps needed, and the certified
    radius.  Returns the :class:`certlib.Report` when it passes."""
    from certlib.api import verify

    xs, ys = _batch(x, y)
    rep = verify(model, (xs, ys), eps, method=method, input_shape=input_shape)
    r, K = rep.result, rep.verify_report.analysis.K
    bad = np.flatnonzero(~(r.certified & r.correct))
    if bad.size == 0:
        return rep
    details, lines = [], []
    for i in bad[:10]:
        p = int(r.pred[i])
        Ky = K[max(p, 0)]
        with np.errstate(invalid="ignore"):
            gap = np.where(np.isfinite(r.margins[i]), r.margins[i] - rep.eps * Ky, np.inf)
        j = int(np.argmin(gap))
        d = {"index": int(i), "label": int(ys[i]), "pred": p, "other": j, "margin": float(r.margins[i, j]),
             "needed": float(rep.eps * Ky[j]), "radius": float(r.radius[i]), "eps": rep.eps}
        details.append(d)
        why = "misclassified" if p != d["label"] else "not certified"
        lines.append(f"  sample {i}: {why} (label {d['label']}, predicted {p}); margin to class {j} is "
                     f"{d['margin']:.6g}, needed > {d['needed']:.6g} (= eps {rep.eps:.6g} x pair bound "
                     f"{Ky[j]:.6g}); certified radius {d['radius']:.6g}")
    more = f"\n  ... and {bad.size - 10} more" if bad.size > 10 else ""
    raise CertificationFailure(f"{bad.size} of {r.n} sample(s) not certified at eps={rep.eps:.6g} "
                               f"(L_body {rep.lipschitz:.6g}, {method}):\n" + "\n".join(lines) + more, details)


def assert_lipschitz_at_most(model, L: float, *, method: str = "exact", input_shape=None):
    """Assert that certlib PROVES the logits' l2 Lipschitz constant is <= L.
    Returns the :class:`certlib.NetworkBound` when it passes."""
    from certlib.api import lipschitz_bound

    b = lipschitz_bound(model, method, input_shape=input_shape)
    if not b.value <= float(L):
        loose = sorted(b.stages, key=lambda s: -s.bound)[:3]
        raise AssertionError(
            f"proven Lipschitz bound {b.value:.6g} > {float(L):.6g} (body {float(b.body.value):.6g} x head "
            f"{float(b.head.value):.6g}, {b.method}); loosest stages: "
            + ", ".join(f"{s.name} {s.bound:.4g}" for s in loose))
    return b
