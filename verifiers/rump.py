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

Families (``certlib.verifiers.family.prove_family``): ||op||_2 <= max over the blocks of a family (one
matrix; or the DFT blocks of a convolution, power.ConvFamily), each block known up
to an error bound.  Every block is proven <= t by ``GramCert``; t = s (1 + delta)
starts from an estimate s, and a failing block raises s to its (unproven) estimate,
or, if t would not move, delta x10.  t only grows, so blocks proven for an earlier
t stay proven; worker processes can take shares of the blocks (result: the largest t).
A family is scaled by an exact power of two 2^k (attribute k); t is scaled back
rounded up.

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

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
    threadpool_limits = None

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
    """(A 2^k, k) with max|A 2^k| in [2^(target-1), 2^target), when that is exact."""
    m = float(np.max(np.abs(A))) if A.size else 0.0
    if m == 0.0 or not math.isfinite(m):
        return A, 0
    k = target_exp - math.frexp(m)[1]
    As = np.ldexp(A, k)
    # scaling up cannot lose bits (no overflow: max < 2^target); scaling down may (subnormals)
    if k >= 0 or np.array_equal(np.ldexp(As, -k), A):
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
    if A64.shape[0] == 0:
        return True
    A64, _ = _pow2_rescale(A64, 1)   # PD is invariant under exact scaling by 2^k
    return _rump_cholesky(np.array(A64, dtype=np.float64, order="C"))


def _rump_cholesky(S: np.ndarray) -> bool:
    """Rump's check on the symmetric matrix whose LOWER triangle (row-major view) is
    that of S, i.e. the upper triangle LAPACK reads from the column-major S^T; the
    other triangle is ignored.  S: float64, finite, n >= 1 (not re-checked); it is
    overwritten.  C-contiguous S costs no copy; F-contiguous S must be symmetric."""
    n = S.shape[0]
    d = np.diag(S).copy()
    if np.any(d <= 0):
        return False
    c = rump_shift(n, up(math.fsum(d.tolist())), float(d.max()))
    shifted = np.nextafter(d - c, -np.inf)        # <= A_ii - c exactly
    if np.any(shifted <= 0):
        return False
    At = S.T if S.flags.c_contiguous else S       # column-major view, no copy
    At[np.diag_indices(n)] = shifted
    R, info = lapack.dpotrf(At, lower=0, clean=0, overwrite_a=1)
    # an overflow (inf) or NaN anywhere in column j reaches r_jj (r_jj = sqrt(a_jj -
    # sum r_kj^2)), and some kernels do not flag NaN: check every diagonal element
    rd = np.diag(R)
    return bool(info == 0 and np.all(np.isfinite(rd)) and np.all(rd > 0))


def l2_upper(x: np.ndarray, squared: bool = False) -> float:
    """Upper bound on the exact 2-norm (or its square) of the float array x (real/complex)."""
    x = np.ascontiguousarray(x)
    v = (x.astype(np.complex128, copy=False).view(np.float64) if np.iscomplexobj(x)
         else x.astype(np.float64, copy=False)).ravel()       # real and imaginary parts
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
    ``check(t)`` proves (t - err)^2 I - M^H M is PD with Rump's check on the float
    matrix S = s I - G (diagonal rounded down, s <= (t - err)^2 - ||E||_2 rounded
    down; the real embedding when complex): S PD => (t-err)^2 I - M^H M PD.
    """

    def __init__(self, M: np.ndarray, err: float = 0.0, *, stacked: bool = False):
        """M: a real or complex matrix; or, with stacked=True, the real (2m, n) array
        [Re M; Im M] (what ConvFamily produces, no copy needed)."""
        M = np.asarray(M)
        if stacked:
            if M.ndim != 2 or M.shape[0] % 2:
                raise ValueError(f"stacked [Re; Im] needs an even number of rows, got {M.shape}")
            m2 = M.shape[0] // 2
            if not np.any(M[m2:]):
                M, stacked = M[:m2], False
            elif m2 < M.shape[1]:       # transpose both parts: Gram of the smaller side
                M = np.concatenate([M[:m2].T, M[m2:].T], axis=0)
        else:
            if M.ndim != 2:
                raise ValueError(f"expected a matrix, got shape {M.shape}")
            if np.iscomplexobj(M):
                M = M.astype(np.complex128, copy=False)
                if M.shape[0] < M.shape[1]:
                    M = M.T              # same singular values; Gram of the smaller side
                stacked = bool(np.any(M.imag))
                M = np.concatenate([M.real, M.imag], axis=0) if stacked else M.real
            if not stacked and M.shape[0] < M.shape[1]:
                M = M.T
        M = np.ascontiguousarray(M, dtype=np.float64)
        fro2 = l2_upper(M, squared=True)     # ||M||_F^2 (real and imaginary parts)
        if not math.isfinite(fro2):
            mx = float(np.max(np.abs(M)))
            if not math.isfinite(mx):
                raise ValueError("matrix has non-finite entries")
        k = 0
        if not (2.0 ** -300 <= math.sqrt(fro2) <= 2.0 ** 300):   # rescale extreme ranges only
            M, k = _pow2_rescale(M, 0)
            fro2 = l2_upper(M, squared=True)
        self.k = k                       # M is scaled by 2^k exactly (err too, rounded up)
        self.err = up(math.ldexp(float(err), k)) if err else 0.0
        self.zero = not np.any(M)
        self.complex = stacked
        # Only the lower triangle of Gr is used (each entry a computed dot product);
        # Gi = fl(X - X^T) is exactly antisymmetric.
        if stacked:
            m, n = M.shape[0] // 2, M.shape[1]
            X = M[:m].T @ M[m:]                               # A^T B
            self.Gr, self.Gi = M.T @ M, X - X.T               # [A;B]^T [A;B] = A^TA + B^TB
            e = up_mul(up_mul(SQRT2_UP, gamma(2 * m + 1)), fro2)
            e = up_add(e, up_mul(4 * n * m, ETA))
        else:
            m, n = M.shape
            self.Gr, self.Gi = M.T @ M, None
            e = up_add(up_mul(gamma(m), fro2), up_mul(n * m, ETA))
        self.n = n
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
        n = self.n
        dg = np.nextafter(s - np.diag(self.Gr), -np.inf)   # <= s - G_ii exactly
        if self.complex:    # s I - (Gr + i Gi) = X + iY: embedding [[X, -Y], [Y, X]], Y = -Gi
            S = np.empty((2 * n, 2 * n))           # only the lower triangle is read
            np.negative(self.Gr, out=S[:n, :n])
            S[n:, n:] = S[:n, :n]
            np.negative(self.Gi, out=S[n:, :n])
            S[:n, n:] = 0.0                         # (unread)
            S[np.diag_indices(2 * n)] = np.concatenate([dg, dg])
        else:
            S = np.negative(self.Gr)
            S[np.diag_indices(n)] = dg
        return _rump_cholesky(S)

    def estimate(self) -> float:
        """sqrt(lambda_max(fl(Gram))) / 2^k + err: an ESTIMATE of ||M_true||_2 (not proven)."""
        if self.zero:
            return self.err * 2.0 ** -self.k
        H = self.Gr + 1j * self.Gi if self.complex else self.Gr
        lam = scipy.linalg.eigh(H, lower=True, eigvals_only=True, check_finite=False,
                                subset_by_index=[self.n - 1, self.n - 1])
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
