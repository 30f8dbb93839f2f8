"""Certificates: everything ``certlib verify`` claims, written so that the
independent checker (``proofs/checker.py``, ``certlib check``) can re-prove it
from the ONNX file alone.  Schema and the checker's proof: proofs/certificate.md.

The writer re-imports the model (deterministic) to pair each composition factor
of :func:`certlib.ir.compose.analyze` with the ONNX nodes it covers; node names
and initializer names come from the ORIGINAL graph (before constant folding), so
every weight must be stored as an initializer.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from certlib._version import __version__
from certlib.errors import UsageError

__all__ = ["FORMAT", "array_sha256", "build_certificate", "write_certificate"]

FORMAT = "certlib-certificate/1"
CLAIM = ("For every sample with certified=true and every input x' with ||x' - x||_2 <= eps, and for every "
         "sample and every x' with ||x' - x||_2 < radius, the ONNX model's function in exact real arithmetic "
         "(weights as stored) predicts pred.")
#: stated margins and radii give away CUSHION x certlib's own slack: the checker's error bound is its own
#: (a different recursion, typically within 2x of certlib's), and a claim must hold under it too
CUSHION = 1024.0


def array_sha256(a: np.ndarray) -> str:
    """sha256 of an array's little-endian C-order bytes in its stored dtype (as the checker)."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.astype(a.dtype.newbyteorder("<")).tobytes()).hexdigest()


def _meta(a: np.ndarray) -> dict:
    return {"sha256": array_sha256(a), "dtype": str(a.dtype), "shape": list(a.shape)}


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _stated(r, K: np.ndarray) -> tuple[list, list, list]:
    """Per sample: the certified flag, the radius and the margins the certificate states, lowered below
    certlib's by CUSHION times its slack so that the independent checker's own (larger) error bound still
    proves them: a weaker claim (proofs/certificate.md, "Claims").  A sample certlib certifies by less than
    the cushion (within ~1e-9 relative of the threshold) is stated uncertified."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.nextafter(r.margins - CUSHION * r.slack[:, None], -np.inf)
        p = np.maximum(r.pred, 0)
        Kp, others = K[p], np.arange(K.shape[1])[None, :] != p[:, None]
        q = np.where(Kp > 0, np.nextafter(m / Kp, -np.inf), np.where(m > 0, np.inf, -np.inf))
        rad = np.min(np.where(others, q, np.inf), axis=1)
    rad = np.where((r.pred >= 0) & np.all(~others | (m > 0), axis=1) & (rad > 0), rad, 0.0)
    rad = np.minimum(rad, np.finfo(np.float64).max)
    cert = r.certified & np.all(~others | (m > np.nextafter(r.eps * Kp, np.inf)), axis=1)
    return ([bool(v) for v in cert], [float(v) for v in rad],
            [[_num(v) if o and pr >= 0 else None for v, o in zip(row, orow)]
             for row, orow, pr in zip(m, others, r.pred)])


#: the float-semantics term is stated with this factor on certlib's e_ball: the checker's bound is its own
SEM_CUSHION = 2.0


def _semantics_claims(rep, K, certified, margins) -> tuple[list, list, dict, list]:
    """Under a floating-point semantics: the stated certified flags and radii (<= eps) hold with
    SEM_CUSHION x certlib's execution-error bound over the ball subtracted from the stated margins; the
    per-sample stage norms are certlib's upper bounds, raised by 2^-20 relative (proofs/float_semantics.md)."""
    from certlib.proofs.checker_semantics import claim_text

    sem, det = rep.semantics, rep.semantics_detail
    eb = np.asarray(det["e_ball"], dtype=np.float64)
    cert_out, rad_out = [], []
    for i, (c, row) in enumerate(zip(certified, margins)):
        p = int(rep.result.pred[i])
        vals = [(v, K[p, j]) for j, v in enumerate(row) if v is not None and j != p]
        sub = np.nextafter(SEM_CUSHION * math.sqrt(2.0) * (1 + 2.0 ** -40) * eb[i], np.inf) if np.isfinite(eb[i]) \
            else math.inf
        ok = bool(c) and bool(rep.result.certified[i]) and np.isfinite(sub) and p >= 0 and len(vals) == K.shape[0] - 1 and all(
            v - sub > np.nextafter(rep.eps * k, np.inf) for v, k in vals)
        rs = [(v - sub) / k if k > 0 else (math.inf if v - sub > 0 else -math.inf) for v, k in vals] if vals else []
        r = min(rs) if rs and np.isfinite(sub) and p >= 0 and len(vals) == K.shape[0] - 1 else 0.0
        r = float(np.nextafter(min(r, rep.eps), -np.inf)) if r > 0 else 0.0
        cert_out.append(ok)
        rad_out.append(max(r, 0.0))
    norms = np.asarray(det["norms"], dtype=np.float64)
    rec = np.nextafter(norms * (1 + 2.0 ** -20) + 2.0 ** -900, np.inf)
    block = {"name": sem.name, "accumulate": sem.accumulate,
             "rule": "stage_norms[k] >= ||input of graph stage k at x||_2 (exact); e_ball from them: "
                     "proofs/float_semantics.md"}
    return cert_out, rad_out, {"claim": claim_text(sem.name, sem.accumulate), "semantics": block}, rec.tolist()


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _weight_recipe(node, inits: dict) -> list:
    """Recipe that builds the (out, in) weight / (co, ci/g, kh, kw) kernel of one ONNX node."""
    w = node.input[1] if len(node.input) > 1 else ""
    if w not in inits:
        raise UsageError(f"--proof: {node.name!r} reads a weight computed inside the graph; certificates "
                         "need weights stored as ONNX initializers")
    steps = [{"step": "load", "initializer": w}]
    a = _attrs(node)
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not a.get("transB", 0)):
        steps.append({"step": "transpose"})
    if node.op_type == "Gemm" and float(a.get("alpha", 1.0)) != 1.0:
        steps.append({"step": "scale", "by": float(a.get("alpha", 1.0))})
    return steps


def _proof_hint(op, method: str) -> dict:
    """Which block family the claimed bound was proven on (the checker re-proves on the same)."""
    from certlib.verifiers.operators import Conv2d

    if not isinstance(op, Conv2d):
        return {"family": "dense"}
    if "explicit" in method:
        return {"family": "explicit"}
    if method.startswith("fft-block-svd"):
        from certlib.verifiers.svd import conv_grid
        return {"family": "dft", "grid": [int(v) for v in conv_grid(op)]}
    from certlib.verifiers.power import DenseFamily, family
    fam = family(op)
    return {"family": "explicit"} if isinstance(fam, DenseFamily) else {"family": "dft", "grid": list(fam.grid)}


def _entry(k, ir_nodes, op, bound, method, label, onnx_nodes, inits) -> dict:
    """One composition factor: the graph nodes it covers, their initializers, geometry, recipe, bound."""
    from certlib.ir.graph import ActivationNode, AffineNode, LinearNode
    from certlib.verifiers.operators import Dense

    names = [n.name for n in ir_nodes]
    if any(not nm or nm not in onnx_nodes for nm in names):
        raise UsageError(f"--proof: IR nodes {names} have no unique ONNX node name; certificates need "
                         "named, uniquely named nodes")
    ox = [onnx_nodes[nm] for nm in names]
    n0 = ir_nodes[0]
    geo = {"input_shape": list(n0.in_shape), "output_shape": list(n0.out_shape)}
    recipe: list = []
    if isinstance(n0, LinearNode):
        kind = "dense" if isinstance(n0.op, Dense) else "conv"
        recipe = _weight_recipe(ox[0], inits)
        for n, o in zip(ir_nodes[1:], ox[1:]):  # per-channel affine maps folded into the rows
            const = [t for t in o.input if t in inits]
            if o.op_type not in ("Mul", "Div") or len(const) != 1:
                raise UsageError(f"--proof: folding {o.op_type} node {o.name!r} is not expressible in a recipe")
            recipe.append({"step": "fold", "node": o.name, "op": o.op_type, "initializer": const[0]})
        if kind == "dense":
            geo["weight_shape"] = list(n0.op.weight.shape)
        else:
            c = n0.op
            geo.update(kernel_shape=list(c.kernel.shape), strides=list(c.stride), pads=list(c.padding),
                       dilations=list(c.dilation), group=int(c.groups))
        geo["proof"] = _proof_hint(op if op is not None else n0.op, method)
    elif isinstance(n0, AffineNode):
        kind = "affine"
        o = ox[0]
        if o.op_type not in ("Add", "Sub", "Mul", "Div") or sum(t in inits for t in o.input) != 1:
            raise UsageError(f"--proof: {o.op_type} node {o.name!r} is not an elementwise map by an initializer")
        first = o.input[0] in inits
        recipe = [{"step": "elementwise", "op": o.op_type, "initializer": o.input[0 if first else 1],
                   "constant_first": first}]
    elif isinstance(n0, ActivationNode):
        kind = "relu" if n0.activation == "relu" else "minmax"
    else:
        kind = "reshape"
    used = {t: _meta(inits[t]) for o in ox if o.op_type != "Concat" for t in o.input if t in inits}
    return {"index": k, "nodes": names, "kind": kind, "label": label, "geometry": geo, "initializers": used,
            "recipe": recipe, "bound": float(bound), "method": method}


#: the IR activations whose ONNX forms (Relu; Split + Max + Min + Concat) the checker reads
CHECKED_ACTIVATIONS = ("relu", "minmax", "minmax_rev")


def _require_certifiable(g, model=None) -> None:
    """Refuse --proof for structures the independent checker does not cover
    (the model can still be verified without --proof): ONNX operators outside
    the checker's own list (``proofs.checker.SUPPORTED_OPS``), then IR nodes
    it has no rule for."""
    from certlib.ir.graph import ActivationNode, IndexNode, LinearNode, ParallelNode
    from certlib.proofs.checker import SUPPORTED_OPS

    ops = sorted({n.op_type for n in model.graph.node if n.op_type not in SUPPORTED_OPS}) if model else []
    if ops:
        raise UsageError("--proof: the independent checker does not read these ONNX operators: " + ", ".join(ops)
                         + f" (it reads {', '.join(SUPPORTED_OPS)}). Run `certlib verify` without --proof "
                         "(the certification itself is sound).")
    bad = []
    for n in g.nodes:
        if isinstance(n, ParallelNode):
            bad.append(f"{n.name} (branches merged by {n.onnx_op})")
        elif isinstance(n, IndexNode):
            bad.append(f"{n.name} ({n.onnx_op})")
        elif isinstance(n, ActivationNode) and n.activation not in CHECKED_ACTIVATIONS:
            bad.append(f"{n.name} ({n.activation})")
        elif isinstance(n, LinearNode) and (n.transposed or n.onnx_op not in ("Conv", "Gemm", "MatMul")):
            bad.append(f"{n.name} ({n.onnx_op})")
    if bad:
        raise UsageError("--proof: the independent checker does not cover these nodes yet: " + ", ".join(bad)
                         + ". Run `certlib verify` without --proof (the certification itself is sound).")


def build_certificate(model_path: str | Path, rep, data, data_spec: str, input_shape=None) -> dict:
    """The certificate (a JSON-ready dict) for a sound VerifyReport ``rep`` of ``model_path`` on ``data``."""
    from certlib.ir.compose import body_stages
    from certlib.onnx.importer import load

    if not rep.sound or rep.result is None:
        raise UsageError("--proof needs sound certification (not --estimate-only)")
    if getattr(rep, "fast", {}).get("float32"):
        raise UsageError("--proof needs the float64 logits (verify with fast=False): the stated margins give "
                         "away a cushion of the logits' error bound, and the float32 bound is far larger")
    if getattr(getattr(rep, "analysis", None), "body_rule", "product") != "product":
        raise UsageError("--proof: the independent checker re-proves a product of per-operator bounds; this body "
                         "bound comes from the multi-layer LipSDP (proofs/lipsdp.md), which it does not re-check. "
                         "Use --method exact or power with --proof.")
    model = onnx.load(str(model_path))
    _, g = load(model_path, input_shape)
    _require_certifiable(g, model)
    a = rep.analysis
    names = [n.name for n in model.graph.node]
    onnx_nodes = {n.name: n for n in model.graph.node if n.name and names.count(n.name) == 1}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    layers = iter(a.layers)
    ops = []
    if a.fold_inputs:
        raise UsageError("--proof needs the analysis without input folding (verify_file(..., fold_inputs=False))")
    for k, (idx, op, factor, label) in enumerate(body_stages(g, a.head_index, fold_inputs=False)):
        nodes = [g.nodes[i] for i in idx]
        if op is not None or factor != 1.0 or nodes[0].kind == "activation":
            lb = next(layers)
            if lb.name != (nodes[0].name or f"node{idx[0]}"):
                raise RuntimeError(f"certificate: layer {lb.name} does not pair with node {nodes[0].name}")
            bound, method = lb.bound, lb.method
        else:
            bound, method = 1.0, "rule"
        ops.append(_entry(k, nodes, op, bound, method, label, onnx_nodes, inits))
    h = a.head_index
    if h != len(g.nodes) - 1:
        raise UsageError("--proof: the head must be the last node (maps after the head are not supported yet)")
    head = _entry(len(ops), [g.nodes[h]], None, math.nan, "", "head", onnx_nodes, inits)
    body = float(a.body.value)
    head.update(node=head.pop("nodes")[0], L_body=body, K=[[float(v) for v in row] for row in a.K],
                K_rule="K[i][j] >= L_body * ||w_i - w_j||_2, w_i the rows of the recipe's weight")
    for key in ("index", "bound", "method"):
        head.pop(key)
    r = rep.result
    sem = getattr(rep, "semantics", None)
    floating = sem is not None and not sem.exact
    if floating and any(len(o["nodes"]) != 1 for o in ops):
        raise UsageError("--proof under a floating-point semantics: folded operators are not covered yet")
    certified, radius, margins = _stated(rep.semantics_detail["at_x"] if floating else r,
                                         np.asarray(a.K, dtype=np.float64))
    extra, norms = {}, None
    if floating:
        certified, radius, extra, norms = _semantics_claims(rep, np.asarray(a.K, dtype=np.float64), certified,
                                                            margins)
    samples = [{"index": i, "label": int(data.y[i]), "pred": int(r.pred[i]), "certified": certified[i],
                "radius": radius[i], "margins": margins[i]} for i in range(r.n)]
    if floating:
        for s, nv in zip(samples, norms):
            s["stage_norms"] = nv
    n_cert, n_vra = sum(certified), sum(c and bool(k) for c, k in zip(certified, r.correct))
    return {
        "format": FORMAT, "claim": CLAIM, "certlib_version": __version__, **extra,
        "model": {"path": str(model_path), "sha256": rep.sha256, "input": g.input_name,
                  "input_shape": list(g.input_shape), "output": g.output_name},
        "eps": float(rep.eps),
        "data": {"spec": data_spec, "name": data.name, "n": int(len(data)), "sha256": data.sha256(),
                 "hash_rule": "sha256(x as float32 C-order bytes, then y as int64 bytes)"},
        "operators": ops,
        "composition": {"order": list(range(len(ops))), "body": body,
                        "rule": "L = 1; for k in order: L = nextafter(L * operators[k].bound, +inf)"},
        "head": head,
        "samples": samples,
        "summary": {"n": r.n, "certified": n_cert, "clean_accuracy": r.clean_accuracy,
                    "vra": n_vra / r.n if r.n else 0.0},
        "margin_rule": "margins[j] <= f_pred - f_j in exact arithmetic (null at j = pred or when not finite)",
    }


def write_certificate(path: str | Path, model_path: str | Path, rep, data, data_spec: str,
                      input_shape=None) -> dict:
    cert = build_certificate(model_path, rep, data, data_spec, input_shape)
    Path(path).write_text(json.dumps(cert, allow_nan=False) + "\n")
    return cert
