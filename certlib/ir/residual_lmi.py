"""Dense nonlinear residual blocks ``h(x) = x + A s(Bx + b)`` (s slope-restricted
in [0, 1]) bounded by the one-layer LipSDP matrix inequality
(proofs/residual_blocks.md, general A):

    M(rho, Lambda) = [[(rho - 1) I, -(A + B^T Lambda)],
                      [-(A + B^T Lambda)^T, 2 Lambda - A^T A]]  >= 0,  Lambda >= 0 diagonal

implies ||h(x) - h(x')||^2 <= rho ||x - x'||^2.  cvxpy proposes (rho, Lambda)
(an ESTIMATE); the bound is sqrt(rho') only after the float64 matrix M^ built
from the rounded Lambda, minus a rigorous bound e on ||M - M^||_2 on its
diagonal (rounded down), is proven positive definite by Rump's criterion
(verifiers/rump.py).  The solver is never trusted.
"""

from __future__ import annotations

import warnings

import numpy as np

from certlib.bounds import up, up_sqrt
from certlib.ir.graph import U64, gamma

#: largest n + m (block input + hidden width) solved
LMI_MAX_DIM = 128


def _solve(A: np.ndarray, B: np.ndarray, tau: float):
    import cvxpy as cp

    m, n = B.shape
    rho = cp.Variable()
    lam = cp.Variable(m, nonneg=True)
    L = cp.diag(lam)
    off = -(A + B.T @ L)
    M = cp.bmat([[(rho - 1) * np.eye(n), off], [off.T, 2 * L - A.T @ A]])
    prob = cp.Problem(cp.Minimize(rho), [M - tau * np.eye(n + m) >> 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # SCS first: ~10x faster than CLARABEL here from n + m ~ 100 (the
        # answer's accuracy does not matter: it is re-proven)
        for solver, opts in (("SCS", {"eps_abs": 1e-8, "eps_rel": 1e-8, "max_iters": 50_000}), ("CLARABEL", {})):
            if solver == "CLARABEL" and A.shape[0] + A.shape[1] > 64:
                break
            try:
                prob.solve(solver=solver, **opts)
            except Exception:   # noqa: BLE001 - any solver failure: try the next, then give up
                continue
            if prob.status in ("optimal", "optimal_inaccurate") and rho.value is not None:
                return float(rho.value), np.maximum(np.asarray(lam.value, dtype=np.float64), 0.0)
    return None


def prove_lmi(A: np.ndarray, B: np.ndarray, a_err: float, rho: float, lam: np.ndarray) -> bool:
    """Prove M(rho, diag(lam)) > 0 for the exact A (|A - A^| <= a_err |A^|
    entrywise) and B, with lam >= 0 and rho the given doubles."""
    from certlib.verifiers.rump import is_spd

    m, n = B.shape
    if np.any(lam < 0) or not np.all(np.isfinite(lam)):
        return False
    BL = B.T * lam[None, :]                     # fl(B^T Lambda): relative error u
    off = -(A + BL)                             # one more rounding
    AtA = A.T @ A                               # gamma_n relative to |A|^T |A|
    low = 2 * np.diag(lam) - AtA
    M = np.zeros((n + m, n + m))
    M[:n, :n] = np.eye(n) * (rho - 1.0)
    M[:n, n:] = off
    M[n:, :n] = off.T
    M[n:, n:] = np.triu(low) + np.triu(low, 1).T   # exactly symmetric
    absA = np.abs(A)
    # entrywise bounds on |M - M^| (exact M with the exact A, B, lam, rho)
    e_off = (a_err + 2 * U64) * (absA + np.abs(BL)) * (1 + 4 * U64) + U64 * np.abs(off)
    ga = (1 + a_err) ** 2 - 1 + gamma(n + 2) * (1 + a_err) ** 2
    e_low = ga * (absA.T @ absA) * (1 + gamma(n + 2)) + U64 * np.maximum(np.abs(low), np.abs(low).T)
    e_top = abs(rho - 1.0) * U64        # fl(rho - 1)
    fro2 = 2 * float(np.sum(e_off ** 2)) + float(np.sum(e_low ** 2)) + n * e_top ** 2
    e = up(up_sqrt(fro2 * (1 + gamma(4 * (n + m) ** 2))) * 1.001)
    d = np.diag(M).copy()
    S = M.copy()
    S[np.diag_indices(n + m)] = np.nextafter(d - e, -np.inf)
    if not np.all(np.isfinite(S)):
        return False
    return is_spd(S)


def dense_lmi_bound(A: np.ndarray, B: np.ndarray, a_err: float = 0.0) -> float | None:
    """A proven Lipschitz bound of x + A s(Bx + b), or None (too large, solver
    failure, or the proof did not go through)."""
    m, n = B.shape
    if A.shape != (n, m) or n + m > LMI_MAX_DIM:
        return None
    scale = max(1.0, float(np.max(np.abs(A.T @ A))) if A.size else 1.0)
    for tau_rel in (1e-7, 1e-5, 1e-3):
        sol = _solve(A, B, tau_rel * scale)
        if sol is None:
            continue
        rho, lam = sol
        for delta in (1e-9, 1e-7, 1e-5, 1e-3):
            r = up(max(rho, 1.0) * (1 + delta) + delta)
            if prove_lmi(A, B, a_err, r, lam):
                return up_sqrt(r)
    return None
