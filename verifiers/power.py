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
       input, zero-extended to a multiple of s and rearranged space-to-depth
       (channels c*s_h*s_w + r_h*s_w + r_w), is again an isometric embedding, and the
       conv is a stride-1 VALID conv with c_in*s_h*s_w input channels on an
       N_h x N_w grid, N = ceil(Hp / s);
    3. a valid conv on an N-grid is a crop (a contraction) of the circular conv
       on the same grid (no tap wraps for a kept output; SOUNDNESS rule 2 with
       N >= n + pad); taps are folded modulo N implicitly (phase (w q mod N)/N),
       never cropped;
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
  settled by that cheap bound; the others get the Cholesky proof.

``power_bound`` = estimate, candidate t = s (1 + delta), prove; on failure the
candidate s is refined by the failing block's (unproven) Gram eigenvalue and, if
that does not move t, delta is raised x10.  t only grows, so blocks proven for an
earlier t stay proven.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from certlib.bounds import Bound, Estimate, up, up_add, up_mul, up_sqrt

from .operators import Conv2d, Dense, LinearOperator
try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
    threadpool_limits = None

from .rump import ETA, U, GramCert, down, gamma, l2_upper

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
def _rescale(a: np.ndarray) -> tuple[np.ndarray, int]:
    """(a * 2^k, k) with max |a 2^k| in [0.5, 1) when that scaling is exact, else (a, 0)."""
    m = float(np.max(np.abs(a))) if a.size else 0.0
    if m == 0.0 or not math.isfinite(m):
        return a, 0
    k = -math.frexp(m)[1]
    b = np.ldexp(a, k)
    return (b, k) if np.array_equal(np.ldexp(b, -k), a) else (a, 0)


def _to_scaled(t: float, k: int) -> float:
    """t * 2^k rounded DOWN (proving a smaller scaled t is the stronger statement)."""
    ts = math.ldexp(t, k)
    return ts if math.ldexp(ts, -k) == t else down(ts)


def _from_scaled(ts: float, k: int) -> float:
    """ts * 2^-k rounded UP."""
    t = math.ldexp(ts, -k)
    return t if math.ldexp(t, k) == ts else up(t)


class DenseFamily:
    """One exact block: a float matrix (Dense weight, or an exact explicit matrix),
    scaled by the exact power of two 2^k (attribute k) like every family."""

    def __init__(self, M: np.ndarray, kind: str = "dense"):
        self.M, self.k = _rescale(np.asarray(M, np.float64))
        self.kind, self.n_blocks = kind, 1

    def screen(self):
        return np.array([l2_upper(self.M)]), np.zeros(1)

    def block(self, i: int):
        return self.M, 0.0


class ConvFamily:
    """DFT blocks of the polyphase circular relaxation of a Conv2d (module docstring)."""

    def __init__(self, op: Conv2d, chunk: int = 8, grid=None, check_grid: bool = True):
        """grid: circular grid (N_h, N_w); default and minimum ceil((n + pads) / stride).
        A larger grid is also sound.  check_grid=False (tests only) allows a smaller
        grid: then the blocks are those of the circular conv on that grid (taps
        folded modulo N), which does NOT bound op."""
        K, self.k = _rescale(op.kernel)
        co, cig, kh, kw = K.shape
        (dh, dw), (sh, sw), g = op.dilation, op.stride, op.groups
        pt, pl, pb, pr = op.padding
        _, h, w = op.input_shape
        self.grid = (-(-(h + pt + pb) // sh), -(-(w + pl + pr) // sw))
        if grid is not None:
            grid = (int(grid[0]), int(grid[1]))
            if check_grid and (grid[0] < self.grid[0] or grid[1] < self.grid[1]):
                raise ValueError(f"grid {grid} is smaller than {self.grid}: not a relaxation of op")
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
        Nh, Nw = self.grid
        wh, ww = np.meshgrid(np.arange(Nh), np.arange(Nw), indexing="ij")
        wh, ww = wh.ravel(), ww.ravel()
        keep = (wh * Nw + ww) <= ((-wh) % Nh) * Nw + (-ww) % Nw      # one of each {w, -w}
        self.freqs = np.stack([wh[keep], ww[keep]], axis=1)
        self.n_blocks = len(self.freqs) * g
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
            e = up_add(up_mul(eps, l1f), up_mul(2 * P * ETA, up_sqrt(tg[0].size))) if tg.any() else 0.0
            self.err.append(up_mul(up(math.sqrt(2.0)), e) if e > 0 else 0.0)

    def _twiddles(self, freqs: np.ndarray):
        Nh, Nw = self.grid
        j = ((freqs[:, :1] * self.offs[None, :, 0]) % Nh * Nw
             + (freqs[:, 1:] * self.offs[None, :, 1]) % Nw * Nh) % (Nh * Nw)   # (F, P)
        return self.cos[j], self.sin[j]

    def _mats(self, freqs: np.ndarray, gi: int) -> np.ndarray:
        c, s = self._twiddles(freqs)
        T = self.taps[:, gi * self.cog:(gi + 1) * self.cog, :].reshape(len(self.offs), -1)
        out = (c @ T) + 1j * (s @ T)                       # length-P dot products
        return out.reshape(len(freqs), self.cog, self.ci2)

    def block(self, i: int):
        gi, fi = divmod(i, len(self.freqs))
        return self._mats(self.freqs[fi:fi + 1], gi)[0], self.err[gi]

    def screen(self, iters: int = 2):
        """Per block: a sound Frobenius upper bound (+err), and a crude power estimate."""
        nf = len(self.freqs)
        frob, crude = np.empty(self.n_blocks), np.empty(self.n_blocks)
        rng = np.random.default_rng(0)
        for gi in range(self.groups):
            for lo in range(0, nf, self.chunk):
                fr = self.freqs[lo:lo + self.chunk]
                Ms = self._mats(fr, gi)
                for k, M in enumerate(Ms):
                    f = l2_upper(M)
                    frob[gi * nf + lo + k] = up_add(f, self.err[gi]) if f or self.err[gi] else 0.0
                v = rng.standard_normal((len(fr), self.ci2, 1)) + 0j
                for _ in range(iters):
                    v = np.conj(np.swapaxes(Ms, 1, 2)) @ (Ms @ v)
                    v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-300
                crude[gi * nf + lo: gi * nf + lo + len(fr)] = np.linalg.norm(Ms @ v, axis=(1, 2))
        return frob, crude


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


def _cand(s: float, delta: float) -> float:
    return up_mul(s, up_add(1.0, delta)) if s > 0 else 0.0


def _blas_threads(n):
    if n is None or threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(n)


def prove_family(fam, *, t: float | None = None, s0: float = 0.0, delta0: float = 1e-6,
                 refine=None, max_delta: float = 10.0, blas_threads: int | None = 1):
    """Prove every block of fam has norm <= t.  With t given: fixed t, returns
    (t, stats) or None.  Otherwise t = s (1+delta) grows as described in the module
    docstring; ``refine(cert, i) -> float`` is the estimate used on a failing block.
    The blocks are many small BLAS calls: ``blas_threads`` (default 1) limits BLAS
    threading, which is faster at these sizes on a loaded machine."""
    with _blas_threads(blas_threads):
        return _prove_family(fam, t, s0, delta0, refine, max_delta)


def _prove_family(fam, t, s0, delta0, refine, max_delta):
    # work in the family's units (op scaled by 2^k); refine() answers in those units
    frob, crude = fam.screen()
    stats = {"blocks": fam.n_blocks, "by_frobenius": 0, "cholesky": 0, "refinements": 0}
    fixed = t is not None
    if fixed:
        t = _to_scaled(float(t), fam.k)
    s, delta = max(math.ldexp(float(s0), fam.k), 0.0), float(delta0)
    if not fixed:
        t = _cand(s, delta)
    for i in np.argsort(-crude, kind="stable"):
        if frob[i] <= t:
            stats["by_frobenius"] += 1
            continue
        M, err = fam.block(int(i))
        cert = GramCert(M, err)
        stats["cholesky"] += 1
        while not cert.check(t):
            if fixed:
                return None
            stats["refinements"] += 1
            s_new = max(s, float(refine(cert, int(i))))
            t_new = _cand(s_new, delta)
            if t_new <= t:
                delta *= 10.0
                if delta > max_delta:
                    raise RuntimeError(f"could not prove a bound near {s_new!r} (delta > {max_delta})")
                t_new = _cand(s_new, delta)
            s, t = s_new, max(t, t_new)
    stats.update(delta=delta, estimate_refined=math.ldexp(s, -fam.k))
    return _from_scaled(t, fam.k), stats


def prove(op: LinearOperator, t: float, mode: str = "auto") -> Bound | None:
    """A Bound with value t if t >= ||op||_2 is proven (Rump), else None.  For DFT
    blocks the proof is of the circular relaxation, so it can fail for t between
    the true norm and the relaxation's norm; it never succeeds below the truth."""
    fam = family(op, mode)
    res = prove_family(fam, t=float(t))
    if res is None:
        return None
    return Bound(float(t), "power-prove", "rump-cholesky", info={"family": _kind(fam), **res[1]})


def _kind(fam) -> str:
    return fam.kind if isinstance(fam, DenseFamily) else f"dft-blocks grid={fam.grid}"


def power_bound(op: LinearOperator, delta0: float = 1e-6, n_iter: int = 50,
                dtype=np.float32, tol: float = 1e-5, v0=None, mode: str = "auto",
                max_delta: float = 10.0, blas_threads: int | None = 1) -> Bound:
    """Estimate by power iteration, then prove t = s (1 + delta), raising delta x10
    (and refining s on the failing block) until the proof succeeds."""
    t0 = time.perf_counter()
    est = estimate(op, n_iter=n_iter, v0=v0, dtype=dtype, tol=tol)
    t1 = time.perf_counter()
    fam = family(op, mode)
    t, stats = prove_family(fam, s0=est.value, delta0=delta0, max_delta=max_delta,
                            refine=lambda cert, i: cert.estimate(), blas_threads=blas_threads)
    t2 = time.perf_counter()
    return Bound(t, "power", "rump-cholesky", info={
        "estimate": est.value, "iterations": est.info["iterations"],
        "converged": est.info["converged"], "delta": stats.pop("delta"),
        "seconds": t2 - t0, "seconds_estimate": t1 - t0, "seconds_proof": t2 - t1,
        "family": _kind(fam), **stats})
