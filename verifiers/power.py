"""Power iteration (an Estimate) and its proof via Rump's criterion (a Bound).

``estimate`` runs power iteration on the TRUE operator (the dense matrix, or the
zero-padded strided/dilated/grouped convolution and its exact adjoint).  Its value
||A v|| for a unit v is a LOWER bound on sigma_max: only an Estimate.

``prove(op, t)`` proves t >= ||op||_2 by showing t^2 I - M^H M positive definite
with :func:`certlib.verifiers.rump.is_spd` for every block M of a family whose
largest block norm bounds ||op||_2:

* Dense: one block, W itself.
* Conv2d, explicit (small): one block, op.to_dense() (checked to be exact).
* Conv2d, DFT blocks (this module's own block diagonalisation):
    1. zero padding: the padded input (Hp x Wp, Hp = h + top + bottom) is an
       isometric embedding of x;
    2. stride s (and dilation d, by spreading the taps to positions d*a): polyphase.
       Tap position d*a = s*q + r maps to offset q and input phase r; the padded
       input rearranged space-to-depth (channel c*s_h*s_w + r_h*s_w + r_w, cell m
       holds padded position s*m + r) is again an isometric embedding E of x, and
       the conv reads cell i + q of phase r for output i;
    3. circular relaxation, per axis on a grid N (``_axis_grid``): y = Crop(C_N(E x))
       with C_N the stride-1 circular conv (offsets q, taps folded modulo N, never
       cropped) provided (a) oh <= N and every x cell fits (cell < N), and (b) for
       every kept output i and tap: the circular read (i + q) mod N is an x cell
       iff the true read s*i + d*a is, and then it is the same cell.  Crop is a
       contraction and E an isometry, so ||op|| <= ||C_N||.  N = ceil(Hp / s)
       always satisfies (b) (no read wraps); we take the smallest N that does
       (stride 1: N = max(oh, n + max(pad_begin, pad_end)), proofs/zero_padding.md:
       N >= n + pad, never the unpadded grid of a padded conv);
    4. the circular conv is block diagonalised by the unitary 2-D DFT:
       ||op|| <= max_{w, group} ||K_hat_g(w)||_2, K_hat(w) = sum_q K'_q e^{2 pi i <w, q/N>}.
       Real kernels give K_hat(-w) = conj(K_hat(w)), so half the frequencies suffice.
  DFT rounding: K_hat(w) is computed as a length-P dot product with twiddles from
  ``math.cos/sin`` (assumed accurate to 2 ulp; the angle 2 pi j / L costs gamma_3 * 2 pi),
  so every computed twiddle component has absolute error <= MU_TWIDDLE = 64 u and
  every entry of K_hat has |error| <= eps_dft * sum_q |K'_q| (real and imaginary
  part), eps_dft = gamma_P (1 + mu) + mu (+ 2 P eta underflow).  Hence
  ||K_hat_true - K_hat||_2 <= sqrt(2) (eps_dft ||L1||_F + 2 P eta sqrt(#entries)),
  which is passed to GramCert as ``err``.  Blocks with ||K_hat||_F + err <= t are
  settled by that cheap bound; the others get the Cholesky proof.  Blocks are
  computed a chunk of frequencies at a time (one pass over the taps per chunk).

``power_bound`` = estimate, candidate t = s (1 + delta), prove; on failure the
candidate s is refined by the failing block's (unproven) Gram eigenvalue and, if
that does not move t, delta is raised x10.  t only grows, so blocks proven for an
earlier t stay proven.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from certlib.bounds import Bound, Estimate, up, up_add, up_mul, up_sqrt

from .operators import Conv2d, Dense, LinearOperator
from .family import DenseFamily, prove_family
from .rump import ETA, U, _pow2_rescale, down, gamma, l2_upper

__all__ = ["estimate", "prove", "power_bound", "MU_TWIDDLE", "ESTIMATE_SHADE",
           "DenseFamily", "ConvFamily", "family", "prove_family"]

MU_TWIDDLE = 64 * U       #: assumed |computed - exact| of each twiddle cos/sin component
ESTIMATE_SHADE = 1e-12    #: an Estimate is ||Av||/||v|| (float64) times (1 - this)


# ----------------------------------------------------------------- estimate
def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "float64": torch.float64}[np.dtype(dtype).name]


def _pow2(a: np.ndarray) -> np.ndarray:
    """a scaled by 2^k, max |a| in [0.5, 1) (only the direction matters in the iteration)."""
    m = float(np.max(np.abs(a))) if a.size else 0.0
    return np.ldexp(a, -math.frexp(m)[1]) if m > 0 and math.isfinite(m) else a


def _torch_pair(op: LinearOperator, dt: torch.dtype):
    """(c A, c A^T) on batched torch tensors in dtype dt, c = 2^k > 0 (no overflow)."""
    if isinstance(op, Dense):
        W = torch.from_numpy(_pow2(op.weight)).to(dt)
        return (lambda x: x @ W.T), (lambda y: y @ W)
    if isinstance(op, Conv2d):
        K = torch.from_numpy(_pow2(op.kernel)).to(dt)
        pt, pl, pb, pr = op.padding
        _, h, w = op.input_shape
        keh, kew = op.effective_kernel_size
        sh, sw = op.stride
        opad = ((h + pt + pb - keh) % sh, (w + pl + pr - kew) % sw)
        kw = dict(stride=op.stride, dilation=op.dilation, groups=op.groups)

        def f(x):
            return F.conv2d(F.pad(x, (pl, pr, pt, pb)), K, **kw)

        def ft(y):
            z = F.conv_transpose2d(y, K, output_padding=opad, **kw)
            return z[:, :, pt:pt + h, pl:pl + w]
        return f, ft
    return (lambda x: torch.from_numpy(op.matvec(x.double().numpy())).to(dt),
            lambda y: torch.from_numpy(op.rmatvec(y.double().numpy())).to(dt))


def estimate(op: LinearOperator, n_iter: int = 100, v0=None, dtype=np.float32,
             tol: float = 1e-7, seed: int = 0) -> Estimate:
    """Power iteration on A^T A using op's true matvec/adjoint (in ``dtype``).

    Returns an :class:`Estimate` (NOT a bound): ||A v||/||v|| evaluated in float64 for
    the final vector v, times (1 - ESTIMATE_SHADE): a lower bound on sigma_max up to
    that float64 evaluation.  ``info["vector"]`` is the final unit vector (float64,
    input shape) for warm starts; stops early when the value changes by < tol."""
    dt = _torch_dtype(dtype)
    f, ft = _torch_pair(op, dt)
    shape = (1, *op.input_shape)
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(shape, generator=g, dtype=torch.float64) if v0 is None
         else torch.as_tensor(np.asarray(v0, np.float64).reshape(shape))).to(dt)
    if float(v.norm()) == 0:
        v = torch.randn(shape, generator=g, dtype=torch.float64).to(dt)
    v = v / v.norm()
    prev, it, converged = 0.0, 0, False
    with torch.no_grad():
        for it in range(1, n_iter + 1):
            u = f(v)
            w = ft(u)
            s, nw = float(u.norm()), w.norm()
            if float(nw) == 0:
                break
            v = w / nw
            if abs(s - prev) <= tol * s:
                converged = True
                break
            prev = s
    vf = v.double().numpy()[0]
    vf = vf / np.linalg.norm(vf)
    val = float(np.linalg.norm(op.matvec(vf)) / np.linalg.norm(vf)) * (1 - ESTIMATE_SHADE)
    return Estimate(val, "power", info={"vector": vf, "iterations": it, "converged": converged,
                                        "dtype": str(dt), "tol": tol})


# ----------------------------------------------------------------- block families
def _axis_ok(n: int, pb: int, pe: int, k: int, d: int, s: int, N: int) -> bool:
    """Conditions (a), (b) of the module docstring, step 3, for one axis and grid N."""
    oh = (n + pb + pe - d * (k - 1) - 1) // s + 1
    if N < oh or N < (pb + n - 1) // s + 1:
        return False
    for a in range(k):
        q, r = divmod(d * a, s)
        for i in range(oh):
            pos, m = s * i + d * a, (i + q) % N
            inside, inside_c = pb <= pos < pb + n, pb <= s * m + r < pb + n
            if inside != inside_c or (inside and m != i + q):
                return False
    return True


def _axis_grid(n: int, pb: int, pe: int, k: int, d: int, s: int) -> int:
    """The smallest valid grid; ceil((n + pads) / s) is always valid (no read wraps)."""
    top = -(-(n + pb + pe) // s)
    lo = max(1, (n + pb + pe - d * (k - 1) - 1) // s + 1, (pb + n - 1) // s + 1)
    return next(N for N in range(lo, top + 1) if _axis_ok(n, pb, pe, k, d, s, N))


class ConvFamily:
    """DFT blocks of the polyphase circular relaxation of a Conv2d (module docstring)."""

    def __init__(self, op: Conv2d, chunk: int = 8, grid=None, check_grid: bool = True):
        """grid: circular grid (N_h, N_w); default the smallest valid one (module
        docstring, step 3); another grid must pass the same check.  check_grid=False
        (tests only) allows any grid: then the blocks are those of the circular conv
        on that grid (taps folded modulo N), which need NOT bound op."""
        K, self.k = _pow2_rescale(op.kernel, 0)
        co, cig, kh, kw = K.shape
        (dh, dw), (sh, sw), g = op.dilation, op.stride, op.groups
        pt, pl, pb, pr = op.padding
        _, h, w = op.input_shape
        self.grid = (_axis_grid(h, pt, pb, kh, dh, sh), _axis_grid(w, pl, pr, kw, dw, sw))
        if grid is not None:
            grid = (int(grid[0]), int(grid[1]))
            if check_grid and not (_axis_ok(h, pt, pb, kh, dh, sh, grid[0])
                                   and _axis_ok(w, pl, pr, kw, dw, sw, grid[1])):
                raise ValueError(f"grid {grid} is not a valid circular relaxation of this conv")
            self.grid = grid
        offs, index = [], {}
        ci2 = cig * sh * sw
        taps = []
        for a in range(kh):
            qh, rh = divmod(dh * a, sh)
            for b in range(kw):
                qw, rw = divmod(dw * b, sw)
                if (qh, qw) not in index:
                    index[(qh, qw)] = len(offs)
                    offs.append((qh, qw))
                    taps.append(np.zeros((co, ci2)))
                # exact placement, no arithmetic: each (a, b) lands on its own (q, r)
                taps[index[(qh, qw)]][:, np.arange(cig) * sh * sw + rh * sw + rw] = K[:, :, a, b]
        self.taps = np.stack(taps)                                  # (P, co, ci2)
        self.offs = np.array(offs, dtype=np.int64)
        self.groups, self.cog, self.ci2, self.chunk = g, co // g, ci2, chunk
        self.stacked = True       # blocks() yields [Re; Im] stacks
        Nh, Nw = self.grid
        wh, ww = np.meshgrid(np.arange(Nh), np.arange(Nw), indexing="ij")
        wh, ww = wh.ravel(), ww.ravel()
        keep = (wh * Nw + ww) <= ((-wh) % Nh) * Nw + (-ww) % Nw      # one of each {w, -w}
        freqs = np.stack([wh[keep], ww[keep]], axis=1)
        # a fixed scrambled order: the norm is smooth in w, so the natural order would
        # raise the candidate t many times (each a refinement); any order is sound
        self.freqs = freqs[np.random.default_rng(0).permutation(len(freqs))]
        self.n_blocks = len(self.freqs) * g
        self.parallel = self.n_blocks >= 64 and self.cog * self.ci2 >= 128 * 128
        L = Nh * Nw
        step = math.tau / L
        self.cos = np.array([math.cos(step * j) for j in range(L)])
        self.sin = np.array([math.sin(step * j) for j in range(L)])
        P = len(offs)
        mu = MU_TWIDDLE
        eps = up_add(up_mul(gamma(P), up_add(1.0, mu)), mu)
        self.err = []
        for gi in range(g):
            tg = np.abs(self.taps[:, gi * self.cog:(gi + 1) * self.cog, :])
            l1f = up(l2_upper(tg.sum(axis=0)) / down(1.0 - gamma(P)))
            under = up_mul(2 * P * ETA, up_sqrt(tg[0].size))        # underflow of the products
            e = up_add(up_mul(eps, l1f), under) if tg.any() else 0.0
            self.err.append(up_mul(up(math.sqrt(2.0)), e) if e > 0 else 0.0)

    def _twiddles(self, freqs: np.ndarray):
        Nh, Nw = self.grid
        j = ((freqs[:, :1] * self.offs[None, :, 0]) % Nh * Nw
             + (freqs[:, 1:] * self.offs[None, :, 1]) % Nw * Nh) % (Nh * Nw)   # (F, P)
        return self.cos[j], self.sin[j]

    def _mats(self, freqs: np.ndarray, gi: int) -> np.ndarray:
        """(F, 2*cog, ci2): per frequency the stacked [Re K_hat; Im K_hat] (contiguous)."""
        c, s = self._twiddles(freqs)
        n, P = len(freqs), len(self.offs)
        W = np.empty((n, 2, P))
        W[:, 0], W[:, 1] = c, s
        T = self.taps[:, gi * self.cog:(gi + 1) * self.cog, :].reshape(P, -1)
        return (W.reshape(2 * n, P) @ T).reshape(n, 2 * self.cog, self.ci2)   # length-P dots

    def block(self, i: int):
        """(complex K_hat, err) of block i."""
        gi, fi = divmod(i, len(self.freqs))
        C = self._mats(self.freqs[fi:fi + 1], gi)[0]
        return C[:self.cog] + 1j * C[self.cog:], self.err[gi]

    def chunks(self):
        nf = len(self.freqs)
        return [list(range(gi * nf + lo, gi * nf + min(lo + self.chunk, nf)))
                for gi in range(self.groups) for lo in range(0, nf, self.chunk)]

    def blocks(self, idx):
        """[(C, err, frob)] for block indices of one group (a chunk): C = stacked
        [Re; Im] of the computed K_hat, the bound on its DFT error, and a sound bound
        on ||K_hat_true||_F."""
        nf = len(self.freqs)
        gi = idx[0] // nf
        Cs = self._mats(self.freqs[[i - gi * nf for i in idx]], gi)
        e = self.err[gi]
        out = []
        for C in Cs:
            f = l2_upper(C)
            out.append((C, e, up_add(f, e) if f or e else 0.0))
        return out


def _explicit_exact(op: Conv2d):
    """op.to_dense(), if every entry is 0 or a kernel entry (i.e. computed exactly)."""
    M = op.to_dense()
    vals = np.unique(np.abs(op.kernel))
    nz = np.abs(M[M != 0])
    return M if np.all(np.isin(nz, vals)) else None


def family(op: LinearOperator, mode: str = "auto", explicit_max: int = 1024):
    """The block family whose largest block norm bounds ||op||_2.  mode: "auto"
    (explicit matrix for small convs, else DFT blocks), "blocks" or "explicit"."""
    if isinstance(op, Dense):
        return DenseFamily(op.weight)
    if not isinstance(op, Conv2d):
        raise TypeError(f"no verifier for operator {type(op).__name__}")
    small = (min(op.in_dim, op.out_dim) <= explicit_max and max(op.in_dim, op.out_dim) <= 20000
             and op.in_dim * op.out_dim <= 4_000_000)
    if mode == "explicit" or (mode == "auto" and small):
        M = _explicit_exact(op)
        if M is not None:
            return DenseFamily(M, kind="explicit")
        if mode == "explicit":
            raise ValueError("explicit matrix of this conv is not exact")
    return ConvFamily(op)


def prove(op: LinearOperator, t: float, mode: str = "auto",
          workers: int | None = None) -> Bound | None:
    """A Bound with value t if t >= ||op||_2 is proven (Rump), else None.  For DFT
    blocks the proof is of the circular relaxation, so it can fail for t between
    the true norm and the relaxation's norm; it never succeeds below the truth."""
    fam = family(op, mode)
    res = prove_family(fam, t=float(t), workers=workers)
    if res is None:
        return None
    return Bound(float(t), "power-prove", "rump-cholesky", info={"family": _kind(fam), **res[1]})


def _kind(fam) -> str:
    return fam.kind if isinstance(fam, DenseFamily) else f"dft-blocks grid={fam.grid}"


def power_bound(op: LinearOperator, delta0: float = 1e-6, n_iter: int = 50,
                dtype=np.float32, tol: float = 1e-5, v0=None, mode: str = "auto",
                max_delta: float = 10.0, blas_threads: int | None = 1,
                workers: int | None = None) -> Bound:
    """Estimate by power iteration, then prove t = s (1 + delta), raising delta x10
    (and refining s on the failing block) until the proof succeeds."""
    t0 = time.perf_counter()
    est = estimate(op, n_iter=n_iter, v0=v0, dtype=dtype, tol=tol)
    t1 = time.perf_counter()
    fam = family(op, mode)
    t, stats = prove_family(fam, s0=est.value, delta0=delta0, max_delta=max_delta,
                            blas_threads=blas_threads, workers=workers)
    t2 = time.perf_counter()
    return Bound(t, "power", "rump-cholesky", info={
        "estimate": est.value, "iterations": est.info["iterations"],
        "converged": est.info["converged"], "delta": stats.pop("delta"),
        "seconds": t2 - t0, "seconds_estimate": t1 - t0, "seconds_proof": t2 - t1,
        "family": _kind(fam), **stats})
