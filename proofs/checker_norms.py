"""The checker's arithmetic and its operator-norm proofs (part of proofs/checker.py; see its docstring).

Sections: arithmetic (unit roundoff, directed rounding, gamma_k, rigorous norms of float arrays);
norm proofs (Rump's criterion on a Gram matrix: proofs/rump.md; the explicit conv matrix:
proofs/zero_padding.md; the DFT blocks of the circular relaxation with their rounding bound:
proofs/polyphase_stride.md, proofs/groups.md, proofs/certificate.md).  Imports numpy and the
standard library only, never certlib.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

U, ETA = 2.0 ** -53, 2.0 ** -1074   # unit roundoff; smallest subnormal (bounds any underflow error)
TW = 16 * U                         # error of one computed twiddle (proofs/certificate.md)
SAFETY = 2.0                        # multiplies Rump's shift c (blocked dpotrf; proofs/rump.md)
F64 = np.float64
WORKERS = min(2, os.cpu_count() or 1)  # threads over blocks / batches; BLAS itself runs single-threaded
SQRT2 = math.nextafter(math.sqrt(2.0), math.inf)


class CheckFailed(Exception):
    """The certificate is invalid: ``item`` names the first item that failed."""

    def __init__(self, item: str, why: str):
        super().__init__(f"{item}: {why}")
        self.item, self.why = item, why


def fail(item, why):
    raise CheckFailed(item, why)


def up(x):
    return math.nextafter(float(x), math.inf)


def down(x):
    return math.nextafter(float(x), -math.inf)


def vup(a):
    return np.nextafter(a, np.inf)


def gam(k):
    """An upper bound on gamma_k = k u / (1 - k u)."""
    if k * U >= 0.25:
        fail("rounding", f"gamma_{k} is too large for the error model")
    return up(up(k * U) / down(1.0 - k * U))


def infl(s, k):
    """Upper bound on the exact value of a sum of k non-negative rounded products computed as s."""
    return vup(vup(s + k * ETA) * up(1.0 + 2.0 * gam(k)))


def norm_up(a, axis=None):
    """Upper bound on the exact l2 norm of a float array (of each row with axis=1)."""
    a = np.asarray(a, F64)
    a = a.reshape(len(a), -1) if axis else a.reshape(1, -1)
    r = vup(np.sqrt(infl(np.einsum("bi,bi->b", a, a), a.shape[1])))
    return r if axis else float(r[0])


def pmap(f, xs) -> list:
    with ThreadPoolExecutor(WORKERS) as ex:                       # numpy releases the GIL in BLAS/LAPACK
        return list(ex.map(f, xs))



# ------------------------------------------------------------------ norm proofs
def spd(A) -> bool:
    """Rump 2006, Cor. 2.4 (proofs/rump.md): True only if the symmetric matrix given by A's lower
    triangle is positive definite (LAPACK reads only that triangle).  Overwrites A's diagonal."""
    n, d = A.shape[0], np.diag(A).copy()
    if not (np.all(np.isfinite(A)) and np.all(d > 0)):
        return False
    g = up(up((n + 1) * U) / down(1.0 - 2 * (n + 1) * U))        # >= gamma_{n+1} / (1 - gamma_{n+1})
    c = up(SAFETY * up(up(g * up(math.fsum(d))) + up(4 * n * ETA * up(2 * (n + 1) + float(d.max())))))
    A[np.diag_indices(n)] = np.nextafter(d - c, -np.inf)         # <= A_ii - c
    try:
        R = np.linalg.cholesky(A)                                 # LAPACK dpotrf (numpy's OpenBLAS)
    except np.linalg.LinAlgError:
        return False
    return bool(np.all(np.diag(A) > 0) and np.all(np.isfinite(np.diag(R))) and np.all(np.diag(R) > 0))


def gram_ok(M, t) -> bool:
    """True only if ||M||_2 <= t for the exact float matrix M (real or complex); proofs/rump.md."""
    M = M.T if M.shape[0] < M.shape[1] else M
    (m, n), cplx = M.shape, np.iscomplexobj(M)
    P = [np.ascontiguousarray(p) for p in ((M.real, M.imag) if cplx else (M,))]
    fro2 = float(infl(sum(np.einsum("ij,ij->", p, p) for p in P), M.size * len(P)))
    if up(math.sqrt(fro2)) <= t:                                  # ||M||_2 <= ||M||_F
        return True
    # Re M^H M = A^T A + B^T B, Im = A^T B - B^T A: length-m products, one sum: |dG| <= gamma_{m+1} ...
    eG = up((up(up(SQRT2 * gam(m + 1)) * fro2) if cplx else up(gam(m) * fro2)) + 4 * m * n * ETA)
    s = down(down(t * t) - eG)
    if not s > 0:
        return False
    G = P[0].T @ P[0]
    E = np.zeros((len(P) * n,) * 2)                               # lower triangle of the real embedding
    if cplx:                                                      # [[S, -Q], [Q, S]] of s I - M^H M = S + iQ
        G += P[1].T @ P[1]
        X = P[0].T @ P[1]
        E[n:, :n], E[n:, n:] = X.T - X, -G
    E[:n, :n] = -G
    E[np.diag_indices(len(E))] = np.tile(np.nextafter(s - np.diag(G), -np.inf), len(P))
    return spd(E)


def explicit(K, geo):
    """The exact matrix of the zero-padded conv (each entry a copy of one kernel tap), or None if large."""
    (C, H, W), (co, Ho, Wo) = geo["input_shape"], geo["output_shape"]
    if co * Ho * Wo * C * H * W > 2 ** 25:
        return None
    (sh, sw), (dh, dw), g, (pt, pl, _, _) = geo["strides"], geo["dilations"], geo["group"], geo["pads"]
    (_, cg, kh, kw), og, M = K.shape, co // g, np.zeros((co, Ho, Wo, C, H, W))
    for a in range(kh):
        for b in range(kw):
            y, x = np.arange(Ho) * sh + a * dh - pt, np.arange(Wo) * sw + b * dw - pl
            iy, ix = np.nonzero((y >= 0) & (y < H))[0], np.nonzero((x >= 0) & (x < W))[0]
            for q in range(g):
                o, ci = slice(q * og, (q + 1) * og), slice(q * cg, (q + 1) * cg)
                M[o, iy[:, None], ix[None, :], ci, y[iy][:, None], x[ix][None, :]] = K[o, :, a, b]
    return M.reshape(co * Ho * Wo, C * H * W)


def dft_blocks(K, geo, grid):
    """(chunks of the DFT blocks of the circular relaxation on `grid`, bound on each block's error)."""
    (C, H, W), (_, Ho, Wo) = geo["input_shape"], geo["output_shape"]
    (sh, sw), (dh, dw), g, (pt, pl, pb, pr) = geo["strides"], geo["dilations"], geo["group"], geo["pads"]
    Nh, Nw = (int(v) for v in grid)
    for n, p0, p1, s, N, nout in ((H, pt, pb, sh, Nh, Ho), (W, pl, pr, sw, Nw, Wo)):
        if Nh * Nw > 2 ** 22 or not ((s == 1 and N >= max(n + p0, n + p1, nout)) or N >= -(-(n + p0 + p1) // s)):
            return None, 0.0                                      # not a valid embedding grid
    (co, cg, kh, kw), M = K.shape, Nh * Nw
    T, m, Kg = kh * kw, co // g, K.reshape(g, co // g, cg, kh * kw)
    th, tw = np.repeat(dh * np.arange(kh), kw), np.tile(dw * np.arange(kw), kh)
    qh, qw, r = th // sh, tw // sw, (th % sh) * sw + tw % sw     # tap t = s q + r: offset q, input phase r
    wh, ww = np.divmod(np.arange(M), Nw)
    keep = wh * Nw + ww <= (-wh % Nh) * Nw + (-ww % Nw)           # Khat(-w) = conj(Khat(w))
    F = np.nonzero(keep if len(set(zip(qh, qw))) > 1 else np.arange(M) == 0)[0]  # one offset: one block
    J = (wh[F, None] * qh * Nw + ww[F, None] * qw * Nh) % M
    tws = np.array([1.0] + [complex(math.cos(2 * math.pi * (min(j, M - j) / M)),   # angle in [0, pi]
                                    math.copysign(math.sin(2 * math.pi * (min(j, M - j) / M)), M - 2 * j))
                            for j in range(1, M)])
    S = np.zeros((g, m, cg, sh * sw))
    for a in range(T):
        S[..., r[a]] += np.abs(Kg[..., a])
    delta = up(TW + up(gam(T) * up(1.0 + TW)))                   # per entry: |error| <= delta * S (re, im)
    err = up(up(up(SQRT2 * delta) * max(norm_up(infl(S[i], T)) for i in range(g))) + 2 * T * S.size * ETA)
    phase = [np.nonzero(r == p)[0] for p in range(sh * sw)]      # polyphase: tap a feeds channel (c, r_a)
    KT, fb = [np.ascontiguousarray(Kg[..., i].reshape(-1, len(i)).T) for i in phase], max(1, 2 ** 21 // S.size)

    def chunks():
        for i in range(0, len(F), fb):
            B, j = np.zeros((len(F[i:i + fb]), g * m * cg, sh * sw), dtype=np.complex128), J[i:i + fb]
            for p, idx in enumerate(phase):
                if len(idx):
                    B[..., p].real, B[..., p].imag = tws.real[j[:, idx]] @ KT[p], tws.imag[j[:, idx]] @ KT[p]
            yield B.reshape(-1, m, cg * sh * sw)
    return chunks(), err


def prove(K, st, hint, t, folds) -> bool:
    """True only if ||A||_2 <= t for the exact operator A of stage st (kernel K up to `folds` roundings)."""
    taps = K.shape[2] * K.shape[3] if K.ndim == 4 else 1          # fold error: relative gamma_f per entry
    ferr = up(up(math.sqrt(taps)) * up(norm_up(K) * up(2 * gam(folds)))) if folds else 0.0
    blocks, derr = [[K]], 0.0
    if st["kind"] == "conv" and hint.get("family") == "explicit":
        E = explicit(K, st["geo"])
        blocks = [[E]] if E is not None else None
    elif st["kind"] == "conv":
        blocks, derr = dft_blocks(K, st["geo"], hint.get("grid", (0, 0))) if hint.get("family") == "dft" else (None, 0)
    t1 = down(down(float(t) - derr) - ferr)
    return blocks is not None and t1 >= 0 and all(all(pmap(lambda Mb: gram_ok(Mb, t1), ch)) for ch in blocks)
