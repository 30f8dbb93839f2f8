"""Verified positive definiteness (Rump 2006) and spectral-norm proofs built on it.

Theorem used (S. M. Rump, "Verification of positive definiteness", BIT 46:433-452,
2006, Corollary 2.4 with the computable bound on c; machine-checked in Coq by the
ValidSDP project, ``corollary_2_4_with_c_upper_bound``):

    Let A in F^{n x n} be symmetric with A_ii >= 0, and 4 (n + 1) u < 1.  Let

        c >= gamma_{n+1} / (1 - gamma_{n+1}) * tr(A) + 4 * eta * n * (2 (n + 1) + max_i A_ii)

    (gamma_{n+1}/(1 - gamma_{n+1}) = (n+1)u / (1 - 2(n+1)u) = gamma_{2(n+1)} / 2).  Let
    At in F^{n x n} agree with A off the diagonal and satisfy At_ii <= A_ii - c.
    If the floating-point Cholesky decomposition of At runs to completion (every
    computed diagonal element of the factor is positive), then A is positive definite.

Here F is IEEE 754 binary64 with rounding to nearest, u = 2^-53 is the unit
roundoff, gamma_k = k u / (1 - k u), and eta bounds the absolute error of one
rounding in the subnormal range (2^-1075; we use the larger 2^-1074, the smallest
positive subnormal, as Rump does).  A complex Hermitian H = X + iY is positive
definite iff its real embedding [[X, -Y], [Y, X]] is, which is what we check.

Assumptions (stated, not provable from Python):
  * IEEE binary64 arithmetic, round to nearest, no overflow (checked: a non-finite
    factor is rejected);
  * LAPACK ``dpotrf`` (OpenBLAS here) follows the standard model: every entry of
    the factor is r_ij = (a_ij - sum_k r_ki r_kj) / r_ii and r_jj = sqrt(a_jj - sum_k
    r_kj^2), each sum evaluated in SOME order, each operation rounded once (or fused,
    which is no worse).  The bounds of the theorem hold for any summation order.
  * ``SAFETY`` = 2 multiplies c.  It covers kernels that divide by r_ii as a
    multiplication by a rounded reciprocal (one extra rounding: gamma_{n+1} ->
    gamma_{n+2}, at most a factor 1.5 on c) with room to spare.

Spectral norms (``prove_norm_leq``): ||M||_2 <= t  <=>  t^2 I - M^H M is positive
semidefinite.  The Gram matrix is formed in float64 and its rounding error is
bounded rigorously and subtracted before the Cholesky check (see ``GramCert``);
or the block matrix [[t I, M^H], [M, t I]] (PD iff t > ||M||_2) is checked directly.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from certlib.bounds import up, up_add, up_mul

__all__ = ["U", "ETA", "SAFETY", "gamma", "down", "rump_shift", "is_spd", "real_embedding",
           "l2_upper", "GramCert", "prove_norm_leq"]

U = 2.0 ** -53          #: unit roundoff of binary64, round to nearest
ETA = 2.0 ** -1074      #: underflow unit: smallest positive subnormal (>= any underflow error)
SAFETY = 2.0            #: factor applied to Rump's c (see module docstring)
SQRT2_UP = up(math.sqrt(2.0))


def down(x: float) -> float:
    """The next double below x: <= the exact real whose round-to-nearest is x."""
    return math.nextafter(float(x), -math.inf)


def gamma(k: int) -> float:
    """An upper bound on gamma_k = k u / (1 - k u)."""
    if k * U >= 0.5:
        raise ValueError(f"gamma_{k} undefined for binary64 (k u >= 1/2)")
    return up(up_mul(k, U) / down(1.0 - k * U))


def rump_shift(n: int, trace_up: float, maxdiag: float) -> float:
    """SAFETY * (gamma_{n+1}/(1-gamma_{n+1}) tr(A) + 4 eta n (2(n+1) + max A_ii)), rounded up."""
    if 4 * (n + 1) * U >= 1:
        raise ValueError("matrix too large for the criterion")
    half_g = up(up_mul(n + 1, U) / down(1.0 - 2 * (n + 1) * U))
    c1 = up_mul(half_g, trace_up)
    c2 = up_mul(up_mul(4 * n, ETA), up_add(2 * (n + 1), maxdiag))
    return up_mul(SAFETY, up_add(c1, c2))


def real_embedding(H: np.ndarray) -> np.ndarray:
    """[[Re, -Im], [Im, Re]]: same singular values (each twice); Hermitian -> symmetric."""
    X, Y = H.real, H.imag
    return np.block([[X, -Y], [Y, X]])


def _pow2_rescale(A: np.ndarray, target_exp: int) -> tuple[np.ndarray, int]:
    """Scale A by 2^k so that max|A| lies in [2^(target-1), 2^target), when exact."""
    m = float(np.max(np.abs(A))) if A.size else 0.0
    if m == 0.0 or not math.isfinite(m):
        return A, 0
    k = target_exp - math.frexp(m)[1]
    As = np.ldexp(A, k)
    if np.all(np.isfinite(As)) and np.array_equal(np.ldexp(As, -k), A):
        return As, k
    return A, 0


def is_spd(A) -> bool:
    """True only if the (exact) real symmetric / complex Hermitian float64 matrix A is
    positive definite, proven by Rump's criterion (see the module docstring).

    False means "not proven" (indefinite, singular, or PD by less than rounding).
    Raises ValueError if A is not square and exactly symmetric/Hermitian.
    """
    A = np.asarray(A)
    if np.iscomplexobj(A):
        if not np.array_equal(A, A.conj().T, equal_nan=True):
            raise ValueError("matrix is not exactly Hermitian")
        A = real_embedding(A.astype(np.complex128))
    A64 = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {A.shape}")
    if not np.array_equal(A64, A, equal_nan=True):
        raise ValueError("matrix is not exactly representable in float64")
    if not np.all(np.isfinite(A64)):
        return False
    if not np.array_equal(A64, A64.T):
        raise ValueError("matrix is not exactly symmetric")
    n = A64.shape[0]
    if n == 0:
        return True
    if np.any(np.diag(A64) <= 0):
        return False
    A64, _ = _pow2_rescale(A64, 1)   # PD is invariant under exact scaling by 2^k
    d = np.diag(A64)
    c = rump_shift(n, up(math.fsum(d.tolist())), float(d.max()))
    At = np.array(A64, dtype=np.float64, order="F", copy=True)
    shifted = np.nextafter(d - c, -np.inf)        # <= A_ii - c exactly
    if np.any(shifted <= 0):
        return False
    At[np.diag_indices(n)] = shifted
    R, info = lapack.dpotrf(At, lower=0, clean=1, overwrite_a=1)
    if info != 0:
        return False
    rd = np.diag(R)
    return bool(np.all(np.isfinite(R)) and np.all(rd > 0))


def l2_upper(x: np.ndarray, squared: bool = False) -> float:
    """Upper bound on the exact 2-norm (or its square) of the float array x (real/complex)."""
    x = np.asarray(x)
    v = np.concatenate([x.real.ravel(), x.imag.ravel()]) if np.iscomplexobj(x) else x.ravel()
    v = np.asarray(v, dtype=np.float64)
    L = v.size
    if L == 0 or not np.any(v):
        return 0.0
    with np.errstate(over="ignore"):
        s = float(np.dot(v, v))
    if not math.isfinite(s):
        return math.inf
    # nonnegative terms: |fl(sum x_i^2) - sum x_i^2| <= gamma_L sum x_i^2 (+ underflow L*eta)
    s2 = up_add(up(s / down(1.0 - gamma(L))), up_mul(L, ETA))
    return s2 if squared else up(math.sqrt(s2))


class GramCert:
    """Rigorous Gram data of a float matrix M for proving ||M_true||_2 <= t.

    ``err`` bounds ||M_true - M||_2 (e.g. the DFT rounding of M).  The Gram
    G = fl(M^H M) of the smaller side is formed once; E = G - M^H M satisfies
    (any summation order, m terms per entry)
        real:    |E_ij| <= gamma_m (|M|^T|M|)_ij
        complex: |Re E_ij|, |Im E_ij| <= gamma_{2m+1} (|M|^T|M|)_ij
    (G_re = [A;B]^T[A;B], G_im = X - X^T with X = A^T B; Cauchy-Schwarz gives the
    |M| bound), so ||E||_2 <= ||E||_F <= (sqrt 2) gamma ||M||_F^2 (+ underflow terms).
    ``check(t)`` proves (t - err)^2 I - M^H M is PD via ``is_spd``.
    """

    def __init__(self, M: np.ndarray, err: float = 0.0):
        M = np.asarray(M)
        if np.iscomplexobj(M) and not np.any(M.imag):
            M = M.real
        M = np.asarray(M, dtype=np.complex128 if np.iscomplexobj(M) else np.float64)
        if M.ndim != 2:
            raise ValueError(f"expected a matrix, got shape {M.shape}")
        if not np.all(np.isfinite(M)):
            raise ValueError("matrix has non-finite entries")
        if M.shape[0] < M.shape[1]:
            M = M.T                      # same singular values; Gram of the smaller side
        part = np.abs(np.concatenate([M.real.ravel(), M.imag.ravel()])) if np.iscomplexobj(M) else M
        _, k = _pow2_rescale(np.asarray(part), 0) if M.size else (None, 0)
        self.k = k                       # M is scaled by 2^k exactly (err too, rounded up)
        M = np.ldexp(M.real, k) + 1j * np.ldexp(M.imag, k) if np.iscomplexobj(M) else np.ldexp(M, k)
        self.err = up(math.ldexp(float(err), k)) if err else 0.0
        self.zero = not np.any(M)
        m, n = M.shape
        self.n, self.complex = n, np.iscomplexobj(M)
        if self.complex:
            A, B = M.real, M.imag
            C = np.concatenate([A, B], axis=0)
            Gr = C.T @ C
            Gr = np.triu(Gr) + np.triu(Gr, 1).T
            X = A.T @ B
            self.Gr, self.Gi = Gr, X - X.T
            g = gamma(2 * m + 1)
            e = up_mul(up_mul(SQRT2_UP, g), l2_upper(M, squared=True))
            e = up_add(e, up_mul(4 * n * m, ETA))
        else:
            G = M.T @ M
            self.Gr, self.Gi = np.triu(G) + np.triu(G, 1).T, None
            e = up_add(up_mul(gamma(m), l2_upper(M, squared=True)), up_mul(n * m, ETA))
        self.gram_err = e

    def _scaled_t(self, t: float) -> float:
        ts = math.ldexp(float(t), self.k)
        return ts if math.ldexp(ts, -self.k) <= t else down(ts)

    def check(self, t: float) -> bool:
        """True only if ||M_true||_2 <= t is proven."""
        if not (math.isfinite(t) and t >= 0):
            return False
        ts = self._scaled_t(t)
        t1 = ts if self.err == 0 else down(ts - self.err)
        if t1 < 0:
            return False
        if self.zero:
            return True
        s = down(down(t1 * t1) - self.gram_err)
        if not (s > 0 and math.isfinite(s)):
            return False
        S = -self.Gr
        S[np.diag_indices(self.n)] = np.nextafter(s - np.diag(self.Gr), -np.inf)
        if self.complex:                   # s I - (Gr + i Gi) = X + iY, X = S, Y = -Gi
            S = np.block([[S, self.Gi], [-self.Gi, S]])
        return is_spd(S)

    def estimate(self) -> float:
        """sqrt(lambda_max(fl(Gram))) / 2^k + err: an ESTIMATE of ||M_true||_2 (not proven)."""
        if self.zero:
            return self.err * 2.0 ** -self.k
        H = self.Gr + 1j * self.Gi if self.complex else self.Gr
        lam = scipy.linalg.eigh(H, eigvals_only=True, subset_by_index=[self.n - 1, self.n - 1])
        return (math.sqrt(max(float(lam[0]), 0.0)) + self.err) * 2.0 ** -self.k


def prove_norm_leq(M, t: float, *, err: float = 0.0, method: str = "gram") -> bool:
    """Prove ||M'||_2 <= t for every M' with ||M' - M||_2 <= err.  M: float matrix
    (real or complex) or a Dense operator.  method "gram" (default, see GramCert) or
    "block": Rump on [[t' I, M^H], [M, t' I]] with t' = t - err rounded down, which is
    PD iff t' > ||M||_2 (no Gram rounding; larger matrix)."""
    if hasattr(M, "weight"):
        M = M.weight
    M = np.asarray(M)
    if method == "gram":
        return GramCert(M, err).check(t)
    if method != "block":
        raise ValueError(f"unknown method {method!r}")
    t1 = float(t) if not err else down(float(t) - float(err))
    if not (t1 > 0 and math.isfinite(t1)):
        return bool(t1 == 0 and not np.any(M))
    R = real_embedding(M.astype(np.complex128)) if np.iscomplexobj(M) else np.asarray(M, np.float64)
    m, n = R.shape
    S = np.block([[t1 * np.eye(n), R.T], [R, t1 * np.eye(m)]])
    return is_spd(S)
