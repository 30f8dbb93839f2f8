"""Spectral-norm bounds from an SDP (cvxpy), re-proven with Rump's criterion.

For a block M (real, or complex via the real embedding [[Re, -Im], [Im, Re]],
which has the same singular values) the solver computes

    minimize t  subject to  [[t I, M^T], [M, t I]] >= 0      (PSD; optimum ||M||_2).

The solver's t is only an ESTIMATE: interior-point/ADMM solutions are feasible up
to a tolerance.  It becomes a Bound only after t' = t (1 + delta) is proven with
:func:`certlib.verifiers.rump` (the same Gram + Rump check as power.prove), delta
raised x10 until that succeeds.

Operators: Dense (one block); Conv2d as its explicit matrix when in_dim + out_dim
<= max_dim (exact), otherwise per DFT frequency block of the polyphase circular
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
_OPTIONS = {"CLARABEL": {}, "SCS": {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200_000}}


def solve_norm_sdp(M, solver: str | None = None) -> tuple[float, dict]:
    """The SDP's value for ||M||_2: an ESTIMATE, with {solver, status, seconds}.

    M is scaled by an exact power of two (max |entry| in [0.5, 1)) for the solver's
    conditioning; the value is scaled back.  ``solver`` None tries CLARABEL, then SCS."""
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
    Z = cp.bmat([[t * np.eye(n), Ms.T], [Ms, t * np.eye(m)]])
    prob = cp.Problem(cp.Minimize(t), [Z >> 0])
    errors = []
    for name in ([solver] if solver else [DEFAULT_SOLVER, FALLBACK_SOLVER]):
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
            return math.ldexp(max(float(t.value), 0.0), -k), {
                "solver": name, "status": prob.status, "seconds": dt}
        errors.append(f"{name}: status {prob.status}")
    raise RuntimeError("SDP solve failed: " + "; ".join(errors))


def check(op: LinearOperator, max_dim: int = 400, mode: str = "auto", max_blocks: int = 4096) -> None:
    """Raise ValueError (naming the limit) when sdp_bound would refuse ``op``,
    before any SDP is solved."""
    _family(op, max_dim, mode, max_blocks)


def _family(op: LinearOperator, max_dim: int, mode: str, max_blocks: int):
    if isinstance(op, Dense):
        m, n = op.weight.shape
        if m + n > max_dim:
            raise ValueError(f"Dense {m}x{n}: SDP matrix of size {m + n} exceeds max_dim="
                             f"{max_dim}; use power_bound or raise max_dim")
        return DenseFamily(op.weight)
    if not isinstance(op, Conv2d):
        raise TypeError(f"no SDP verifier for operator {type(op).__name__}")
    if mode in ("auto", "explicit") and op.in_dim + op.out_dim <= max_dim:
        try:
            return family(op, "explicit")
        except ValueError:
            if mode == "explicit":
                raise
    elif mode == "explicit":
        raise ValueError(
            f"Conv2d explicit matrix {op.out_dim}x{op.in_dim} exceeds max_dim={max_dim}")
    fam = ConvFamily(op)
    size = 2 * (fam.cog + fam.ci2)
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
