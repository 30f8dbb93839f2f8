"""Proving a whole family of blocks ``||M_i||_2 <= t`` at once (power method and
SDP candidates), on top of Rump's criterion in :mod:`certlib.verifiers.rump`.

A family is a set of exact matrix blocks (a Dense weight: one block; a conv: its
per-frequency blocks, :class:`certlib.verifiers.power.ConvFamily`), all scaled by
one exact power of two.  :func:`prove_family` proposes ``t`` from a candidate,
proves every block with :func:`certlib.verifiers.rump.prove_norm_leq`, and on a
failure raises ``t`` and tries again; the answer is only ever a proven value.
Proof: proofs/rump.md.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from certlib.bounds import up, up_add, up_mul
from certlib.verifiers.rump import GramCert, _pow2_rescale, down, l2_upper, threadpool_limits

__all__ = ["DenseFamily", "prove_family"]

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
        self.M, self.k = _pow2_rescale(np.asarray(M, np.float64), 0)
        self.kind, self.n_blocks, self.stacked = kind, 1, False

    def chunks(self):
        return [[0]]

    def blocks(self, idx):
        """[(M, err, frob)]: the block, the bound on its error, a sound ||M_true||_F bound."""
        return [(self.M, 0.0, l2_upper(self.M))]

    def block(self, i: int):
        return self.M, 0.0


def _cand(s: float, delta: float) -> float:
    return up_mul(s, up_add(1.0, delta)) if s > 0 else 0.0


def _blas_threads(n):
    if n is None or threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(n)


def _auto_workers(fam) -> int:
    """Worker processes for families that ask for them (``fam.parallel``: many large
    blocks) where fork exists (Linux), else 1."""
    if not getattr(fam, "parallel", False) or "fork" not in mp.get_all_start_methods():
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def prove_family(fam, *, t: float | None = None, s0: float = 0.0, delta0: float = 1e-6,
                 refine=None, max_delta: float = 10.0, blas_threads: int | None = 1,
                 workers: int | None = None):
    """Prove every block of fam has norm <= t.  With t given: fixed t, returns
    (t, stats) or None.  Otherwise t = s (1+delta) grows (see "Families" in the module
    docstring); ``refine(cert, i) -> float`` is the estimate used on a failing block
    (default: the block's Gram top eigenvalue, ``GramCert.estimate``).
    The blocks are many small BLAS calls: ``blas_threads`` (default 1) limits BLAS
    threading, which is faster at these sizes on a loaded machine; instead, shares
    of the chunks may go to ``workers`` forked processes (None: automatic, more than
    one only for families with ``parallel`` set, on Linux), each running this same
    algorithm from the t set by the first chunk; the result is the largest t.
    ``refine`` then runs in the children (its side effects stay there)."""
    if refine is None:
        def refine(cert, i):
            return cert.estimate()
    workers = _auto_workers(fam) if workers is None else max(1, int(workers))
    with _blas_threads(blas_threads):
        return _prove_family(fam, t, s0, delta0, refine, max_delta, workers)


class _Runner:
    """The sequential algorithm over chunks of blocks, with t, s, delta and stats."""

    def __init__(self, fam, t, s, delta, refine, max_delta, fixed):
        self.fam, self.t, self.s, self.delta = fam, t, s, delta
        self.refine, self.max_delta, self.fixed = refine, max_delta, fixed
        self.stats = {"by_frobenius": 0, "cholesky": 0, "refinements": 0}

    def run(self, chunks) -> bool:
        """False only in fixed-t mode, as soon as a block fails."""
        fam, st = self.fam, self.stats
        for idx in chunks:
            for i, (M, err, frob) in zip(idx, fam.blocks(idx)):
                if frob <= self.t:
                    st["by_frobenius"] += 1
                    continue
                cert = GramCert(M, err, stacked=fam.stacked)
                st["cholesky"] += 1
                while not cert.check(self.t):
                    if self.fixed:
                        return False
                    st["refinements"] += 1
                    self._raise(float(self.refine(cert, int(i))))
        return True

    def _raise(self, est: float) -> None:
        s_new = max(self.s, est)
        t_new = _cand(s_new, self.delta)
        if t_new <= self.t:
            self.delta *= 10.0
            if self.delta > self.max_delta:
                raise RuntimeError(
                    f"could not prove a bound near {s_new!r} (delta > {self.max_delta})")
            t_new = _cand(s_new, self.delta)
        self.s, self.t = s_new, max(self.t, t_new)


_WORKER_RUNNER = None


def _worker_run(chunks):
    r = _WORKER_RUNNER                    # inherited through fork; mutated in the child only
    r.stats = dict.fromkeys(r.stats, 0)   # count this share only
    ok = r.run(chunks)
    return ok, r.t, r.s, r.delta, r.stats


def _prove_family(fam, t, s0, delta0, refine, max_delta, workers=1):
    # work in the family's units (op scaled by 2^k); refine() answers in those units.
    # t only grows, so a block proven for an earlier t stays proven: workers each run
    # the sequential algorithm on a share of the chunks, the result is the largest t.
    global _WORKER_RUNNER
    fixed = t is not None
    s, delta = max(math.ldexp(float(s0), fam.k), 0.0), float(delta0)
    t = _to_scaled(float(t), fam.k) if fixed else _cand(s, delta)
    r = _Runner(fam, t, s, delta, refine, max_delta, fixed)
    chunks = fam.chunks()
    first = 1 if (workers > 1 and len(chunks) > workers) else len(chunks)
    if not r.run(chunks[:first]):             # here: the first candidate t
        return None
    if first < len(chunks):
        shares = [chunks[first + w::workers] for w in range(workers)]
        _WORKER_RUNNER = r
        try:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
                results = list(ex.map(_worker_run, shares))
        except (OSError, AssertionError, BrokenProcessPool):   # e.g. a daemonic process
            results = [(r.run(chunks[first:]), r.t, r.s, r.delta, dict.fromkeys(r.stats, 0))]
        finally:
            _WORKER_RUNNER = None
        for ok, t_w, s_w, d_w, st_w in results:
            if not ok:
                return None
            r.t, r.s, r.delta = max(r.t, t_w), max(r.s, s_w), max(r.delta, d_w)
            for key in r.stats:
                r.stats[key] += st_w[key]
    stats = {"blocks": fam.n_blocks, **r.stats, "delta": r.delta,
             "estimate_refined": math.ldexp(r.s, -fam.k), "workers": workers}
    return _from_scaled(r.t, fam.k), stats
