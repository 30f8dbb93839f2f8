"""The one certification road: ONNX file -> IR -> Bounds -> certified samples.

Used by ``certlib verify``, by the trainer's final sound evaluation and by tests.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from certlib._version import __version__
from certlib.certify import Result, certify, estimate_vra
from certlib.data import Dataset
from certlib.ir.graph import Graph
from certlib.ir.compose import Analysis, analyze


@dataclass
class VerifyReport:
    model: str
    sha256: str
    eps: float
    data: str
    data_sha256: str
    analysis: Analysis
    result: Result | None            # None with estimate_only
    estimated_vra: float | None = None
    estimated_clean: float | None = None
    seconds: dict = field(default_factory=dict)
    #: samples where onnxruntime's argmax differs from certlib's prediction
    #: (never certified: the IR would not describe the model that runs there)
    runtime_disagree: list = field(default_factory=list)
    #: {"float32": bool, "recomputed_float64": int} when the fast path ran
    fast: dict = field(default_factory=dict)

    @property
    def sound(self) -> bool:
        return self.analysis.sound

    def as_json(self) -> dict:
        a = self.analysis
        r = self.result
        return {
            "model": self.model,
            "sha256": self.sha256,
            "eps": self.eps,
            "data": self.data,
            "data_sha256": self.data_sha256,
            "n": r.n if r is not None else None,
            "clean_accuracy": r.clean_accuracy if r is not None else self.estimated_clean,
            "vra": r.vra if r is not None else self.estimated_vra,
            "lipschitz": {"body": float(a.body.value), "method": a.method, "sound": a.sound,
                          "rule": getattr(a, "body_rule", "product")},
            "layers": [lb.as_dict() for lb in a.layers],
            "runtime_disagree": list(self.runtime_disagree),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "fast_forward": self.fast or {"float32": False},
            "certlib_version": __version__,
            "claim": ("exact-arithmetic robustness of the ONNX model's function; logits computed in float64 "
                      "with a rigorous rounding slack") if a.sound else
                     "NOT SOUND: raw power-iteration estimates, for comparison only",
        }


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def predict(g: Graph, x: np.ndarray, node_bounds, batch_size: int = 256, progress=None):
    """Float64 logits and rigorous per-sample error bounds, in batches."""
    return _batched(lambda xb: g.forward(xb, node_bounds), x, batch_size, progress, g.num_classes)


def _batched(forward, x: np.ndarray, batch_size: int, progress, num_classes: int):
    """(logits, per-sample error bounds) of ``forward`` over ``x`` in batches."""
    outs, errs = [], []
    for i in range(0, len(x), batch_size):
        o, e = forward(x[i:i + batch_size])
        outs.append(o)
        errs.append(e)
        if progress is not None:
            progress(min(i + batch_size, len(x)))
    if not outs:
        return np.zeros((0, num_classes)), np.zeros(0)
    return np.concatenate(outs), np.concatenate(errs)


def resolve_device(device: str | None) -> str:
    """"auto" (or None): cuda when available, else cpu."""
    import torch

    d = (device or "auto").lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        from certlib.errors import UsageError
        raise UsageError("--device cuda: no CUDA device is available")
    if d != "cpu" and not d.startswith("cuda"):
        from certlib.errors import UsageError
        raise UsageError(f"--device must be cpu, cuda or auto, got {device!r}")
    return d


def predict_fast(g: Graph, x: np.ndarray, node_bounds, batch_size: int = 256, progress=None,
                 device: str = "cpu", dtype=None):
    """Float32 (or ``dtype``) logits with a priori error bounds
    (proofs/fast_forward.md), or None when the graph is outside the error model."""
    import torch

    from certlib.ir.fast import forward32, prepare

    fg = prepare(g, device, dtype or torch.float32)
    if fg is None:
        return None
    return _batched(lambda xb: forward32(fg, xb, node_bounds), x, batch_size, progress, g.num_classes)


def verify_graph(g: Graph, data: Dataset, eps: float, method: str = "exact", *,
                 model_name: str = "", sha256: str = "", batch_size: int = 256,
                 estimate_only: bool = False, progress=None, fold_inputs: bool = True,
                 device: str = "auto", fast: bool | None = None) -> VerifyReport:
    """Certify ``data`` at radius ``eps``.  ``fast`` (default: unless
    ``fold_inputs`` is off, i.e. when no certificate is written) computes the
    logits in float32 with an a priori bound and the float64 path only where the
    decision needs it (proofs/fast_forward.md); a certificate states float64
    margins, the independent checker's arithmetic."""
    if fast is None:
        fast = fold_inputs
    if tuple(data.x.shape[1:]) != tuple(g.input_shape):
        from certlib.errors import UsageError
        raise UsageError(f"data samples have shape {tuple(data.x.shape[1:])} but the model expects "
                         f"{tuple(g.input_shape)}")
    if data.num_classes and int(data.y.max(initial=0)) >= g.num_classes:
        from certlib.errors import UsageError
        raise UsageError(f"labels go up to {int(data.y.max())} but the model has {g.num_classes} outputs")
    seconds = {}
    t = time.perf_counter()
    a = analyze(g, method=method, estimate_only=estimate_only,
                progress=(lambda name: progress("bounds", name)) if progress else None, fold_inputs=fold_inputs)
    seconds["bounds"] = time.perf_counter() - t
    t = time.perf_counter()
    fwd_progress = (lambda k: progress("forward", k)) if progress else None
    fast_out = None
    if fast and not estimate_only:
        fast_out = predict_fast(g, data.x, a.node_bounds, batch_size, fwd_progress, resolve_device(device))
    if fast_out is None:
        logits, err = predict(g, data.x, a.node_bounds, batch_size, fwd_progress)
    seconds["forward"] = time.perf_counter() - t
    t = time.perf_counter()
    if fast_out is not None:
        from certlib.fast_certify import certify_fast

        import torch

        counts = {}

        def exact64(idx):
            counts["float64_path"] = counts.get("float64_path", 0) + len(idx)
            return predict(g, data.x[idx], a.node_bounds, batch_size)

        def tier64(idx):
            # float64 with the a priori bound: the float64 path's own bound is
            # at most twice it (proofs/fast_forward.md)
            sub = data.x[idx]
            out = predict_fast(g, sub, a.node_bounds, batch_size, None, resolve_device(device), torch.float64)
            if out is None:
                return exact64(idx)
            _, f, e, redo = certify_fast(*out, data.y[idx], a.K, a.body, eps,
                                         lambda j: exact64(np.asarray(idx)[j]), other=2.0)
            return f, e

        res, logits, err, redo = certify_fast(*fast_out, data.y, a.K, a.body, eps, tier64)
        rep = VerifyReport(model_name, sha256, eps, data.name, data.sha256(), a, res)
        rep.fast = {"float32": True, "recomputed_float64": int(len(redo)),
                    "float64_path": int(counts.get("float64_path", 0))}
    elif estimate_only:
        vra = estimate_vra(logits, data.y, a.K, eps)
        clean = float((np.argmax(logits, axis=1) == data.y).mean()) if len(data) else 0.0
        rep = VerifyReport(model_name, sha256, eps, data.name, data.sha256(), a, None, vra, clean)
    else:
        res = certify(logits, err, data.y, a.K, a.body, eps)
        rep = VerifyReport(model_name, sha256, eps, data.name, data.sha256(), a, res)
    if not estimate_only:
        rep.runtime_disagree = _runtime_veto(g, data.x, res)
    seconds["certify"] = time.perf_counter() - t
    rep.seconds = seconds
    return rep


def _runtime_veto(g: Graph, x: np.ndarray, res) -> list:
    """Samples whose onnxruntime argmax differs from certlib's prediction:
    uncertified (radius 0) and returned for the report."""
    from certlib.onnx.importer import runtime_argmax

    rt = runtime_argmax(g, x)
    if rt is None:
        return []
    bad = np.flatnonzero(rt != res.pred)
    res.certified[bad] = False
    res.radius[bad] = 0.0
    return [int(i) for i in bad]


def verify_file(path: str | Path, data: Dataset, eps: float, method: str = "exact", *,
                input_shape=None, batch_size: int = 256, estimate_only: bool = False,
                progress=None, fold_inputs: bool = True, device: str = "auto", fast: bool | None = None) -> VerifyReport:
    """Import and certify an ONNX file.  ``fold_inputs=False`` bounds input
    normalisation on its own, as certificates (``--proof``) require."""
    from certlib.onnx.importer import load

    t = time.perf_counter()
    _, g = load(path, input_shape)
    t_import = time.perf_counter() - t
    rep = verify_graph(g, data, eps, method, model_name=str(path), sha256=file_sha256(path),
                       batch_size=batch_size, estimate_only=estimate_only, progress=progress,
                       fold_inputs=fold_inputs, device=device, fast=fast)
    rep.seconds = {"import": t_import, **rep.seconds}
    return rep


# certlib.verify(...) is the public API function (certlib/_callable.py)
from certlib._callable import make_callable as _make_callable  # noqa: E402

_make_callable(__name__, "certlib.api:verify", "certlib.verify: see certlib.api")
