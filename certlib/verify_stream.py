"""Certify a split batch by batch (image folders never held in memory), on
one process or on every rank of a ``torchrun`` launch.

The bounds are computed once (on rank 0, broadcast to the other ranks); each
batch goes through :func:`certlib.verify.certify_arrays` -- the same code as
an in-memory run, and each sample's outcome depends on that sample alone --
and only a few numbers per sample are kept (:class:`Records`).  On one
process the TSV is written as batches finish; under ``torchrun`` rank ``r``
certifies samples ``r, r + w, ...`` and rank 0 gathers the records
(``torch.distributed.gather_object``) and writes the one report, TSV and
certificate.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from certlib.certify import Result
from certlib.ir.graph import Graph
from certlib.report import TSV_HEADER, tsv_rows
from certlib.verify import VerifyReport, analyze_on, certify_arrays, check_data

#: kept per sample (the margins only when a certificate or HTML report needs them)
FIELDS = ("idx", "label", "pred", "correct", "certified", "radius", "slack")


def _add_counts(dst: dict, src: dict) -> None:
    """Sum the fast path's counters (flags are copied)."""
    for k, v in src.items():
        dst[k] = (dst.get(k, 0) + v) if not isinstance(v, bool) else v


@dataclass
class Records:
    """Per-sample outcomes, in the order certified (sorted by ``idx`` at the end)."""
    parts: dict = field(default_factory=lambda: {k: [] for k in FIELDS + ("margins",)})
    disagree: list = field(default_factory=list)
    fast: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    est_vra: float = 0.0       # sums over samples (estimate-only runs)
    est_clean: float = 0.0
    n: int = 0

    def add(self, idx, y, out, keep_margins: bool) -> None:
        self.n += len(idx)
        for k, v in out.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        _add_counts(self.fast, out.fast)
        if out.result is None:
            self.est_vra += (out.estimated_vra or 0.0) * len(idx)
            self.est_clean += (out.estimated_clean or 0.0) * len(idx)
            return
        r = out.result
        for k, v in zip(FIELDS, (idx, y, r.pred, r.correct, r.certified, r.radius, r.slack)):
            self.parts[k].append(np.asarray(v))
        if keep_margins:
            self.parts["margins"].append(r.margins)
        self.disagree.extend(int(idx[i]) for i in out.runtime_disagree)

    def merge(self, others: list["Records"]) -> "Records":
        m = Records()
        for o in others:
            for k in m.parts:
                m.parts[k].extend(o.parts[k])
            m.disagree.extend(o.disagree)
            _add_counts(m.fast, o.fast)
            for k, v in o.seconds.items():  # the slowest rank's time
                m.seconds[k] = max(m.seconds.get(k, 0.0), v)
            m.est_vra, m.est_clean, m.n = m.est_vra + o.est_vra, m.est_clean + o.est_clean, m.n + o.n
        return m

    def result(self, eps: float, num_classes: int) -> tuple[Result, np.ndarray]:
        """(Result in sample order, labels)."""
        cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in self.parts.items() if k != "margins"}
        order = np.argsort(cat["idx"], kind="stable")
        c = {k: v[order] for k, v in cat.items()}
        if not np.array_equal(c["idx"], np.arange(len(order))):  # every sample exactly once
            raise RuntimeError("streamed records do not cover the samples 0..n-1 exactly once")
        mg = (np.concatenate(self.parts["margins"])[order] if self.parts["margins"]
              else np.zeros((len(order), 0)))
        res = Result(c["pred"].astype(np.int64), c["correct"].astype(bool), c["certified"].astype(bool),
                     c["radius"].astype(np.float64), mg, c["slack"].astype(np.float64), eps)
        return res, c["label"].astype(np.int64)


class StreamData:
    """What a certificate and the reports need of a streamed split (no pixels)."""

    def __init__(self, name: str, y: np.ndarray, sha: str, num_classes: int):
        self.name, self.y, self._sha, self.num_classes = name, y, sha, num_classes

    def __len__(self) -> int:
        return int(len(self.y))

    def sha256(self) -> str:
        return self._sha


def _broadcast_analysis(make, info):
    if not info.enabled:
        return make()
    import torch.distributed as dist

    box = [make() if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def verify_stream(g: Graph, stream, eps: float, method: str = "exact", *, model_name: str = "",
                  sha256: str = "", batch_size: int = 256, estimate_only: bool = False, fold_inputs: bool = True,
                  device: str = "auto", fast: bool | None = None, info=None, tsv=None, keep_margins: bool = False,
                  on_bounds=None, on_batch=None) -> tuple[VerifyReport | None, StreamData | None]:
    """Certify every sample of ``stream`` (see the module docstring).

    ``tsv``: path of the per-sample TSV (written incrementally on one process);
    ``keep_margins``: keep the (N, C) margins (certificates, HTML reports);
    ``on_bounds(name)`` / ``on_batch(done_here, total_here)``: progress.
    Returns (report, data) on rank 0 and (None, None) on the other ranks."""
    from certlib.train.distributed import DistInfo

    info = info or DistInfo()
    if fast is None:
        fast = fold_inputs
    check_data(g, stream.sample_shape)
    t = time.perf_counter()
    a = _broadcast_analysis(lambda: analyze_on(device, g, method=method, estimate_only=estimate_only,
                                               progress=on_bounds, fold_inputs=fold_inputs), info)
    t_bounds = time.perf_counter() - t
    rec, h, done, prepared = Records(), hashlib.sha256(), 0, {}
    mine = len(range(info.rank, len(stream), info.world))
    f = open(tsv, "w") if (tsv and not info.enabled) else None
    try:
        if f:
            f.write(TSV_HEADER)
        for idx, x, y in stream.batches(batch_size, info.rank, info.world):
            check_data(g, x.shape[1:], y)
            if not info.enabled:
                h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
            out = certify_arrays(g, a, x, y, eps, batch_size=batch_size, estimate_only=estimate_only,
                                 device=device, fast=fast, cache=prepared)
            rec.add(idx, y, out, keep_margins)
            if f and out.result is not None:
                f.write(tsv_rows(idx, y, out.result))
                f.flush()
            done += len(idx)
            if on_batch:
                on_batch(done, mine)
    finally:
        if f:
            f.close()
    if info.enabled:
        import torch.distributed as dist

        box = [None] * info.world if info.is_main else None
        dist.gather_object(rec, box, dst=0)
        if not info.is_main:
            return None, None
        rec = rec.merge(box)
    res, labels = rec.result(eps, g.num_classes)
    if info.enabled:
        data_sha = stream.sha256()  # the certificate's hash rule needs the samples in order: one pass
    else:
        h.update(labels.astype(np.int64).tobytes())
        data_sha = h.hexdigest()
    data = StreamData(stream.name, labels, data_sha, stream.num_classes)
    seconds = {"bounds": t_bounds, **rec.seconds}
    if estimate_only:
        n = max(rec.n, 1)
        rep = VerifyReport(model_name, sha256, eps, stream.name, data_sha, a, None, rec.est_vra / n,
                           rec.est_clean / n, seconds)
    else:
        rep = VerifyReport(model_name, sha256, eps, stream.name, data_sha, a, res, seconds=seconds)
        rep.runtime_disagree = sorted(rec.disagree)
        if tsv and info.enabled:
            with open(tsv, "w") as out:
                out.write(TSV_HEADER + tsv_rows(np.arange(res.n), labels, res))
    rep.fast = rec.fast
    return rep, data


__all__ = ["verify_stream", "Records", "StreamData"]
