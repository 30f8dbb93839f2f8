"""Multi-layer LipSDP for dense stacks, re-proven with Rump's criterion
(proofs/lipsdp.md).

A stack is a list of stages applied to x in R^n0:

* ``("dense", W)``           y = W x (+ bias: biases cancel in differences);
* ``("slope", a, b)``        elementwise, each unit slope-restricted in [a, b]
                             (ReLU [0, 1], LeakyReLU(s) [min(s,1), max(s,1)], Abs [-1, 1]);
* ``("compare", pairs)``     comparators on disjoint position pairs (p, q):
                             out_p = max(v_p, v_q), out_q = min(v_p, v_q), other
                             entries unchanged.  MaxMin is one comparator stage,
                             GroupSort-g is g stages of odd-even transposition sort.

Variables xi = (dx, the new variables of every nonlinear stage): a slope stage
adds its outputs dw, a comparator stage adds dr = d relu(v_p - v_q) per pair
(max(a, b) = b + relu(a - b), min(a, b) = a - relu(a - b)).  Every other
difference is a linear map of xi (the "state").  With one multiplier
lambda_i >= 0 per constraint, the certificate is

    M = rho2 P0 - S^T S + sum_i lambda_i (e_i e_i^T - c_i (e_i s_i^T + s_i e_i^T) + ab_i s_i s_i^T)  > 0

(P0 the projector on dx, S the output state, e_i the new variable, s_i the
constrained input, c = (a + b)/2, ab = a b); then ||f(x) - f(x')|| <= sqrt(rho2) ||x - x'||.

The solver (cvxpy) only proposes rho2 and lambda.  The Bound comes from the
float64 matrix M^ built with those numbers, a rigorous bound e >= ||M^ - M||_2
(every entry carries its depth of roundings and an absolute companion), and
Rump's Cholesky test of M^ - e I.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from certlib.bounds import Bound, up, up_sqrt

from .rump import ETA, down, gamma, is_spd, l2_upper

__all__ = ["lipsdp_bound", "prove", "solve", "stack_dim", "MAX_DIM"]

#: the largest LMI (size n0 + new variables) that the solver is asked to solve
MAX_DIM = 400


# ------------------------------------------------------------ tracked matrices
@dataclass
class _T:
    """A float64 matrix V with an absolute companion A (the same expression on
    |inputs|, + for -), the maximal number d of roundings on any path, and F:
    an entrywise bound, in units of ETA, of the underflow error."""

    V: np.ndarray
    A: np.ndarray
    d: int = 0
    F: float = 0.0

    @staticmethod
    def exact(V):
        V = np.asarray(V, dtype=np.float64)
        return _T(V, np.abs(V), 0, 0.0)

    def __add__(self, o: "_T") -> "_T":
        return _T(self.V + o.V, self.A + o.A, max(self.d, o.d) + 1, self.F + o.F)

    def __sub__(self, o: "_T") -> "_T":
        return _T(self.V - o.V, self.A + o.A, max(self.d, o.d) + 1, self.F + o.F)

    @property
    def T(self) -> "_T":
        return _T(self.V.T, self.A.T, self.d, self.F)

    def scale(self, c: float) -> "_T":
        if c in (0.0, 1.0, -1.0):
            return _T(self.V * c, self.A * abs(c), self.d, self.F * abs(c))
        return _T(self.V * c, self.A * abs(c), self.d + 1, up(abs(c) * self.F * 1.01 + 1))

    def rows(self, lam: np.ndarray) -> "_T":
        """diag(lam) @ self (lam >= 0)."""
        mx = float(np.max(lam)) if lam.size else 0.0
        return _T(lam[:, None] * self.V, lam[:, None] * self.A, self.d + 1, up(mx * self.F * 1.01 + 1))


def _mm(X: _T, Y: _T) -> _T:
    """X @ Y with inner dimension k: each term passes <= k more roundings; each
    of the k products may underflow (<= ETA), and earlier underflow errors are
    carried through |X|, |Y|."""
    k = X.V.shape[1]
    if k == 0:
        return _T(np.zeros((X.V.shape[0], Y.V.shape[1])), np.zeros((X.V.shape[0], Y.V.shape[1])))
    mx, my = float(np.max(X.A, initial=0.0)), float(np.max(Y.A, initial=0.0))
    F = up(1.01 * k * (mx * 1.01 * Y.F + my * 1.01 * X.F + X.F * Y.F * ETA + 1))
    return _T(X.V @ Y.V, X.A @ Y.A, X.d + Y.d + k, F)


# ------------------------------------------------------------------ the stack
def _exact_slopes(a: float, b: float) -> tuple[float, float, float, float]:
    """Slopes widened outward to multiples of 2^-16 (a sector [a, b] is also a
    sector [a', b'] for a' <= a, b' >= b), so that c = (a+b)/2 and a b are
    exact doubles."""
    if not (math.isfinite(a) and math.isfinite(b)) or a > b or max(abs(a), abs(b)) > 256:
        raise ValueError(f"slope sector [{a}, {b}] not supported")
    a2, b2 = math.floor(a * 65536) / 65536, math.ceil(b * 65536) / 65536
    c, ab = (a2 + b2) / 2, a2 * b2
    if Fraction(c) != (Fraction(a2) + Fraction(b2)) / 2 or Fraction(ab) != Fraction(a2) * Fraction(b2):
        raise ValueError("slope sector constants are not exact")   # pragma: no cover
    return a2, b2, c, ab


def stack_dim(n0: int, stages: list) -> int:
    """Size of the LMI: n0 plus the new variables of every nonlinear stage."""
    D, width = n0, n0
    for st in stages:
        if st[0] == "dense":
            width = st[1].shape[0]
        elif st[0] == "slope":
            D += width
        else:
            D += len(st[1])
    return D


def _structure(n0: int, stages: list):
    """(D, output state S as _T, QC blocks [(new variable indices, input rows U as _T, c, ab)])."""
    D = stack_dim(n0, stages)
    S = _T.exact(np.eye(n0, D))
    nxt, blocks = n0, []
    for st in stages:
        if st[0] == "dense":
            S = _mm(_T.exact(st[1]), S)
        elif st[0] == "slope":
            _, _, c, ab = _exact_slopes(st[1], st[2])
            n = S.V.shape[0]
            idx = np.arange(nxt, nxt + n)
            blocks.append((idx, S, c, ab))
            S = _T.exact(np.eye(D)[idx])
            nxt += n
        elif st[0] == "compare":
            pairs = np.asarray(st[1], dtype=np.int64).reshape(-1, 2)
            k = len(pairs)
            idx = np.arange(nxt, nxt + k)
            p, q = pairs[:, 0], pairs[:, 1]
            Sp, Sq = _T(S.V[p], S.A[p], S.d, S.F), _T(S.V[q], S.A[q], S.d, S.F)
            blocks.append((idx, Sp - Sq, 0.5, 0.0))      # r = relu(v_p - v_q): sector [0, 1]
            E = _T.exact(np.eye(D)[idx])
            hi, lo = Sq + E, Sp - E                       # max = v_q + r, min = v_p - r
            V, A = S.V.copy(), S.A.copy()
            V[p], A[p], V[q], A[q] = hi.V, hi.A, lo.V, lo.A
            S = _T(V, A, max(S.d, hi.d), max(S.F, hi.F))
            nxt += k
        else:
            raise ValueError(f"unknown stage {st[0]!r}")
    return D, S, blocks


def _place(X: _T, idx: np.ndarray, D: int) -> _T:
    """The D x D matrix with rows idx equal to X (exact copies)."""
    V, A = np.zeros((D, D)), np.zeros((D, D))
    V[idx], A[idx] = X.V, X.A
    return _T(V, A, X.d, X.F)


def _certificate(n0, stages, rho2: float, lams: list, struct=None) -> tuple[np.ndarray, float]:
    """The float64 M^ (exactly symmetric) and e >= ||M^ - M||_2, M the exact LMI matrix."""
    D, S, blocks = struct or _structure(n0, stages)
    P0 = np.zeros((D, D))
    P0[np.arange(n0), np.arange(n0)] = rho2
    M = _T.exact(P0) - _mm(S.T, S)
    for (idx, U, c, ab), lam in zip(blocks, lams):
        LU = U.rows(lam)                                  # diag(lam) U
        diag = np.zeros((D, D))
        diag[idx, idx] = lam
        P = _place(LU, idx, D)                            # E^T diag(lam) U
        term = _T.exact(diag) - (P + P.T).scale(c)
        if ab:
            term = term + _mm(U.T, LU).scale(ab)
        M = M + term
    lo = np.tril(M.V)
    V = lo + np.tril(lo, -1).T                            # exactly symmetric copy of the lower triangle
    g = gamma(max(M.d, 1))
    E = M.A * (g * (1 + 4 * g)) + M.F * ETA * 2 + ETA
    E = np.maximum(E, E.T)
    return V, up(l2_upper(E.ravel()))


def prove(n0: int, stages: list, rho2: float, lams: list, struct=None) -> bool:
    """True only if M(rho2, lams) is proven positive definite (then rho2 bounds
    the squared Lipschitz constant of the stack in exact arithmetic)."""
    if not (math.isfinite(rho2) and rho2 > 0) or any(np.any(~np.isfinite(l)) or np.any(l < 0) for l in lams):
        return False
    V, e = _certificate(n0, stages, rho2, lams, struct)
    if not math.isfinite(e):
        return False
    A = V.copy()
    d = np.diag(V) - e
    A[np.diag_indices_from(A)] = np.nextafter(d, -np.inf)   # <= V_ii - e exactly
    return is_spd(A)


def solve(n0: int, stages: list, margin: float = 1e-7, solver: str | None = None):
    """The solver's proposal (rho2, [lambda per QC block], info): an ESTIMATE.
    Minimises rho2 subject to M >= margin I."""
    import cvxpy as cp

    D, S, blocks = _structure(n0, stages)
    rho2 = cp.Variable()
    lams = [cp.Variable(len(idx), nonneg=True) for idx, _, _, _ in blocks]
    P0 = np.zeros((D, D))
    P0[np.arange(n0), np.arange(n0)] = 1.0
    M = rho2 * P0 - S.V.T @ S.V
    for (idx, U, c, ab), lam in zip(blocks, lams):
        Et = np.eye(D)[:, idx]
        L = cp.diag(lam)
        P = Et @ L @ U.V
        M = M + Et @ L @ Et.T - c * (P + P.T)
        if ab:
            M = M + ab * (U.V.T @ L @ U.V)
    M = (M + M.T) / 2
    prob = cp.Problem(cp.Minimize(rho2), [M - margin * np.eye(D) >> 0])
    errors = []
    from .sdp import FIRST_ORDER_FROM, LIPSDP_OPTIONS as _OPTIONS

    order = ["CLARABEL", "SCS"] if D <= FIRST_ORDER_FROM else ["SCS", "CLARABEL"]
    for name in ([solver] if solver else order):
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                prob.solve(solver=name, **_OPTIONS.get(name, {}))
        except (cp.SolverError, ValueError) as e:
            errors.append(f"{name}: {e}")
            continue
        if prob.status in ("optimal", "optimal_inaccurate") and rho2.value is not None:
            vals = [np.maximum(np.asarray(l.value, dtype=np.float64).ravel(), 0.0) for l in lams]
            return float(rho2.value), vals, {"solver": name, "status": prob.status,
                                             "seconds": time.perf_counter() - t0, "dim": D}
        errors.append(f"{name}: status {prob.status}")
    raise RuntimeError("LipSDP solve failed: " + "; ".join(errors))


def _schur_rho2(n0: int, lams: list, struct) -> float | None:
    """For fixed multipliers, the smallest rho2 with M >= 0 (float64, an
    ESTIMATE): the largest eigenvalue of -(N00 - N0h Nhh^-1 Nh0), N = M at
    rho2 = 0; None when Nhh is not positive definite."""
    N, _ = _certificate(n0, None, 0.0, lams, struct)
    Nhh = N[n0:, n0:]
    try:
        C = np.linalg.cholesky(Nhh) if Nhh.size else None
    except np.linalg.LinAlgError:
        return None
    X = np.linalg.solve(C, N[n0:, :n0]) if C is not None else np.zeros((0, n0))
    Sc = N[:n0, :n0] - X.T @ X
    val = float(np.linalg.eigvalsh(-(Sc + Sc.T) / 2)[-1])
    return val if math.isfinite(val) else None


def _normalise(stages: list) -> tuple[list, int]:
    """Scale each dense W by an exact power of two (norm ~ 1) for the solver.
    Every supported stage is positively homogeneous, so the scaled stack is
    2^k times the original (biases scaled along, irrelevant): returns (stages, k)."""
    out, k = [], 0
    for st in stages:
        if st[0] == "dense" and st[1].size and np.any(st[1]):
            W = np.asarray(st[1], dtype=np.float64)
            e = -math.frexp(float(np.linalg.norm(W, 2)))[1]
            Ws = np.ldexp(W, e)
            if not np.array_equal(np.ldexp(Ws, -e), W) or not np.all(np.isfinite(Ws)):
                e, Ws = 0, W
            out.append(("dense", Ws))
            k += e
        else:
            out.append(st)
    return out, k


def lipsdp_bound(n0: int, stages: list, solver: str | None = None, max_dim: int = MAX_DIM) -> Bound:
    """A proven upper bound on the l2 Lipschitz constant of the stack (exact
    arithmetic, any biases).  Raises ValueError when the stack is too large or
    no certificate could be proven (then nothing is claimed)."""
    t0 = time.perf_counter()
    D = stack_dim(n0, stages)
    if D > max_dim:
        raise ValueError(f"LipSDP matrix of size {D} exceeds max_dim={max_dim}")
    scaled, k = _normalise(stages)
    struct = _structure(n0, scaled)
    tries = []
    from .sdp import FIRST_ORDER_FROM

    # interior point (small LMIs) is accurate to ~1e-8, the first-order SCS to ~1e-5
    for margin in ((1e-7, 1e-5, 1e-3) if D <= FIRST_ORDER_FROM else (1e-5, 1e-3)):
        # the solver's multipliers, with M >= margin I so that rounding them
        # keeps the hidden block definite; then the least rho2 for those
        # multipliers (Schur complement), widened until the certificate is proven
        r2, lams, info = solve(n0, scaled, margin, solver)
        r2 = min(r2, _schur_rho2(n0, lams, struct) or r2)
        for delta in (1e-9, 1e-7, 1e-5, 1e-3):
            cand = up(max(r2, 0.0) * (1 + delta) + 1e-300)
            tries.append(cand)
            if prove(n0, scaled, cand, lams, struct):
                rho = math.ldexp(up_sqrt(cand), -k)
                rho = up(rho) if rho > 0 else math.ldexp(1.0, -1074)
                return Bound(rho, "lipsdp", "rump-cholesky (multi-layer LMI)", info={
                    **info, "rho2_scaled": cand, "scale_exp": k, "margin": margin, "delta": delta,
                    "seconds": time.perf_counter() - t0, "tries": len(tries)})
    raise ValueError(f"LipSDP certificate not proven (tried {len(tries)} candidates)")
