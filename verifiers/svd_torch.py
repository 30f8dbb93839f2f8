"""The exact method's convolution engine in torch float64 / complex128 on any
device (``certlib bounds --device cuda``): the same frequency blocks, proofs
and constants as :func:`certlib.verifiers.svd._block_engine` (numpy), with
the block products, Grams, Cholesky factorisations and eigenvalues computed
by torch on ``device``.

Why the numpy proofs carry over unchanged (proofs/device_bounds.md):
  * every error constant of :mod:`certlib.verifiers.svd_blocks` is a
    ``gamma_k`` bound that holds for ANY summation order and with or without
    fused multiply-add (Higham 2002, Thm 3.4 / 3.5 and Sec. 2.6): cuBLAS
    DGEMM / ZGEMM and torch's reductions are covered as LAPACK/BLAS are;
  * the Cholesky proof (Higham Thm 10.3, Rump 2006) assumes the textbook
    recurrences in some order (blocked or not, FMA or not): cuSOLVER / MAGMA
    potrf, as LAPACK's;
  * float64 is never TF32 (TF32 only affects float32 products); complex
    products use the conventional 4-multiplication form (not 3M / Gauss);
  * the twiddles and the DFT error term are computed on the CPU exactly as in
    the numpy engine; torch.sqrt is correctly rounded (IEEE, CUDA included)
    and every computed bound is then rounded up with ``nextafter``.
Assumptions as in svd.py: IEEE binary64, round to nearest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from certlib.bounds import up
from certlib.verifiers.svd_blocks import ABS_PAD, U, _eig_bound, _gamma, _rel

_INF = math.inf


def _vup(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, _INF))


def cheap_bounds(K: torch.Tensor) -> torch.Tensor:
    """Per block: an upper bound on ||K[b]||_2 (as svd_blocks._cheap_bounds)."""
    m, n = K.shape[-2:]
    A = K.abs()
    n1 = A.sum(dim=-2).amax(dim=-1)
    ninf = A.sum(dim=-1).amax(dim=-1)
    fro2 = (A * A).sum(dim=(-2, -1))
    c1 = up(1.0 + 2.0 * _gamma(2 * (m + n) + 8))
    cf = up(1.0 + 2.0 * _gamma(2 * m * n + 8))
    u1 = _vup(torch.sqrt(_vup(_vup(n1 * ninf) * c1)))
    uf = _vup(torch.sqrt(_vup(fro2 * cf)))
    return torch.minimum(u1, uf)


def grams(K: torch.Tensor):
    """(Grams of the smaller side, upper bounds on ||Ghat - G||_2, r)."""
    _, m, n = K.shape
    r, L = min(m, n), max(m, n)
    Kh = K.conj().transpose(-2, -1)
    G = K @ Kh if m <= n else Kh @ K
    fro2 = (K.real * K.real).sum(dim=(-2, -1))
    if K.is_complex():
        fro2 = fro2 + (K.imag * K.imag).sum(dim=(-2, -1))
    fro2 = _vup(fro2 * up(1.0 + 2.0 * _gamma(2 * m * n + 2)))
    eG = _vup(_vup(fro2 * _gamma(2 * L + 4)) + ABS_PAD)
    return G, eG, r


def chol_certify(G: torch.Tensor, s: torch.Tensor, eG: torch.Tensor):
    """Proof A per block (svd_blocks._chol_certify): (ok, upper bound on sigma_max)."""
    r = G.shape[-1]
    B = -G
    d = torch.arange(r, device=G.device)
    bd = s[:, None] - G[:, d, d].real  # fl(s - g_ii): relative error <= U
    B[:, d, d] = bd.to(B.dtype)
    info = torch.linalg.cholesky_ex(B).info
    ok = (info == 0) & (s > 0)
    g = _gamma(2 * r + 8)
    gc = up(g / (1.0 - 2 * g))
    ab = bd.abs()
    tr = _vup(ab.sum(dim=1) * up(1.0 + 2.0 * _gamma(r + 1)))
    lam = _vup(s + _vup(tr * gc))
    lam = _vup(lam + _vup(ab.amax(dim=1) * (2 * U)))
    lam = _vup(_vup(lam + eG) + ABS_PAD)
    return ok, _vup(torch.sqrt(torch.clamp(lam, min=0.0)))


class MaxSigma:
    """Running proven upper bound ``cur`` on max_b sigma_max(K_b): svd_blocks._MaxSigma on torch tensors."""

    def __init__(self) -> None:
        self.cur = 0.0
        self.n_blocks = self.n_pruned = self.n_chol = self.n_exact = 0

    def _certify_top(self, G, eG: float, r: int, lam: float) -> float:
        eta = 2.0 * _rel(r)
        for _ in range(3):
            s = lam * (1.0 + eta) + eta * eG
            if s <= 0:
                break
            ok, b = chol_certify(G[None], G.new_tensor([s], dtype=torch.float64),
                                 G.new_tensor([eG], dtype=torch.float64))
            if bool(ok[0]):
                return float(b[0])
            eta *= 64.0
        return _INF

    def _exact(self, G, eG: float, u_cheap: float, r: int) -> None:
        self.n_exact += 1
        lam = float(torch.linalg.eigvalsh(G).max())
        self.cur = max(self.cur, min(u_cheap, _eig_bound(lam, eG, r), self._certify_top(G, eG, r, lam)))

    def add(self, K: torch.Tensor) -> None:
        self.n_blocks += K.shape[0]
        ub = cheap_bounds(K)
        live = torch.nonzero(ub > self.cur).flatten()
        self.n_pruned += K.shape[0] - live.numel()
        if live.numel() == 0:
            return
        K, ub = K[live], ub[live]
        G, eG, r = grams(K)
        v = torch.ones((G.shape[0], r, 1), dtype=G.dtype, device=G.device)  # Rayleigh estimate: ordering only
        for _ in range(3):
            v = G @ v
            v = v / torch.clamp(torch.linalg.vector_norm(v, dim=1, keepdim=True), min=1e-300)
        est = (v.conj() * (G @ v)).sum(dim=(1, 2)).real
        ub_c, eG_c, est_c = ub.cpu().numpy(), eG.cpu().numpy(), est.cpu().numpy()
        pending = np.argsort(-est_c)
        while pending.size:
            pending = pending[ub_c[pending] > self.cur]
            if pending.size == 0:
                return
            s = (self.cur * self.cur - eG_c[pending] - ABS_PAD) * (1.0 - _rel(r))
            hot = (s <= 0) | (est_c[pending] > s)
            if hot.any():
                i = pending[np.argmax(hot)]
                self._exact(G[int(i)], float(eG_c[i]), float(ub_c[i]), r)
                pending = pending[pending != i]
                continue
            sel = torch.as_tensor(pending, device=G.device)
            ok, b = chol_certify(G[sel], torch.as_tensor(s, device=G.device), eG[sel])
            ok, b = ok.cpu().numpy(), b.cpu().numpy()
            self.n_chol += int(ok.sum())
            if ok.any():
                self.cur = max(self.cur, float(np.minimum(b, ub_c[pending])[ok].max()))
            for i in pending[~ok]:
                if ub_c[i] > self.cur:
                    self._exact(G[int(i)], float(eG_c[i]), float(ub_c[i]), r)
            return


def block_max(ct: np.ndarray, st: np.ndarray, J: np.ndarray, KT: np.ndarray, fb: int, shape: tuple,
              device) -> MaxSigma:
    """The frequency sweep of svd._block_engine on ``device``: blocks ``ct[J] @ KT`` (real part) and
    ``st[J] @ KT`` (imaginary part), in chunks of ``fb`` frequencies, the largest cheap bounds first."""
    dev = torch.device(device)
    g, m, n2 = shape
    ctd, std = torch.as_tensor(ct, device=dev), torch.as_tensor(st, device=dev)
    Jd, KTd = torch.as_tensor(J, device=dev), torch.as_tensor(KT, device=dev)
    nF = J.shape[0]

    def blocks(f):
        return torch.complex(ctd[Jd[f]] @ KTd, std[Jd[f]] @ KTd).reshape(len(f) * g, m, n2)

    order = torch.arange(nF, device=dev)
    if nF > fb:  # pass 1: cheap bounds, to visit the largest blocks first
        ub = torch.cat([cheap_bounds(blocks(order[i:i + fb])).reshape(-1, g).amax(dim=1)
                        for i in range(0, nF, fb)])
        order = torch.argsort(-ub, stable=True)
    eng = MaxSigma()
    for i in range(0, nF, fb):
        eng.add(blocks(order[i:i + fb]))
    return eng


__all__ = ["MaxSigma", "block_max", "cheap_bounds", "grams", "chol_certify"]
