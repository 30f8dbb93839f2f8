"""The proven spectral norm of a batch of matrix blocks: the machinery behind
:mod:`certlib.verifiers.svd` (proofs A, B and C of its docstring), apart from
what the blocks are (a dense weight, or a convolution's frequency blocks).

Everything here is IEEE float64 / complex128 with every rounding error bounded
a priori; see :mod:`certlib.verifiers.svd` for the guarantee, the assumptions
and the constants, and proofs/svd_backward_error.md for the proof.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from scipy.linalg import blas
from threadpoolctl import threadpool_limits

from certlib.bounds import up, up_add, up_mul, up_sqrt

#: unit roundoff of IEEE binary64, round to nearest.
U = 2.0 ** -53
#: absolute pad covering every underflow error in the scaled problem (entries <= 1).
ABS_PAD = 2.0 ** -960
_GRAM_ZHERK_MIN = 48


@contextlib.contextmanager
def _threads(n: int):
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(prev)


def SVD_P(m: int, n: int) -> int:
    """Backward-error factor p(m,n) of a LAPACK SVD / Hermitian eigensolver.

    Householder bidiagonalisation (tridiagonalisation) is backward stable with
    ``||E||_F <= c m n U ||A||_F`` per side (Higham 2002, Thm 19.4, c a small
    constant) and ``||A||_F <= sqrt(min(m,n)) ||A||_2``; the bidiagonal QR /
    dqds stage adds O(n^2 U) relative (Demmel-Kahan 1990).  We take
    ``64 max(m,n)^2 ceil(sqrt(min(m,n)))``, i.e. c <= 32 on both sides.
    """
    lo, hi = max(min(m, n), 1), max(m, n, 1)
    return 64 * hi * hi * (math.isqrt(lo - 1) + 1)  # isqrt(lo - 1) + 1 == ceil(sqrt(lo))


def _gamma(k: float) -> float:
    """Upper bound on gamma_k = k U / (1 - k U) (requires k U < 1/4)."""
    ku = k * U
    if ku >= 0.25:
        raise ValueError("problem too large for the stated rounding-error bounds")
    return up(up(ku) / (1.0 - 2 * ku))


def _inflate(x: float, k: float) -> float:
    """An upper bound on the exact value of a sum of k non-negative rounded terms computed as x."""
    return up_mul(x, up(1.0 + 2.0 * _gamma(k)))


def _vup(x):
    return np.nextafter(x, np.inf)


def _require_finite(a: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(a)):
        raise ValueError(f"svd verifier: {what} contains NaN or Inf; no bound exists")


def _pow2_scale(a: np.ndarray) -> tuple[np.ndarray, int]:
    """a * 2**-e with max|.| in [0.5, 1) (exact barring underflow, see ABS_PAD), and e."""
    _, e = math.frexp(float(np.max(np.abs(a))))
    return np.ldexp(a, -e), e


def _unscale(v: float, e: int) -> float:
    r = math.ldexp(v, e)
    if not math.isfinite(r):
        raise ValueError("svd verifier: the bound overflows float64")
    return up(r) if r < 2.0 ** -1021 else r  # subnormal results may have rounded down


# ----------------------------------------------------------------------------- blocks

def _cheap_bounds(K: np.ndarray) -> np.ndarray:
    """Per block b: an upper bound on ||K[b]||_2 (Frobenius / sqrt(norm1 * norminf))."""
    m, n = K.shape[-2:]
    A = np.abs(K)  # hypot: < 1 ulp
    n1 = A.sum(axis=-2).max(axis=-1)
    ninf = A.sum(axis=-1).max(axis=-1)
    fro2 = np.einsum("bij,bij->b", A, A)
    c1 = up(1.0 + 2.0 * _gamma(2 * (m + n) + 8))
    cf = up(1.0 + 2.0 * _gamma(2 * m * n + 8))
    u1 = _vup(np.sqrt(_vup(_vup(n1 * ninf) * c1)))
    uf = _vup(np.sqrt(_vup(fro2 * cf)))
    return np.minimum(u1, uf)


def _grams(K: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Gram of the smaller side for each block; upper bounds e_G on ||Ghat - G||_2."""
    b, m, n = K.shape
    r, L = min(m, n), max(m, n)
    cplx = np.iscomplexobj(K)
    if r >= _GRAM_ZHERK_MIN:
        G = np.empty((b, r, r), dtype=K.dtype)
        herk = blas.zherk if cplx else blas.dsyrk
        trans = (0 if m <= n else 2) if cplx else (0 if m <= n else 1)
        for i in range(b):  # beta = 0: the strict upper triangle of the zeros c stays 0
            low = herk(1.0, K[i], trans=trans, lower=1, c=np.zeros((r, r), K.dtype, order="F"),
                       overwrite_c=1)
            G[i] = low
            G[i] += np.tril(low, -1).conj().T  # Hermitian completion of the computed triangle
    else:
        Kc = K.conj().transpose(0, 2, 1)
        G = K @ Kc if m <= n else Kc @ K
    fro2 = np.einsum("bij,bij->b", K.real, K.real)
    if cplx:
        fro2 = fro2 + np.einsum("bij,bij->b", K.imag, K.imag)
    fro2 = _vup(fro2 * up(1.0 + 2.0 * _gamma(2 * m * n + 2)))
    eG = _vup(_vup(fro2 * _gamma(2 * L + 4)) + ABS_PAD)
    return G, eG, r


def _chol_certify(G: np.ndarray, s: np.ndarray, eG: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Proof A for each block: (ok, upper bound on sigma_max(K)) where Cholesky succeeded."""
    r = G.shape[-1]
    B = -G
    d = np.arange(r)
    bd = s[:, None] - G[:, d, d].real  # fl(s - g_ii): relative error <= U
    B[:, d, d] = bd
    info = torch.linalg.cholesky_ex(torch.from_numpy(B)).info.numpy()
    ok = (info == 0) & (s > 0)
    g = _gamma(2 * r + 8)
    gc = up(g / (1.0 - 2 * g))
    ab = np.abs(bd)
    tr = _vup(ab.sum(axis=1) * up(1.0 + 2.0 * _gamma(r + 1)))
    lam = _vup(s + _vup(tr * gc))
    lam = _vup(lam + _vup(ab.max(axis=1) * (2 * U)))
    lam = _vup(_vup(lam + eG) + ABS_PAD)
    return ok, _vup(np.sqrt(np.maximum(lam, 0.0)))


def _eig_bound(lam_c: float, eG: float, r: int) -> float:
    """Proof B on a Gram: upper bound on sigma_max(K) from eigvalsh's top value."""
    pu = SVD_P(r, r) * U
    if pu >= 0.25:
        return math.inf
    lh = up(up_add(max(lam_c, 0.0), up_mul(pu, eG)) / (1.0 - 2 * pu))
    return up_sqrt(up_add(up_add(lh, eG), ABS_PAD))


def _rel(r: int) -> float:
    """Relative headroom: an over-estimate of proof A's margin e(s)/s for an r x r Gram."""
    return 4.0 * (r * _gamma(2 * r + 8) + 4 * U)


def _certify_top(G: np.ndarray, eG: float, r: int, lam: float) -> float:
    """Proof A at s ~ lam (1 + 2 rel), a little above the computed top eigenvalue lam,
    retried with larger shifts; inf if Cholesky never succeeds (proof B is used then)."""
    eta = 2.0 * _rel(r)
    for _ in range(3):
        s = lam * (1.0 + eta) + eta * eG
        if s <= 0:
            break
        ok, b = _chol_certify(G[None], np.array([s]), np.array([eG]))
        if ok[0]:
            return float(b[0])
        eta *= 64.0
    return math.inf


class _MaxSigma:
    """Running proven upper bound ``cur`` on max_b sigma_max(K_b) over blocks seen so far."""

    def __init__(self) -> None:
        self.cur = 0.0
        self.n_blocks = self.n_pruned = self.n_chol = self.n_exact = 0

    def _shift(self, eG: np.ndarray, r: int) -> np.ndarray:
        # s such that the certified value s + e(s) stays <= cur^2 (a choice, not a proof).
        return (self.cur * self.cur - eG - ABS_PAD) * (1.0 - _rel(r))

    def _exact(self, G: np.ndarray, eG: float, u_cheap: float, r: int) -> None:
        self.n_exact += 1
        lam = float(torch.linalg.eigvalsh(torch.from_numpy(G)).max())
        best = min(u_cheap, _eig_bound(lam, eG, r), _certify_top(G, eG, r, lam))
        self.cur = max(self.cur, best)

    def add(self, K: np.ndarray) -> None:
        """K: (b, m, n) computed blocks (real or complex)."""
        self.n_blocks += K.shape[0]
        ub = _cheap_bounds(K)
        live = np.nonzero(ub > self.cur)[0]
        self.n_pruned += K.shape[0] - live.size
        if live.size == 0:
            return
        K, ub = K[live], ub[live]
        G, eG, r = _grams(K)
        v = np.ones((G.shape[0], r, 1), dtype=G.dtype)  # Rayleigh estimate, for ordering only
        for _ in range(3):
            v = G @ v
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
        est = np.real((v.conj() * (G @ v)).sum(axis=(1, 2)))
        pending = np.argsort(-est)
        while pending.size:
            pending = pending[ub[pending] > self.cur]
            if pending.size == 0:
                return
            s = self._shift(eG[pending], r)
            hot = (s <= 0) | (est[pending] > s)  # surely fails Cholesky at s
            if hot.any():  # most likely the largest: certify it exactly first
                i = pending[np.argmax(hot)]
                self._exact(G[i], float(eG[i]), float(ub[i]), r)
                pending = pending[pending != i]
                continue
            ok, b = _chol_certify(G[pending], s, eG[pending])
            self.n_chol += int(ok.sum())
            if ok.any():
                self.cur = max(self.cur, float(np.minimum(b, ub[pending])[ok].max()))
            for i in pending[~ok]:
                if ub[i] > self.cur:
                    self._exact(G[i], float(eG[i]), float(ub[i]), r)
            return
