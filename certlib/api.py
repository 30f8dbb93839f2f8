"""certlib's public Python API (re-exported by ``import certlib``); docs/api.md.

Every function goes through the one certification road, :mod:`certlib.verify`
(import -> proven per-stage Bounds -> float64 logits with a rigorous rounding
bound -> GloRo margins), so a result here is exactly what ``certlib verify``
would print for the same model and data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from certlib.api_inputs import Model, load_data, load_model
from certlib.errors import UsageError

__all__ = ["verify", "lipschitz_bound", "attack", "check", "load_model", "load_data", "Model", "Report",
           "NetworkBound", "AttackResult"]


def _eps(eps) -> float:
    from certlib.certify import parse_eps

    try:
        return parse_eps(eps)
    except ValueError as e:
        raise UsageError(str(e)) from None


class Report:
    """What :func:`verify` proved.  ``certified[i]``: every input within l2
    distance ``eps`` of sample i gets the same prediction (in exact arithmetic,
    from the model's function); ``vra`` counts the samples both certified and
    correctly classified."""

    def __init__(self, verify_report, data, model: Model):
        self.verify_report = verify_report      # certlib.verify.VerifyReport
        self.data = data                        # certlib.data.Dataset
        self.model = model
        self.result = verify_report.result      # certlib.certify.Result
        self.attack: AttackResult | None = None

    eps = property(lambda self: float(self.verify_report.eps))
    n = property(lambda self: self.result.n)
    vra = property(lambda self: self.result.vra)
    clean_accuracy = property(lambda self: self.result.clean_accuracy)
    certified = property(lambda self: self.result.certified.copy())
    correct = property(lambda self: self.result.correct.copy())
    radius = property(lambda self: self.result.radius.copy())
    pred = property(lambda self: self.result.pred.copy())
    labels = property(lambda self: self.data.y.copy())
    #: the proven l2 Lipschitz bound of the body (every stage before the last dense layer)
    lipschitz = property(lambda self: float(self.verify_report.analysis.body.value))
    layers = property(lambda self: list(self.verify_report.analysis.layers))
    sound = property(lambda self: bool(self.verify_report.sound))
    #: "exact", or the precision ("float32", "bfloat16", "float16") the model is certified executed in
    semantics = property(lambda self: getattr(self.verify_report.semantics, "name", "exact"))
    semantics_obj = property(lambda self: self.verify_report.semantics)

    def as_dict(self) -> dict:
        """The ``certlib verify --json`` schema."""
        return self.verify_report.as_json()

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.as_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_tsv(self, path: str | Path | None = None) -> str:
        from certlib.report import tsv_text

        text = tsv_text(self.verify_report, self.data.y)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_html(self, path: str | Path | None = None) -> str:
        """One self-contained HTML page (docs/api.md); written to ``path`` if given."""
        from certlib.report.html import html_report

        text = html_report(self.verify_report, self.data.y,
                           attack=self.attack.as_dict() if self.attack else None)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def __repr__(self) -> str:
        return (f"<certlib.Report {self.model.name}: n={self.n} eps={self.eps:.6g} clean={100 * self.clean_accuracy:.2f}% "
                f"VRA={100 * self.vra:.2f}% (sound) L_body={self.lipschitz:.6g}>")


def verify(model, data, eps, *, method: str = "exact", device: str | None = None, limit: int | None = None,
           input_shape: tuple | None = None, batch_size: int = 256, proof: str | Path | None = None,
           semantics: str = "exact", accumulate: str = "float32") -> Report:
    """Certify ``model`` on ``data`` at l2 radius ``eps`` and return a :class:`Report`.

    ``model``: ONNX path, ``onnx.ModelProto``, ``torch.nn.Module`` or :class:`Model`.
    ``data``: ``"digits"`` (or any ``--data`` spec), ``(x, y)`` arrays/tensors, a
    DataLoader, or a Dataset.  ``eps``: a float or a string like ``"36/255"``
    (rounded up).  ``device``: where a torch module runs for the comparison with
    the exported model (certification itself runs in float64 on the CPU).
    ``proof``: write a certificate that :func:`check` re-verifies (ONNX paths only).
    ``semantics``: "exact" (the model's function in exact arithmetic) or "float32" /
    "bfloat16" / "float16": the model executed in that precision, over the whole ball
    (``accumulate``: "float32" or "storage" for the 16-bit formats; proofs/float_semantics.md)."""
    from certlib.verify import verify_graph

    e = _eps(eps)
    ds = load_data(data, limit)
    m = load_model(model, input_shape or tuple(ds.x.shape[1:]), device=device)
    if m.module is not None:   # the certificate must speak for the module: compare first
        from certlib.api_torch import check_module

        logits = np.concatenate([m.graph.forward(ds.x[i:i + batch_size])[0] for i in range(0, len(ds), batch_size)])
        check_module(m.module, logits, ds.x, m.device)
    if proof is not None and m.path is None:
        raise UsageError("proof= needs the model as an ONNX file path (the certificate hashes the file)")
    rep = verify_graph(m.graph, ds, e, _method(method), model_name=m.name, sha256=m.sha256,
                       batch_size=batch_size, fold_inputs=proof is None, semantics=semantics, accumulate=accumulate)
    out = Report(rep, ds, m)
    if proof is not None:
        from certlib.certificate import write_certificate

        write_certificate(proof, m.path, rep, ds, data if isinstance(data, str) else "arrays")
    for listener in list(_LISTENERS):
        listener(out)
    return out


#: callables told about every Report (the pytest plugin's certlib_report collects them)
_LISTENERS: list = []


def _method(method: str) -> str:
    from certlib.ir.compose import METHODS

    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


@dataclass
class NetworkBound:
    """The proven l2 Lipschitz bound of the whole logit map: ``bound >= body * head``
    (every factor a :class:`certlib.bounds.Bound`), with its per-stage breakdown."""

    bound: Any          # certlib.bounds.Bound, whole network (logits)
    body: Any           # Bound, every stage before the head
    head: Any           # Bound, spectral norm of the head (last dense layer)
    stages: list = field(default_factory=list)   # certlib.ir.compose.LayerBound per stage
    K: np.ndarray | None = None                  # K[i, j] >= L_body * ||w_i - w_j||
    method: str = "exact"

    @property
    def value(self) -> float:
        return float(self.bound.value)

    def __float__(self) -> float:
        return self.value


def lipschitz_bound(model, method: str = "exact", *, input_shape: tuple | None = None) -> NetworkBound:
    """The proven whole-network l2 Lipschitz bound (a Bound, never an Estimate)."""
    from certlib.bounds import Bound, require_bound, up, up_add
    from certlib.verifiers.svd import dense_bound

    m = load_model(model, input_shape)
    if m.module is not None:   # the bound must be the module's: compare it with the export on random inputs
        from certlib.api_torch import check_module

        x = np.random.default_rng(0).random((8, *m.input_shape)).astype(np.float32)
        check_module(m.module, m.graph.forward(x)[0], x, m.device)
    a = m.analysis(_method(method))
    body = require_bound(a.body, "the body bound")
    W = np.asarray(a.head_weight, dtype=np.float64)
    head = dense_bound(W).value          # proven ||W||_2 of the computed W
    if a.head_rounding:                  # exact W' = W (1 + d), |d| <= rounding: ||W' - W||_2 <= rounding ||W||_F
        head = up_add(head, up(a.head_rounding * 1.01 * float(np.linalg.norm(W))))
    head_b = Bound(head, "svd", "dense_bound + head rounding")
    return NetworkBound(body * head_b, body, head_b, list(a.layers), a.K.copy(), a.method)


@dataclass
class AttackResult:
    """PGD-l2 on every certified sample (a violation would be a false certificate)
    and an empirical LOWER bound of the logits' Lipschitz constant."""

    eps: float
    n: int
    certified: int
    violations: list
    empirical_lipschitz_lower: float
    certified_lipschitz_upper: float

    @property
    def lower_over_upper(self) -> float | None:
        u = self.certified_lipschitz_upper
        return self.empirical_lipschitz_lower / u if u > 0 else None

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["lower_over_upper"] = self.lower_over_upper
        return d


def attack(model, data, eps, *, method: str = "exact", limit: int | None = None, steps: int = 50,
           restarts: int = 3, seed: int = 0, report: Report | None = None, semantics: str = "exact") -> AttackResult:
    """Try to break the certificates of ``verify(model, data, eps)`` with PGD-l2.
    Pass ``report`` to reuse a Report (its attack result is then shown in its HTML).
    ``semantics`` float32 / bfloat16 / float16: certificates issued under that
    semantics, and every PGD iterate run with the model converted to that precision."""
    from certlib.attack import empirical_lipschitz, pgd_l2, pgd_l2_executed

    rep = report if report is not None else verify(model, data, eps, method=method, limit=limit, semantics=semantics)
    g, ds, r = rep.model.graph, rep.data, rep.result
    sem = rep.semantics_obj
    cert = np.flatnonzero(r.certified)
    flipped = np.zeros(0, dtype=bool)
    if cert.size and sem is not None and not sem.exact:
        flipped, _ = pgd_l2_executed(g, ds.x[cert], r.pred[cert], rep.eps, sem.name, steps=steps,
                                     restarts=restarts, seed=seed)
    elif cert.size:
        flipped, _ = pgd_l2(g, ds.x[cert], r.pred[cert], rep.eps, steps=steps, restarts=restarts, seed=seed)
    lower = empirical_lipschitz(g, ds.x[: min(len(ds), 64)], steps=steps, seed=seed)
    upper = lipschitz_bound(rep.model, method).value
    out = AttackResult(rep.eps, r.n, int(cert.size), [int(i) for i in cert[flipped]], float(lower), upper)
    rep.attack = out
    return out


def check(model: str | Path, certificate, data=None) -> dict:
    """Re-verify a certificate (``verify(..., proof=PATH)`` / ``certlib verify --proof``)
    with the independent checker; raises certlib.errors.ProofCheckError when invalid."""
    from certlib.errors import ProofCheckError
    from certlib.proofs.checker import CheckFailed
    from certlib.proofs.checker import check as run_check

    cert = certificate if isinstance(certificate, dict) else json.loads(Path(certificate).read_text())
    d = cert.get("data") if isinstance(cert.get("data"), dict) else {}
    spec = data if data is not None else d.get("spec")
    if spec is None or spec == "arrays":
        raise UsageError("check needs the data the certificate was made on (data=...)")
    ds = load_data(spec, d.get("n"))
    try:
        return run_check(Path(model).read_bytes(), cert, ds.x, ds.y)
    except CheckFailed as e:
        raise ProofCheckError(f"certificate INVALID: {e}") from None
