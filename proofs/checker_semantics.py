"""The independent checker's part for certificates under a floating-point semantics
(proofs/float_semantics.md, "Certificates"; proofs/certificate.md).

A certificate with ``semantics.name`` float32 / bfloat16 / float16 claims that the ONNX
model EXECUTED in that format predicts ``pred`` on the whole ball.  It records, per sample
and per graph stage, an upper bound ``stage_norms[k]`` on the exact l2 norm of the stage's
input at x.  This file (no certlib import) checks each recorded norm against this checker's
own forward pass (its norm plus its rigorous error bound must not exceed it: a lowered
norm is rejected), then re-derives the execution-error bound over the ball from the
recorded norms with its own rules and upward rounding:
``N_k = norm_k + P_k eps + E_{k-1}``, ``E_k = L_k E_{k-1} + r_k(N_k)``, every pre-rounding
value bounded below the format's largest finite number.  Only chains of single-node items
(no folds) are read."""

from __future__ import annotations

import math

import numpy as np

try:
    from .checker_norms import F64, SQRT2, U, CheckFailed, fail, infl, norm_up, up, vup  # noqa: F401
except ImportError:                                               # standalone
    from checker_norms import F64, SQRT2, U, CheckFailed, fail, infl, norm_up, up, vup  # noqa: F401

#: name -> (u, tiny, largest finite); tiny >= the smallest normal (flush-to-zero included)
FORMATS = {"float32": (2.0 ** -24, 2.0 ** -125, float(np.finfo(np.float32).max)),
           "bfloat16": (2.0 ** -8, 2.0 ** -125, 3.3895313892515355e38),
           "float16": (2.0 ** -11, 2.0 ** -14, 65504.0)}
U32, T32 = 2.0 ** -24, 2.0 ** -125


def claim_text(name: str, acc: str) -> str:
    return ("For every sample with certified=true and every input x' with ||x' - x||_2 <= eps, and for every "
            "sample and every x' with ||x' - x||_2 < radius (radius <= eps), the ONNX model executed in "
            f"{name} (every stored value rounded to {name}, dot products accumulated in {acc}, any summation "
            "order, FMA or not; error model: proofs/float_semantics.md) predicts pred.")


def params(sem: dict):
    """(u, tiny, max, u_acc, tiny_acc, split) for the certificate's semantics block."""
    name, acc = sem.get("name"), sem.get("accumulate")
    if name not in FORMATS or acc not in ("float32", "storage") or (name == "float32" and acc != "float32"):
        fail("semantics", f"unknown semantics {name!r} / accumulation {acc!r}")
    u, t, mx = FORMATS[name]
    if name == "float32" or acc == "storage":
        return u, t, mx, u, t, False
    return u, t, mx, U32, T32, True


def gam_u(k, u):
    if k * u >= 0.25:
        fail("rounding", f"gamma_{k} is too large for accumulation with u = {u!r}")
    return up(up(k * u) / (1.0 - k * u) * (1 + 4 * U))


def _schur(W, g) -> float:
    rows = W.reshape(len(W), -1).sum(axis=1)
    cols = W.reshape(g, len(W) // g, W.shape[1], -1).sum(axis=(1, 3))
    return up(math.sqrt(up(float(infl(rows.max(), W[0].size)) * float(infl(cols.max(), W.size)))))


def rule(st, P):
    """(rel, abs, mrel, mabs) of one stage: r <= rel N + abs, pre-rounding norms <= mrel N + mabs."""
    u, t, mx, ua, ta, split = P
    ue = up((1 + u) * (1 + ua) - 1 + 4 * U) if split else u
    top = up(t + ta) if split else t
    kind = st["kind"]
    if kind in ("reshape", "relu", "minmax"):
        return 0.0, 0.0, 0.0, 0.0
    m = int(np.prod(st["out"]))
    sq = up(math.sqrt(m) * (1 + 2 * U))
    if kind == "affine":
        c = np.abs(np.asarray(st["c"], F64))
        if float(c.max(initial=0.0)) * (1 + u) > mx:
            fail(st["name"], "a constant does not fit the format")
        op = st["op"]
        smax = float(c.max()) if op == "Mul" else up(1.0 / float(c.min())) if op == "Div" else 1.0
        tn = up(norm_up(np.broadcast_to(c, st["out"])) * (1 + 4 * U)) if op in ("Add", "Sub") else 0.0
        k = up((1 + u) / (1 - u) * (1 + ue) ** 2 * (1 + 16 * U) - 1)
        return (up(k * smax + t * (1 + ue) ** 2), up(k * tn + sq * (t * (1 + ue) + 2 * top)),
                up((1 + k) * smax + 2 * t), up((1 + k) * tn + 3 * sq * top))
    W = np.abs(st["W"])
    if float(W.max(initial=0.0)) * (1 + u) > mx or (st["bias"] is not None
                                                     and float(np.abs(st["bias"]).max()) * (1 + u) > mx):
        fail(st["name"], "a weight or bias does not fit the format")
    g = st["geo"].get("group", 1)
    A, A1 = _schur(W, g), _schur(np.ones_like(W), g)
    n = W[0].size + 1
    has_b = st["bias"] is not None
    B = up(norm_up(st["bias"]) * up(math.sqrt(m // len(W)))) if has_b else 0.0
    Aw, Ad = up((1 + u) * A + t * A1), up(u * A + t * A1)
    Bw, Bd = (up((1 + u) * B + t * sq), up(u * B + t * sq)) if has_b else (0.0, 0.0)
    k = (2 if has_b else 1) if split else 0
    grow = up((1 + (u if split else 0.0)) ** k * (1 + 16 * U))
    c1 = up((1 + gam_u(n, ua)) * grow - 1 + 16 * U)
    at = up(sq * n * ta)
    return (up(c1 * Aw + Ad), up(c1 * Bw + Bd + at * grow + sq * k * t),
            up((1 + gam_u(n, ua)) * Aw * grow), up(((1 + gam_u(n, ua)) * Bw + at) * grow))


def ball_errors(stages, lips, x, norms, eps, sem):
    """Per sample, the bound on ||executed logits - exact logits|| over B(x, eps) from the recorded
    norms (inf where a value may overflow)."""
    P = params(sem)
    u, t, mx, *_ = P
    ue = up((1 + u) * (1 + P[3]) - 1 + 4 * U) if P[5] else u
    rules = [rule(st, P) for st in stages]
    x = np.asarray(x, F64).reshape(len(x), -1)
    N = vup(vup(norm_up(x, 1)) + eps)
    E = vup(vup(N * ue) + up(math.sqrt(x.shape[1]) * t))
    ok = N <= mx
    Lp = 1.0
    for k, ((rel, ab, mrel, mab), L) in enumerate(zip(rules, lips)):
        N = vup(vup(norms[:, k] + up(Lp * eps)) + E)
        ok &= vup(vup(N * mrel) + mab) <= mx
        E = vup(vup(E * L) + vup(vup(N * rel) + ab))
        Lp = up(Lp * L)
    return np.where(ok & np.isfinite(E), E, np.inf)


def stage_norms_at_x(items, x, apply):
    """This checker's own upper bounds on the exact input norm of every stage at x: the norm of its
    float64 value plus its rigorous error bound (items of one stage each; ``apply`` is the checker's)."""
    h, e, out = np.asarray(x, F64), np.zeros(len(x)), []
    for sts, L in items:
        if len(sts) != 1:
            fail("semantics", "folded operators are not covered under a floating-point semantics")
        out.append(vup(norm_up(h, 1) + e))
        h, r, _ = apply(sts[0], h)
        e = vup(vup(e * L) + r)
    return np.stack(out, axis=1) if out else np.zeros((len(x), 0))


def check_norms(recorded, own):
    """Every recorded norm must be >= this checker's own upper bound (a lowered norm is rejected)."""
    bad = np.argwhere(~(recorded >= own))
    if bad.size:
        i, k = bad[0]
        fail(f"sample {i}", f"stage_norms[{k}] = {recorded[i, k]!r} is below this checker's bound {own[i, k]!r}")


def lower_over_ball(lo, recorded, items, x, eps, rad, sem, apply):
    """The margin lower bounds ``lo`` (at x, exact model) lowered by sqrt(2) times the execution-error
    bound over the ball, after checking the recorded stage norms against this checker's own and that
    no radius exceeds eps."""
    if recorded.shape[1] != len(items):
        fail("samples", f"stage_norms must list one norm per graph stage ({len(items)})")
    check_norms(recorded, stage_norms_at_x(items, np.asarray(x, F64), apply))
    eb = ball_errors([sts[0] for sts, _ in items], [L for _, L in items], x, recorded, eps, sem)
    if np.any((rad > eps) & (rad > 0)):
        fail(f"sample {int(np.nonzero(rad > eps)[0][0])}", "radius exceeds eps under a floating-point semantics")
    return np.nextafter(lo - vup(SQRT2 * eb)[:, None], -np.inf)
