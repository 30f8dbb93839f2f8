"""Spectral-norm bounds from an SDP (cvxpy), re-proven with Rump's criterion.

For a block M (real, or complex via the real embedding [[Re, -Im], [Im, Re]],
which has the same singular values) the solver computes, for a small block,

    minimize t  subject to  [[t I, M^T], [M, t I]] >= 0      (PSD; optimum ||M||_2),

and otherwise the same problem on the smaller Gram side (size min(m, n) instead
of m + n):  minimize s  subject to  s I - G >= 0  with G = M M^T or M^T M
(optimum ||M||_2^2).  G is formed in floating point: harmless, because the value
is only a proposal that the proof below re-checks against M itself.

The solver's t is only an ESTIMATE: interior-point/ADMM solutions are feasible up
to a tolerance.  It becomes a Bound only after t' = t (1 + delta) is proven with
:func:`certlib.verifiers.rump` (the same Gram + Rump check as power.prove), delta
raised x10 until that succeeds.

The SDP size of a block is its smaller Gram side (twice that for a complex
block).  Operators: Dense (one block); Conv2d as its explicit matrix when
min(in_dim, out_dim) <= max_dim (exact), otherwise per DFT frequency block of the polyphase circular
relaxation (see power.py; it bounds, and can exceed, the true norm).  Every family
is the operator scaled by an exact power of two (power.py), values are scaled back
(rounded up).  Blocks are
visited largest (crude estimate) first; an SDP is solved only for a block that the
current t does not already prove, so most blocks need only the Cholesky proof.
"""

from __future__ import annotations

import math
import time
import warnings

import cvxpy as cp
import numpy as np

from certlib.bounds import Bound

from .operators import Conv2d, Dense, LinearOperator
from .power import ConvFamily, family
from .family import DenseFamily, prove_family
from .rump import real_embedding

__all__ = ["solve_norm_sdp", "sdp_bound", "check", "DEFAULT_SOLVER", "FALLBACK_SOLVER"]

DEFAULT_SOLVER = "CLARABEL"
FALLBACK_SOLVER = "SCS"
#: interior-point (CLARABEL) for LMIs up to this size; above it the first-order
#: SCS goes first (an interior-point PSD cone of size k has a dense k^2/2 x k^2/2
#: Hessian: minutes at k = 128, where SCS takes half a second).  Either way the
#: answer is only a proposal that Rump's criterion re-checks.
FIRST_ORDER_FROM = 48
#: blocks with m + n at most this use the [[tI, M^T], [M, tI]] form; larger ones the Gram side
GRAM_SIDE_FROM = 64
_OPTIONS = {"CLARABEL": {}, "SCS": {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200_000}}
#: the multi-layer LipSDP needs less: its multipliers are kept strictly feasible
#: by a margin, and rho2 is recomputed for them exactly (verifiers/lipsdp.py)
LIPSDP_OPTIONS = {"CLARABEL": {}, "SCS": {"eps_abs": 1e-5, "eps_rel": 1e-5, "max_iters": 50_000}}


def solve_norm_sdp(M, solver: str | None = None) -> tuple[float, dict]:
    """The SDP's value for ||M||_2: an ESTIMATE, with {solver, status, seconds}.

    M is scaled by an exact power of two (max |entry| in [0.5, 1)) for the solver's
    conditioning; the value is scaled back.  ``solver`` None tries CLARABEL, then SCS
    (SCS first for an LMI larger than FIRST_ORDER_FROM)."""
    M = np.asarray(M)
    if np.iscomplexobj(M):
        M = real_embedding(M.astype(np.complex128))
    M = np.asarray(M, np.float64)
    mx = float(np.max(np.abs(M))) if M.size else 0.0
    if mx == 0.0:
        return 0.0, {"solver": None, "status": "zero", "seconds": 0.0}
    k = -math.frexp(mx)[1]
    Ms = np.ldexp(M, k)
    m, n = Ms.shape
    t = cp.Variable()
    gram = m + n > GRAM_SIDE_FROM
    if gram:   # s I - G >= 0 on the smaller side; t stands for s = ||M||^2
        G = Ms @ Ms.T if m <= n else Ms.T @ Ms
        G = (G + G.T) / 2
        prob = cp.Problem(cp.Minimize(t), [t * np.eye(G.shape[0]) - G >> 0])
    else:
        Z = cp.bmat([[t * np.eye(n), Ms.T], [Ms, t * np.eye(m)]])
        prob = cp.Problem(cp.Minimize(t), [Z >> 0])
    errors = []
    size = min(m, n) if gram else m + n
    order = [DEFAULT_SOLVER, FALLBACK_SOLVER] if size <= FIRST_ORDER_FROM else [FALLBACK_SOLVER, DEFAULT_SOLVER]
    for name in ([solver] if solver else order):
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():   # "inaccurate" is recorded in the status
                warnings.simplefilter("ignore", UserWarning)
                prob.solve(solver=name, **_OPTIONS.get(name, {}))
        except (cp.SolverError, ValueError) as e:
            errors.append(f"{name}: {e}")
            continue
        dt = time.perf_counter() - t0
        if prob.status in ("optimal", "optimal_inaccurate") and t.value is not None \
                and math.isfinite(float(t.value)):
            val = max(float(t.value), 0.0)
            return math.ldexp(math.sqrt(val) if gram else val, -k), {
                "solver": name, "status": prob.status, "seconds": dt,
                "form": "gram-side" if gram else "block"}
        errors.append(f"{name}: status {prob.status}")
    raise RuntimeError("SDP solve failed: " + "; ".join(errors))


def check(op: LinearOperator, max_dim: int = 400, mode: str = "auto", max_blocks: int = 4096) -> None:
    """Raise ValueError (naming the limit) when sdp_bound would refuse ``op``,
    before any SDP is solved."""
    _family(op, max_dim, mode, max_blocks)


def _family(op: LinearOperator, max_dim: int, mode: str, max_blocks: int):
    if isinstance(op, Dense):
        m, n = op.weight.shape
        if min(m, n) > max_dim:
            raise ValueError(f"Dense {m}x{n}: SDP matrix (smaller Gram side) of size {min(m, n)} exceeds "
                             f"max_dim={max_dim}; use power_bound or raise max_dim")
        return DenseFamily(op.weight)
    if not isinstance(op, Conv2d):
        raise TypeError(f"no SDP verifier for operator {type(op).__name__}")
    if mode in ("auto", "explicit") and min(op.in_dim, op.out_dim) <= max_dim:
        try:
            return family(op, "explicit")
        except ValueError:
            if mode == "explicit":
                raise
    elif mode == "explicit":
        raise ValueError(
            f"Conv2d explicit matrix {op.out_dim}x{op.in_dim} exceeds max_dim={max_dim}")
    fam = ConvFamily(op)
    size = 2 * min(fam.cog, fam.ci2)
    if size > max_dim or fam.n_blocks > max_blocks:
        raise ValueError(
            f"Conv2d too large for the SDP verifier: {fam.n_blocks} DFT blocks (max_blocks="
            f"{max_blocks}) of SDP size {size} (max_dim={max_dim}); use power_bound")
    return fam


def sdp_bound(op: LinearOperator, solver: str | None = None, max_dim: int = 400,
              delta0: float = 1e-7, mode: str = "auto", max_blocks: int = 4096,
              max_delta: float = 10.0) -> Bound:
    """A proven upper bound on ||op||_2 from SDP solutions re-checked by Rump's criterion.

    Raises ValueError for operators too large (explicit SDP size or DFT block size
    above ``max_dim``, or more than ``max_blocks`` blocks)."""
    t0 = time.perf_counter()
    fam = _family(op, max_dim, mode, max_blocks)
    solved: dict[int, float] = {}
    log = {"solver": [], "status": [], "solve_seconds": 0.0}

    def refine(cert, i):
        if i not in solved:
            M, err = fam.block(i)
            val, inf = solve_norm_sdp(M, solver)
            solved[i] = val + err
            log["solver"].append(inf["solver"])
            log["status"].append(inf["status"])
            log["solve_seconds"] += inf["seconds"]
        return solved[i]

    # workers=1: the SDP refinements (and their log) must run in this process
    t, stats = prove_family(fam, s0=0.0, delta0=delta0, refine=refine, max_delta=max_delta,
                            workers=1)
    fam_kind = fam.kind if isinstance(fam, DenseFamily) else f"dft-blocks grid={fam.grid}"
    return Bound(t, "sdp", "rump-cholesky", info={
        "solver": ",".join(sorted({s for s in log["solver"] if s})) or None,
        "status": ",".join(sorted(set(log["status"]))) or None,
        "solve_seconds": log["solve_seconds"],
        "n_solves": len(solved), "sdp_value": math.ldexp(max(solved.values(), default=0.0), -fam.k),
        "delta": stats.pop("delta"), "seconds": time.perf_counter() - t0,
        "family": fam_kind, **stats})
