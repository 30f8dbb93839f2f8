"""Exact-SVD verifier: sound spectral-norm upper bounds for Dense and Conv2d.

Guarantee.  :func:`bound`, :func:`dense_bound` and :func:`conv_bound` return a
:class:`~certlib.bounds.Bound` ``b`` with ``||op||_2 <= b.value`` for the
operator in EXACT real arithmetic (weights taken as the stored doubles).  All
work is IEEE float64 / complex128, round-to-nearest, unit roundoff
``U = 2**-53``; every rounding error is bounded a priori and added, and every
final step rounds upward (``math.nextafter``).  ``circular_conv_norm`` and
``continuous_frequency_sup`` are plain float64 values (no margin): oracles.

How a bound is proven (per matrix block ``K``; Gram ``G = K^H K``, smaller side r):
  * the candidate comes from LAPACK (``eigvalsh`` of the Gram, or ``svd``);
  * proof A (tight, explicit constants): a floating-point Cholesky of
    ``B = fl(s I - Ghat)`` runs to completion.  Higham (2002) Thm 10.3 gives
    ``R^H R = B + D``, ``|D| <= g |R^H||R|`` (``g = gamma(n+1)``; complex
    arithmetic: ``gamma(n+3)``, Higham 3.6; we use ``gamma(2r+8)``), hence
    ``||D||_2 <= g/(1-g) tr(B)`` (Cauchy-Schwarz on columns of R), so
    ``lambda_min(B) >= -g/(1-g) tr(B)`` and
    ``lambda_max(G) <= s + g/(1-g) tr(B) + 2U max|b_ii| + ||Ghat-G||_2``
    (the middle term: rounding of the diagonal shift).  This is Rump's (2006)
    verified-positive-definiteness argument;
  * proof B (fallback): backward stability of the LAPACK SVD / Hermitian
    eigensolver: computed values are exact for ``A + E``,
    ``||E||_2 <= p(m,n) U ||A||_2`` with ``p = SVD_P(m,n)`` below;
  * proof C (cheap, used to prune): ``||K|| <= min(||K||_F, sqrt(||K||_1 ||K||_inf))``.
  ``||Ghat - G||_2 <= ||Ghat - G||_F <= gamma(2L+4) ||K||_F^2`` (inner
  products of length L, complex; Frobenius submultiplicativity).
Underflow: inputs are scaled by an exact power of two so the largest entry is
in [0.5, 1); any remaining underflow adds absolute errors < 2**-1000 in every
quantity, covered by ``ABS_PAD = 2**-960``.
Assumptions (stated, not checked): BLAS gemm/herk use conventional (not
Strassen-like) products; LAPACK potrf evaluates the textbook Cholesky recurrences
in some order (blocked or not), as Rump's criterion and INTLAB's isspd assume;
libm cos/sin err by <= 3 ulp; hypot by <= 1 ulp.  Work runs with ``THREADS``
BLAS/LAPACK/torch threads (restored afterwards).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np

from certlib.bounds import Bound, up, up_add, up_mul
from certlib.verifiers.operators import Conv2d, Dense
from certlib.verifiers.svd_blocks import (ABS_PAD, SVD_P, U, _certify_top, _cheap_bounds, _gamma, _grams,  # noqa: F401
                                          _inflate, _MaxSigma, _pow2_scale, _require_finite, _threads, _unscale)

__all__ = ["bound", "dense_bound", "conv_bound", "circular_conv_bound", "circular_conv_norm",
           "continuous_frequency_sup", "conv_grid", "U", "SVD_P", "TWIDDLE_ERR", "ABS_PAD",
           "THREADS"]

#: error of each computed twiddle cos/sin (2 pi j / M): the angle fl(fl(j/M)*fl(2pi)),
#: reduced to [0, pi], is off by < 3.01 U * pi < 9.5 U; libm cos/sin < 1 ulp (<= 2 U) --
#: 16 U leaves room for a libm up to ~3 ulp.
TWIDDLE_ERR = 16.0 * U
#: blocks per chunk limit (complex entries) for the frequency sweep.
CHUNK_ELEMS = 2 ** 21
#: where the convolution engine runs: None = numpy on the CPU (default); a torch
#: device ("cpu", "cuda") = verifiers/svd_torch.py there.  Set with :func:`on_device`.
_DEVICE: contextvars.ContextVar = contextvars.ContextVar("certlib_svd_device", default=None)


@contextlib.contextmanager
def on_device(device: str | None, torch_on_cpu: bool = False):
    """Run the exact method's convolution bounds (frequency blocks, Grams,
    Cholesky proofs, eigenvalues) in torch float64 on ``device`` inside this
    block; ``None`` or "cpu" keeps the numpy engine (the default) unless
    ``torch_on_cpu`` (tests compare the two engines that way)."""
    keep_numpy = device is None or (str(device) == "cpu" and not torch_on_cpu)
    tok = _DEVICE.set(None if keep_numpy else str(device))
    try:
        yield
    finally:
        _DEVICE.reset(tok)


#: BLAS/LAPACK/torch threads used inside the verifier.  Multi-threaded LAPACK
#: (notably the Hermitian eigensolver) slows down 100x when cores are shared.
THREADS = 1


# ----------------------------------------------------------------------------- dense

def dense_bound(weight) -> Bound:
    """Sound upper bound on ||W||_2 for a real (m, n) matrix, float64.

    Candidate: LAPACK SVD sigma_hat of W * 2**-e (exact scaling, max entry in
    [0.5, 1), so tiny (1e-20, 1e-300) and huge (1e150) weights neither underflow
    nor overflow).  Proof B: ``sigma <= sigma_hat / (1 - SVD_P(m,n) U)``.
    Proof A (tight): Cholesky of ``s I - fl(Gram)`` at ``s ~ sigma_hat^2 (1+eta)``.
    The smaller of the proven values, times 2**e, is returned.  Zero -> 0.
    """
    W = np.asarray(weight, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"dense_bound needs a 2-D weight, got shape {W.shape}")
    _require_finite(W, "dense weight")
    if W.size == 0 or not np.any(W):
        return Bound(0.0, "svd", "zero matrix")
    Ws, e = _pow2_scale(W)
    m, n = Ws.shape
    pu = SVD_P(m, n) * U
    with _threads(THREADS):
        sig = float(np.linalg.svd(Ws, compute_uv=False)[0])
        svd_b = up_add(up(sig / (1.0 - 2 * pu)), ABS_PAD) if pu < 0.25 else math.inf
        best, rig = min(svd_b, float(_cheap_bounds(Ws[None])[0])), "svd backward error (proof B)"
        G, eG, r = _grams(Ws[None])
        chol_b = _certify_top(G[0], float(eG[0]), r, sig * sig)
    if chol_b < best:
        best, rig = chol_b, "Cholesky-verified Gram (proof A, Higham Thm 10.3)"
    return Bound(_unscale(best, e), "svd", rig,
                 {"sigma_hat": math.ldexp(sig, e), "svd_p": SVD_P(m, n), "scale_exp": e})


# ----------------------------------------------------------------------------- conv

def _axis_plan(n: int, pb: int, pe: int, k: int, d: int, s: int):
    """Grid N and, for each tap a, (position q, phase r) on one axis (see conv_bound)."""
    t = d * np.arange(k)
    keff = d * (k - 1) + 1
    if s == 1:
        return max(n + max(pb, pe), n + pb + pe - keff + 1, keff), t, np.zeros(k, dtype=int)
    return -(-(n + pb + pe) // s), t // s, t % s


def _reduce(op: Conv2d):
    """(G, m, n', T) stride-1 kernel, tap positions (T, 2), grid (Nh, Nw)."""
    K = op.kernel
    c_out, cg, kh, kw = K.shape
    _, h, w = op.input_shape
    pt, pl, pb, pr = op.padding
    Nh, qh, rh = _axis_plan(h, pt, pb, kh, op.dilation[0], op.stride[0])
    Nw, qw, rw = _axis_plan(w, pl, pr, kw, op.dilation[1], op.stride[1])
    sh, sw = op.stride
    g = op.groups
    Kr = K.reshape(g, c_out // g, cg, kh * kw)
    A = np.arange(kh * kw)
    Kp = np.zeros((g, c_out // g, cg, sh, sw, kh * kw))
    Kp[:, :, :, np.repeat(rh, kw), np.tile(rw, kh), A] = Kr
    pos = np.stack([np.repeat(qh, kw), np.tile(qw, kh)], axis=1)
    return Kp.reshape(g, c_out // g, cg * sh * sw, kh * kw), pos, (Nh, Nw)


def conv_grid(op: Conv2d) -> tuple[int, int]:
    """The circular grid (Nh, Nw) on which conv_bound bounds ``op`` (after polyphase)."""
    return _reduce(op)[2]


def _half_freqs(Nh: int, Nw: int) -> np.ndarray:
    wh, ww = np.meshgrid(np.arange(Nh), np.arange(Nw), indexing="ij")
    wh, ww = wh.ravel(), ww.ravel()
    keep = wh * Nw + ww <= ((-wh) % Nh) * Nw + (-ww) % Nw
    return np.stack([wh[keep], ww[keep]], axis=1)


def _twiddles(M: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of 2 pi j / M for j < M, each within TWIDDLE_ERR (angle reduced to [0, pi])."""
    c, s = np.empty(M), np.empty(M)
    two_pi = 2.0 * math.pi
    for j in range(M):
        jj = j if 2 * j <= M else M - j
        th = two_pi * (jj / M)
        c[j] = math.cos(th) if j else 1.0
        s[j] = (math.sin(th) if 2 * j <= M else -math.sin(th)) if j else 0.0
    return c, s


def _block_engine(Kp: np.ndarray, pos: np.ndarray, grid) -> tuple[float, float, dict]:
    """Max over groups and frequencies of proven sigma bounds; plus the DFT error bound."""
    g, m, n2, T = Kp.shape
    Nh, Nw = grid
    M = Nh * Nw
    ct, st = _twiddles(M)
    F = _half_freqs(Nh, Nw)
    if np.all(pos == pos[0]):  # one tap position: Khat(w) = phase(w) * Khat(0), same sigmas
        F = F[:1]
    J = (np.outer(F[:, 0], pos[:, 0]) * Nw + np.outer(F[:, 1], pos[:, 1]) * Nh) % M  # (nF, T)
    KT = np.ascontiguousarray(Kp.reshape(-1, T).T)  # (T, g m n2)

    def blocks(fidx):
        out = np.empty((len(fidx), KT.shape[1]), dtype=np.complex128)
        out.real = ct[J[fidx]] @ KT
        out.imag = st[J[fidx]] @ KT  # sign of the phase is irrelevant (conjugate blocks)
        return out.reshape(len(fidx) * g, m, n2)

    fb = max(1, CHUNK_ELEMS // (g * m * n2))
    if _DEVICE.get() is not None:  # the same sweep in torch on that device (verifiers/svd_torch.py)
        from certlib.verifiers.svd_torch import block_max

        eng = block_max(ct, st, J, KT, fb, (g, m, n2), _DEVICE.get())
    else:
        order = np.arange(len(F))
        if len(F) > fb:  # pass 1: cheap bounds, to visit the largest blocks first
            ub = np.concatenate([_cheap_bounds(blocks(order[i:i + fb])).reshape(-1, g).max(axis=1)
                                 for i in range(0, len(F), fb)])
            order = np.argsort(-ub, kind="stable")
        eng = _MaxSigma()
        for i in range(0, len(F), fb):
            eng.add(blocks(order[i:i + fb]))
    # DFT error: per entry |err| <= sqrt2 * delta * S[o,c], S = sum_a |K_a|.
    delta = up_add(TWIDDLE_ERR, up_mul(_gamma(T), up(1.0 + TWIDDLE_ERR)))
    S = np.abs(Kp).sum(axis=-1)
    sfro = max(_inflate(float(np.sqrt(np.sum(S[i] * S[i]))), T + 2 * m * n2 + 4) for i in range(g))
    eps = up_add(up_mul(up_mul(up(math.sqrt(2.0)), delta), up(sfro)), ABS_PAD)
    info = {"grid": (Nh, Nw), "blocks": eng.n_blocks, "pruned": eng.n_pruned,
            "cholesky": eng.n_chol, "exact": eng.n_exact, "dft_err": eps}
    return eng.cur, eps, info


def _engine_bound(Kp, pos, grid, method: str, rigor: str) -> Bound:
    if not np.any(Kp):
        return Bound(0.0, method, "zero kernel", {"grid": tuple(grid)})
    Ks, e = _pow2_scale(Kp)
    with _threads(THREADS):
        core, eps, info = _block_engine(Ks, pos, grid)
    info["core"] = math.ldexp(core, e)
    return Bound(_unscale(up_add(core, eps), e), method, rigor, info)


def conv_bound(op: Conv2d) -> Bound:
    """Sound upper bound on the spectral norm of a Conv2d (float64, proofs in module doc).

    Reduction (per axis; the 2-D maps are products of the 1-D ones):
      * dilation d: taps sit at positions t = d a (a larger kernel with zeros).
      * stride s > 1: x -> xpad (isometric embedding, P = n + p_b + p_e), extended by
        zeros to s ceil(P/s) (isometry), space-to-depth X'[(c,r)][j] = xpad[c, s j + r]
        (a permutation).  y[i] = sum_t K_t xpad[s i + t] = sum_{(r,q)} K'[(c,r),q] X'[(c,r)][i+q]
        with t = s q + r, a stride-1 VALID conv on P' = ceil(P/s) positions whose kernel
        has ceil(k_eff/s) <= P' taps; the original outputs are a subset (i + q_max <= P'-1):
        a crop, i.e. a contraction.  Grid N = P'.
      * a valid conv on P' positions equals, on outputs i <= P'-k', the circular conv on
        any N >= P' (x embedded at 0..P'-1; indices i+q < N never wrap): crop again.
      * stride 1 (tighter): embed x at 0..n-1 of an N-grid; output i reads index
        j = i + t - p_b in [-p_b, n + p_e - 1].  If N >= n + p_b, negative j alias to
        [N - p_b, N) (outside [0, n), zeros, like the padding); if N >= n + p_e, j in
        [n, n + p_e) stay outside [0, n); outputs 0..P-k_eff are distinct mod N when
        N >= P - k_eff + 1.  So y = crop(circular conv on N), N = max(n + max(p_b, p_e),
        P - k_eff + 1, k_eff).  (The circular conv on the n-grid itself is NOT a bound.)
      * groups: block diagonal, so the norm is the max over groups.
    The circular conv on N is block-diagonalised by the 2-D DFT (Sedghi et al. 2019):
    its norm is max_w ||Khat(w)||_2, Khat(w) = sum_a K'_a exp(-2 pi i <q_a, w/N>); the
    sum over taps with positions taken mod N folds (never crops) the kernel.  Khat(-w)
    = conj(Khat(w)), so only half the frequencies are visited.
    DFT rounding: Khat is computed by a real matrix product over the T taps with
    twiddles accurate to TWIDDLE_ERR, so each entry errs by <= sqrt2 * delta * S[o,c],
    delta = TWIDDLE_ERR + gamma(T)(1 + TWIDDLE_ERR), S = sum_a |K_a|; we add
    ||E(w)||_2 <= sqrt2 * delta * ||S||_F (max over groups).  Each block's sigma is bounded
    by proof C (pruning), proof A (Cholesky at the running maximum) or eigvalsh + proof A/B.
    """
    if not isinstance(op, Conv2d):
        raise ValueError(f"conv_bound needs a Conv2d, got {type(op).__name__}")
    _require_finite(op.kernel, "conv kernel")
    Kp, pos, grid = _reduce(op)
    return _engine_bound(Kp, pos, grid, "fft-block-svd",
                         "DFT block diagonalisation + Cholesky-verified blocks")


def circular_conv_bound(kernel, grid, groups: int = 1) -> Bound:
    """Sound upper bound on the circular conv of a (c_out, c_in/g, kh, kw) kernel on grid (Nh, Nw)."""
    K = np.asarray(kernel, dtype=np.float64)
    _require_finite(K, "kernel")
    Nh, Nw = (grid, grid) if np.isscalar(grid) else tuple(int(v) for v in grid)
    c_out, cg, kh, kw = K.shape
    pos = np.stack([np.repeat(np.arange(kh), kw), np.tile(np.arange(kw), kh)], axis=1)
    Kp = K.reshape(groups, c_out // groups, cg, kh * kw)
    return _engine_bound(Kp, pos, (Nh, Nw), "fft-block-svd", "circular conv, folded kernel")


def bound(op) -> Bound:
    """Sound spectral-norm Bound of a Dense or Conv2d operator (ValueError otherwise)."""
    if isinstance(op, Dense):
        return dense_bound(op.weight)
    if isinstance(op, Conv2d):
        return conv_bound(op)
    raise ValueError(f"svd verifier: unsupported operator {type(op).__name__}")


# ----------------------------------------------------------------------------- oracles

def _max_sv_fft(Kp: np.ndarray, pos: np.ndarray, Nh: int, Nw: int) -> float:
    g, m, n2, T = Kp.shape
    Kf = np.zeros((g, m, n2, Nh, Nw))
    for a in range(T):  # fold: taps added modulo the grid (never cropped)
        Kf[..., pos[a, 0] % Nh, pos[a, 1] % Nw] += Kp[..., a]
    Kh = np.fft.rfft2(Kf, axes=(-2, -1)).reshape(g, m, n2, -1)
    Kh = np.moveaxis(Kh, -1, 1).reshape(-1, m, n2)
    step = max(1, CHUNK_ELEMS // (m * n2))
    return max(float(np.linalg.svd(Kh[i:i + step], compute_uv=False)[:, 0].max())
               for i in range(0, Kh.shape[0], step))


def circular_conv_norm(kernel, grid) -> float:
    """Spectral norm of the circular conv of a (c_out, c_in, kh, kw) kernel on grid (Nh, Nw).

    float64, no margin (an oracle).  A kernel larger than the grid is folded modulo N.
    """
    K = np.asarray(kernel, dtype=np.float64)
    _require_finite(K, "kernel")
    Nh, Nw = (grid, grid) if np.isscalar(grid) else tuple(int(v) for v in grid)
    c_out, c_in, kh, kw = K.shape
    pos = np.stack([np.repeat(np.arange(kh), kw), np.tile(np.arange(kw), kh)], axis=1)
    return _max_sv_fft(K.reshape(1, c_out, c_in, kh * kw), pos, Nh, Nw)


def continuous_frequency_sup(op: Conv2d, oversample: int = 8) -> float:
    """max ||Khat(w)||_2 of conv_bound's reduced kernel on the (oversample*Nh, oversample*Nw) grid.

    That grid contains conv_bound's grid, so this is >= conv_bound's core value (up to
    rounding); it is a LOWER estimate of the continuous supremum (no margin).
    """
    _require_finite(op.kernel, "conv kernel")
    Kp, pos, (Nh, Nw) = _reduce(op)
    return _max_sv_fft(Kp, pos, oversample * Nh, oversample * Nw)
