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
    #: the semantics the claim holds for (certlib.ir.semantics.Semantics; None: exact)
    semantics: object = None
    #: under a floating-point semantics: e64, e_ball, norms, at_x (certlib.verify_semantics)
    semantics_detail: dict = field(default_factory=dict, repr=False)

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
            **self._semantics_json(),
            "claim": (self.semantics.describe() if (a.sound and self.semantics is not None) else
                      "exact-arithmetic robustness of the ONNX model's function; logits computed in float64 "
                      "with a rigorous rounding slack" if a.sound else
                      "NOT SOUND: raw power-iteration estimates, for comparison only"),
        }

    def _semantics_json(self) -> dict:
        sem = self.semantics
        if sem is None:
            return {"semantics": "exact"}
        out = {"semantics": sem.name}
        if not sem.exact:
            eb = self.semantics_detail.get("e_ball")
            fin = eb[np.isfinite(eb)] if eb is not None else np.zeros(0)
            out["semantics_detail"] = {
                "accumulate": sem.accumulate, "unit_roundoff": sem.u, "accumulation_roundoff": sem.u_acc,
                "max_finite": sem.maxval, "overflow_samples": int(np.sum(~np.isfinite(eb))) if eb is not None else 0,
                "e_ball_max": float(fin.max()) if fin.size else None,
                "e_ball_median": float(np.median(fin)) if fin.size else None}
        return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def predict(g: Graph, x: np.ndarray, node_bounds, batch_size: int = 256, progress=None):
    """Float64 logits and rigorous per-sample error bounds, in batches."""
    return _batched(lambda xb: g.forward(xb, node_bounds), x, batch_size, progress, g.num_classes)


def _batched(forward, x: np.ndarray, batch_size: int, progress, num_classes: int, parts: int = 2):
    """(logits, per-sample error bounds[, more per-sample arrays]) of
    ``forward`` over ``x`` in batches."""
    got = [[] for _ in range(parts)]
    for i in range(0, len(x), batch_size):
        for acc, v in zip(got, forward(x[i:i + batch_size])):
            acc.append(v)
        if progress is not None:
            progress(min(i + batch_size, len(x)))
    if not got[0]:
        return (np.zeros((0, num_classes)),) + tuple(np.zeros(0) for _ in range(parts - 1))
    return tuple(np.concatenate(acc) for acc in got)


def resolve_device(device: str | None) -> str:
    """"auto" (or None): cuda when available, else cpu."""
    import torch

    d = (device or "auto").lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        from certlib.errors import UsageError
        raise UsageError("--device cuda: no CUDA device is available")
    if d != "cpu" and not (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
        from certlib.errors import UsageError
        raise UsageError(f"--device must be cpu, cuda or auto, got {device!r}")
    return d


def predict_fast(g: Graph, x: np.ndarray, node_bounds, batch_size: int = 256, progress=None,
                 device: str = "cpu", dtype=None, cache: dict | None = None, info: dict | None = None,
                 other: bool = False, chunked: bool = True):
    """Float32 (or ``dtype``) logits with a priori error bounds
    (proofs/fast_forward.md), or None when the graph is outside the error model.
    ``other``: also a per-sample bound on the float64 path's error bound
    (``forward32(..., other=True)``); ``chunked``: as in ``fast.prepare``.
    ``info`` (a dict) receives ``unchunk_ratio`` (``FastGraph.unchunk_ratio``)."""
    import torch

    from certlib.ir.fast import forward32, prepare

    # ``cache`` (a dict the caller keeps for one run of one unchanged graph): prepared once per
    # (device, dtype), as a streamed run calls this for every batch
    key = (str(device), dtype or torch.float32, chunked)
    if cache is None or key not in cache:
        fg = prepare(g, device, dtype or torch.float32, chunked)
        if cache is not None:
            cache[key] = fg
    fg = cache[key] if cache is not None else fg
    if fg is None:
        return None
    if info is not None:
        info["unchunk_ratio"] = fg.unchunk_ratio
    return _batched(lambda xb: forward32(fg, xb, node_bounds, other), x, batch_size, progress, g.num_classes,
                    3 if other else 2)


def check_data(g: Graph, sample_shape, labels=None) -> None:
    """Samples of the model's input shape and labels below its number of
    outputs, or a UsageError."""
    from certlib.errors import UsageError

    if tuple(sample_shape) != tuple(g.input_shape):
        raise UsageError(f"data samples have shape {tuple(sample_shape)} but the model expects "
                         f"{tuple(g.input_shape)}")
    if labels is not None and np.size(labels) and int(np.max(labels)) >= g.num_classes:
        raise UsageError(f"labels go up to {int(np.max(labels))} but the model has {g.num_classes} outputs")


def analyze_on(device: str | None, g: Graph, **kw) -> Analysis:
    """:func:`certlib.ir.compose.analyze` with the exact method's engine on ``device``."""
    from certlib.verifiers.svd import on_device

    with on_device(resolve_device(device)):
        return analyze(g, **kw)


def verify_graph(g: Graph, data: Dataset, eps: float, method: str = "exact", *,
                 model_name: str = "", sha256: str = "", batch_size: int = 256,
                 estimate_only: bool = False, progress=None, fold_inputs: bool = True,
                 device: str = "auto", fast: bool | None = None, semantics="exact",
                 accumulate: str = "float32") -> VerifyReport:
    """Certify ``data`` at radius ``eps``.  ``semantics`` (exact | float32 |
    bfloat16 | float16, or a Semantics): what the claim is about; a
    floating-point semantics certifies the model executed in that precision
    over the whole ball (proofs/float_semantics.md; ``accumulate``: float32 or
    storage, the dot products' accumulation for the 16-bit formats).  ``fast`` (default: unless
    ``fold_inputs`` is off, i.e. when no certificate is written) computes the
    logits in float32 with an a priori bound and the float64 path only where the
    decision needs it (proofs/fast_forward.md); a certificate states float64
    margins, the independent checker's arithmetic."""
    from certlib.ir.semantics import Semantics, get as get_semantics

    sem = semantics if isinstance(semantics, Semantics) else get_semantics(semantics, accumulate)
    if not sem.exact and estimate_only:
        from certlib.errors import UsageError
        raise UsageError("--semantics other than exact needs sound certification (not --estimate-only)")
    if fast is None:
        fast = fold_inputs and sem.exact
    check_data(g, data.x.shape[1:], data.y if data.num_classes else None)
    seconds = {}
    t = time.perf_counter()
    a = analyze_on(device, g, method=method, estimate_only=estimate_only,
                   progress=(lambda name: progress("bounds", name)) if progress else None, fold_inputs=fold_inputs)
    seconds["bounds"] = time.perf_counter() - t
    fwd_progress = (lambda k: progress("forward", k)) if progress else None
    if not sem.exact:
        from certlib.verify_semantics import certify_semantics

        t = time.perf_counter()
        res, detail = certify_semantics(g, data.x, data.y, a, eps, sem, batch_size, fwd_progress)
        seconds["forward"] = time.perf_counter() - t
        t = time.perf_counter()
        rep = VerifyReport(model_name, sha256, eps, data.name, data.sha256(), a, res)
        rep.semantics, rep.semantics_detail = sem, detail
        rep.runtime_disagree = _runtime_veto(g, data.x, res)
        seconds["certify"] = time.perf_counter() - t
        rep.seconds = seconds
        return rep
    out = certify_arrays(g, a, data.x, data.y, eps, batch_size=batch_size, estimate_only=estimate_only,
                         fwd_progress=fwd_progress, device=device, fast=fast)
    seconds.update(out.seconds)
    if estimate_only:
        rep = VerifyReport(model_name, sha256, eps, data.name, data.sha256(), a, None, out.estimated_vra,
                           out.estimated_clean)
    else:
        rep = VerifyReport(model_name, sha256, eps, data.name, data.sha256(), a, out.result)
        rep.runtime_disagree = out.runtime_disagree
    rep.fast = out.fast
    rep.seconds = seconds
    return rep


@dataclass
class Certified:
    """What :func:`certify_arrays` finds for a set of samples."""
    result: Result | None                  # None with estimate_only
    estimated_vra: float | None = None
    estimated_clean: float | None = None
    runtime_disagree: list = field(default_factory=list)   # indices into the given samples
    fast: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def certify_arrays(g: Graph, a: Analysis, x: np.ndarray, y: np.ndarray, eps: float, *, batch_size: int = 256,
                   estimate_only: bool = False, fwd_progress=None, device: str = "auto",
                   fast: bool = True, cache: dict | None = None) -> Certified:
    """Certify the samples ``x`` (labels ``y``) with the analysis ``a`` of ``g``:
    the forward (float32 with the a priori bound where ``fast``, float64
    where the decision needs it), the certificate rule and the onnxruntime
    veto.  Each sample's outcome depends on that sample alone, so certifying
    a split batch by batch (:mod:`certlib.verify_stream`) decides as one call."""
    seconds = {}
    t = time.perf_counter()
    fast_out = None
    info: dict = {}
    if fast and not estimate_only:
        fast_out = _fast_with_probe(g, a, x, eps, batch_size, fwd_progress, resolve_device(device), cache, info)
    if fast_out is None:
        logits, err = predict(g, x, a.node_bounds, batch_size, fwd_progress)
    seconds["forward"] = time.perf_counter() - t
    t = time.perf_counter()
    out = Certified(None)
    if fast_out is not None:
        from certlib.fast_certify import certify_fast

        import torch

        counts = {}

        def exact64(idx):
            counts["float64_path"] = counts.get("float64_path", 0) + len(idx)
            return predict(g, x[idx], a.node_bounds, batch_size)

        def tier64(idx):
            # float64 with the a priori bound: the float64 path's own bound is
            # at most twice it (proofs/fast_forward.md)
            sub = x[idx]
            o = predict_fast(g, sub, a.node_bounds, batch_size, None, resolve_device(device), torch.float64,
                             cache=cache)
            if o is None:
                return exact64(idx)
            _, f, e, redo = certify_fast(*o, y[idx], a.K, a.body, eps,
                                         lambda j: exact64(np.asarray(idx)[j]), other=2.0)
            return f, e

        # fast_out's third array bounds the float64 path's error bound per
        # sample (proofs/fast_forward.md, "Identical decisions")
        f32, e32, e_other = fast_out
        out.result, logits, err, redo = certify_fast(f32, e32, y, a.K, a.body, eps, tier64, other=e_other)
        out.fast = {"float32": True, "recomputed_float64": int(len(redo)),
                    "float32_skipped": int(info.get("skipped", 0)),
                    "float32_unchunked": bool(info.get("unchunked", False)),
                    "float64_path": int(counts.get("float64_path", 0))}
    elif estimate_only:
        out.estimated_vra = estimate_vra(logits, y, a.K, eps)
        out.estimated_clean = float((np.argmax(logits, axis=1) == y).mean()) if len(y) else 0.0
    else:
        out.result = certify(logits, err, y, a.K, a.body, eps)
    if not estimate_only:
        tv = time.perf_counter()
        out.runtime_disagree = _runtime_veto(g, x, out.result)
        seconds["veto"] = time.perf_counter() - tv     # (inside "certify")
    seconds["certify"] = time.perf_counter() - t
    out.seconds = seconds
    return out


#: the float32 forward is first run on this many samples; when it settles
#: fewer than PROBE_SETTLED of them, the rest go straight to the float64 tier
#: (a model whose logit gaps are small against its float32 bound would pay for
#: both); when its bound grown by the unchunked factor would still settle all
#: but PROBE_UNCHUNK_LOSS of the settled ones, the rest run without chunked
#: sums (one conv per layer, not a grouped conv and a sum).  Speed only: every
#: plan's bound is proven, and the float64 tier decides every sample it is given.
PROBE, PROBE_SETTLED, PROBE_UNCHUNK_LOSS = 16, 0.25, 1


def _fast_with_probe(g, a, x, eps, batch_size, fwd_progress, device, cache, info):
    from certlib.fast_certify import settled

    if len(x) < 4 * PROBE:
        return predict_fast(g, x, a.node_bounds, batch_size, fwd_progress, device, cache=cache, info=info,
                            other=True)
    head = predict_fast(g, x[:PROBE], a.node_bounds, batch_size, None, device, cache=cache, info=info, other=True)
    if head is None:
        return None
    ok, _ = settled(head[0], head[1], a.K, eps, head[2])
    if ok.mean() < PROBE_SETTLED:
        info["skipped"] = len(x) - PROBE
        f = np.concatenate([head[0], np.zeros((len(x) - PROBE, head[0].shape[1]))])
        e = np.concatenate([head[1], np.full(len(x) - PROBE, np.inf)])   # never settled: the float64 tier
        eo = np.concatenate([head[2], np.full(len(x) - PROBE, np.inf)])
        if fwd_progress is not None:
            fwd_progress(len(x))
        return f, e, eo
    chunked = True
    r = info.get("unchunk_ratio", 1.0)
    if r > 1.0:   # would the plan without chunks settle about as many? (an over-estimate of its bound)
        ok1, _ = settled(head[0], head[1] * r, a.K, eps, head[2] * r)
        chunked = ok1.sum() < ok.sum() - PROBE_UNCHUNK_LOSS
        info["unchunked"] = not chunked
    rest = predict_fast(g, x[PROBE:], a.node_bounds, batch_size,
                        (lambda k: fwd_progress(PROBE + k)) if fwd_progress else None, device, cache=cache,
                        other=True, chunked=chunked)
    return tuple(np.concatenate([a_head, a_rest]) for a_head, a_rest in zip(head, rest))


def _runtime_veto(g: Graph, x: np.ndarray, res) -> list:
    """Samples making a claim (certified, or a positive radius below eps, which
    the certified-accuracy curve counts at every smaller radius) whose
    onnxruntime argmax differs from certlib's prediction: uncertified (radius
    0) and returned for the report.  Only those samples are run: a sample with
    radius 0 claims nothing (proofs/margin_slack.md)."""
    from certlib.onnx.importer import runtime_argmax

    idx = np.flatnonzero(res.certified | (res.radius > 0))
    if not g.runtime_model or not len(idx):
        return []
    rt = runtime_argmax(g, x[idx])
    if rt is None:
        return []
    bad = idx[rt != res.pred[idx]]
    res.certified[bad] = False
    res.radius[bad] = 0.0
    return [int(i) for i in bad]


def verify_file(path: str | Path, data: Dataset, eps: float, method: str = "exact", *,
                input_shape=None, batch_size: int = 256, estimate_only: bool = False,
                progress=None, fold_inputs: bool = True, device: str = "auto", fast: bool | None = None,
                semantics="exact", accumulate: str = "float32") -> VerifyReport:
    """Import and certify an ONNX file.  ``fold_inputs=False`` bounds input
    normalisation on its own, as certificates (``--proof``) require."""
    from certlib.onnx.importer import load

    t = time.perf_counter()
    _, g = load(path, input_shape)
    t_import = time.perf_counter() - t
    rep = verify_graph(g, data, eps, method, model_name=str(path), sha256=file_sha256(path),
                       batch_size=batch_size, estimate_only=estimate_only, progress=progress,
                       fold_inputs=fold_inputs, device=device, fast=fast, semantics=semantics,
                       accumulate=accumulate)
    rep.seconds = {"import": t_import, **rep.seconds}
    return rep


# certlib.verify(...) is the public API function (certlib/_callable.py)
from certlib._callable import make_callable as _make_callable  # noqa: E402

_make_callable(__name__, "certlib.api:verify", "certlib.verify: see certlib.api")
