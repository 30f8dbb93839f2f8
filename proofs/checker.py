"""Independent checker for certlib certificates (schema, claims and proofs: proofs/certificate.md).

Trust base: numpy (BLAS, LAPACK dpotrf), onnx (parsing), onnxruntime (a cross-check
only), this file and proofs/checker_norms.py (its arithmetic and operator-norm proofs,
split out by meaning); nothing from certlib is imported.  ``check(model_bytes, cert, x, y)``
derives the input shape from the data and the model's declared input, walks the ONNX graph
itself, matches every certificate operator to its nodes (index, kind, geometry, initializer
sha256 / dtype / shape, a recipe that rebuilds the same float64 operator), proves every
claimed bound (rules; Rump's criterion on the Gram of each dense / explicit-conv / DFT block,
rounding bounded), recomputes the body bound and K_ij upward, and re-derives every sample
claim (prediction, certified, radius, margins) and every summary figure from its own float64
forward pass with a rigorous error bound.  Without data only ``bounds_only=True`` is accepted.
The first failure raises :class:`CheckFailed` naming the item.  Assumed: IEEE binary64
round-to-nearest; BLAS/LAPACK follow the standard error model (any order, FMA allowed); libm
cos/sin within 3 ulp.  Sections here: graph walk, forward pass, the check (match, input shape,
composition and K, samples).  Standalone:
``python checker.py MODEL.onnx CERT.json DATA.npz`` or ``... --bounds-only``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper

try:                                                              # as certlib.proofs.checker
    from .checker_norms import (ETA, F64, SQRT2, U, CheckFailed, fail, gam, gram_ok, infl, norm_up, pmap,
                                prove, up, down, vup)
    from . import checker_semantics as fsem
except ImportError:                                               # standalone: python proofs/checker.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from checker_norms import (ETA, F64, SQRT2, U, CheckFailed, fail, gam, gram_ok, infl, norm_up, pmap,
                               prove, up, down, vup)
    import checker_semantics as fsem

__all__ = ["CheckFailed", "check", "walk", "build", "forward", "gram_ok", "norm_up", "up", "down", "vup", "U",
           "ETA", "FORMAT", "TEXTS", "SUPPORTED_OPS"]
FORMAT = "certlib-certificate/1"
#: THE list of ONNX operators the walk reads (each under the conditions of proofs/certificate.md,
#: "Model"; Max, Min and Concat only inside the MinMax pattern).  certlib's certificate writer
#: refuses --proof for any other operator from this same tuple, and tests/test_checker_claims.py
#: compares it with the list in proofs/certificate.md.
SUPPORTED_OPS = ("Sub", "Add", "Mul", "Div", "Conv", "Gemm", "MatMul", "Flatten", "Reshape", "Relu",
                 "Split", "Max", "Min", "Concat", "Constant")
#: the texts that say what is claimed: a certificate must carry exactly these (proofs/certificate.md)
TEXTS = {
    ("claim",): "For every sample with certified=true and every input x' with ||x' - x||_2 <= eps, and for every "
                "sample and every x' with ||x' - x||_2 < radius, the ONNX model's function in exact real arithmetic "
                "(weights as stored) predicts pred.",
    ("data", "hash_rule"): "sha256(x as float32 C-order bytes, then y as int64 bytes)",
    ("composition", "rule"): "L = 1; for k in order: L = nextafter(L * operators[k].bound, +inf)",
    ("head", "K_rule"): "K[i][j] >= L_body * ||w_i - w_j||_2, w_i the rows of the recipe's weight",
    ("margin_rule",): "margins[j] <= f_pred - f_j in exact arithmetic (null at j = pred or when not finite)",
}
def sha(a) -> str:
    """sha256 of an array's little-endian C-order bytes (its stored dtype)."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.astype(a.dtype.newbyteorder("<")).tobytes()).hexdigest()


def f32(a) -> bool:
    a = np.asarray(a, F64)
    return bool(np.all(a.astype(np.float32).astype(F64) == a))


# ------------------------------------------------------------------ graph walk
def attrs(n) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


def walk(model, shape):
    """The model's single chain as a list of stages (dicts), and its constants."""
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    inits, ins = set(consts), [i.name for i in g.input if i.name not in consts]
    if len(ins) != 1 or len(g.output) != 1:
        fail("model", "needs exactly one input and one output")
    cur, shape, stages, nodes, i = ins[0], tuple(int(v) for v in shape), [], list(g.node), 0
    while i < len(nodes):
        n, i = nodes[i], i + 1
        a, op, item = attrs(n), n.op_type, f"node {n.name!r} ({n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            fail(item, "custom domain")
        if op not in SUPPORTED_OPS:
            fail(item, "operator not in the checker's supported subset")
        if op == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(a["value"]) if "value" in a else fail(item, "no tensor")
            continue
        if [t for t in n.input if t and t not in consts] != [cur]:
            fail(item, "does not read exactly the chain tensor (only single-chain graphs are supported)")
        st = {"name": n.name, "op": op, "recipe": [], "lip": 1.0,
              "inits": {t: consts[t] for t in n.input if t in inits}}
        c, out = [np.asarray(consts[t]) if t in consts else None for t in n.input], shape
        if op in ("Add", "Sub", "Mul", "Div"):
            first = c[0] is not None
            k = c[0] if first else c[1]
            if not np.issubdtype(k.dtype, np.floating) or np.broadcast_shapes(k.shape, (1,) + shape) != (1,) + shape:
                fail(item, "needs a float constant that broadcasts to the sample shape")
            k = k.astype(F64).reshape(k.shape[-len(shape):] if k.ndim > len(shape) else k.shape)
            if op == "Div" and (first or not np.all(k != 0)):
                fail(item, "constant / x, or division by zero")
            lip = (float(np.max(np.abs(k), initial=0.0)) if op == "Mul"
                   else up(1 / np.min(np.abs(k))) if op == "Div" else 1.0)
            st.update(kind="affine", c=k, first=first, lip=lip, recipe=[
                {"step": "elementwise", "op": op, "initializer": n.input[0 if first else 1], "constant_first": first}])
        elif op == "Conv":
            w, ap = c[1], a.get("auto_pad", b"NOTSET")
            if w is None or w.ndim != 4 or len(shape) != 3 or (ap if isinstance(ap, str) else ap.decode()) != "NOTSET":
                fail(item, "needs a constant 4-D kernel, a C,H,W input and explicit pads")
            co, cg, kh, kw = w.shape
            geo = {"kernel_shape": list(w.shape), "strides": list(a.get("strides", [1, 1])),
                   "pads": list(a.get("pads", [0, 0, 0, 0])), "dilations": list(a.get("dilations", [1, 1])),
                   "group": int(a.get("group", 1))}
            (sh, sw), (dh, dw), (pt, pl, pb, pr), grp = geo["strides"], geo["dilations"], geo["pads"], geo["group"]
            out = (co, (shape[1] + pt + pb - dh * (kh - 1) - 1) // sh + 1,
                   (shape[2] + pl + pr - dw * (kw - 1) - 1) // sw + 1)
            if (cg * grp != shape[0] or co % grp or list(a.get("kernel_shape", [kh, kw])) != [kh, kw]
                    or min(pt, pl, pb, pr) < 0 or min(sh, sw, dh, dw, out[1], out[2]) < 1):
                fail(item, "kernel, groups, pads, strides or dilations do not fit the input")
            st.update(kind="conv", geo=geo, bias=None if len(c) < 3 or c[2] is None else c[2].astype(F64).reshape(co),
                      recipe=[{"step": "load", "initializer": n.input[1]}])
        elif op in ("Gemm", "MatMul"):
            if c[1] is None or c[1].ndim != 2 or len(shape) != 1 or a.get("transA", 0):
                fail(item, "needs x @ constant 2-D B on a flat input")
            rec, alpha, beta = [{"step": "load", "initializer": n.input[1]}], a.get("alpha", 1.0), a.get("beta", 1.0)
            rec += [{"step": "transpose"}] if op == "MatMul" or not a.get("transB", 0) else []
            rec += [{"step": "scale", "by": float(alpha)}] if alpha != 1.0 else []
            W, b = build(rec, consts, item), (c[2] if len(c) > 2 else None)
            if W.shape[1] != shape[0] or b is not None and (b.size not in (1, W.shape[0]) or not (beta == 1 or f32(b))):
                fail(item, "weight does not fit the input, or the bias is not per output (or beta * C inexact)")
            bias = None if b is None else np.broadcast_to(b.astype(F64).reshape(-1) * float(beta), (W.shape[0],))
            out = (W.shape[0],)
            st.update(kind="dense", geo={"weight_shape": list(W.shape)}, bias=bias, recipe=rec)
        elif op == "Relu":
            st.update(kind="relu")
        elif op in ("Flatten", "Reshape"):
            tgt = [0, -1] if op == "Flatten" else [int(v) for v in np.ravel(c[1])]
            if (op == "Flatten" and a.get("axis", 1) != 1) or tgt[0] not in (0, -1) or a.get("allowzero", 0):
                fail(item, "must keep the batch axis first")
            rest, size = [shape[j - 1] if v == 0 else v for j, v in enumerate(tgt) if j], int(np.prod(shape))
            out = tuple(size // -int(np.prod(rest)) if v == -1 else v for v in rest)
            if int(np.prod(out)) != size or min(out) < 1:
                fail(item, f"cannot reshape {shape} to {tgt}")
            st.update(kind="reshape")
        elif op == "Split":                                       # MinMax: Split + Max + Min + Concat
            trio, C = nodes[i:i + 3], shape[0]
            sizes, kinds = (c[1] if len(c) > 1 and c[1] is not None else a.get("split")), [t.op_type for t in trio]
            if (len(n.output) != 2 or len(set(n.output)) != 2 or a.get("axis", 0) not in (1, -len(shape)) or C % 2
                    or len(trio) < 3 or (sizes is not None and list(np.ravel(sizes)) != [C // 2, C // 2])
                    or kinds[:2] not in (["Max", "Min"], ["Min", "Max"]) or kinds[2] != "Concat"):
                fail(item, "Split is only supported as the MinMax pattern Split + Max + Min + Concat")
            (mx, mn), sp, n = (trio[:2] if kinds[0] == "Max" else trio[1::-1]), n, trio[2]
            order = {(mx.output[0], mn.output[0]): "maxmin", (mn.output[0], mx.output[0]): "minmax"}.get(tuple(n.input))
            if (sorted(mx.input) != sorted(sp.output) or sorted(mn.input) != sorted(sp.output) or order is None
                    or attrs(n).get("axis") not in (1, -len(shape))
                    or any(t.domain not in ("", "ai.onnx") for t in trio)):
                fail(item, "malformed MinMax pattern")
            i += 3
            st.update(name=n.name, kind="minmax", order=order, inits={})
        else:
            fail(item, "operator not in the checker's supported subset")
        st.update(out=out, geo={**st.get("geo", {}), "input_shape": list(shape), "output_shape": list(out)})
        stages.append(st)
        cur, shape = n.output[0], out
    if cur != g.output[0].name:
        fail("model", "the graph output is not the end of the chain")
    return stages, consts


def build(steps, consts, item):
    """Evaluate a recipe (proofs/certificate.md) into a float64 weight / kernel."""
    K = None
    for s in steps:
        kind = s.get("step")
        if kind == "load" and s.get("initializer") in consts:
            K = np.array(consts[s["initializer"]], dtype=F64)
        elif K is None:
            fail(item, f"recipe step {s} before a load")
        elif kind == "transpose" and K.ndim == 2:
            K = np.ascontiguousarray(K.T)
        elif kind == "scale" and f32(s.get("by")) and f32(K):
            K = K * float(s["by"])                                # float32 x float32: exact in float64
        elif kind == "fold" and s.get("op") in ("Mul", "Div") and s.get("initializer") in consts:
            v = np.asarray(consts[s["initializer"]], F64)
            ax = v.ndim - (K.ndim - 1)                            # v's channel axis under broadcasting
            if any(d != 1 for j, d in enumerate(v.shape) if j != ax) or (ax >= 0 and v.shape[ax] not in (1, len(K))):
                fail(item, f"fold constant {s['initializer']} is not per output channel")
            v = np.broadcast_to(v.reshape(-1), (len(K),)).reshape((-1,) + (1,) * (K.ndim - 1))
            K = K * v if s["op"] == "Mul" else K / v
        elif kind == "identity_centre" and K.ndim == 4 and K.shape[0] == K.shape[1] and K.shape[2] * K.shape[3] % 2:
            K = K.copy()
            K[np.arange(len(K)), np.arange(len(K)), K.shape[2] // 2, K.shape[3] // 2] += float(s.get("coef", 1.0))
        else:
            fail(item, f"invalid recipe step {s}")
    return K


# ------------------------------------------------------------------ forward pass
def conv(x, K, b, geo):
    (sh, sw), (dh, dw), g, (pt, pl, pb, pr) = geo["strides"], geo["dilations"], geo["group"], geo["pads"]
    (co, cg, kh, kw), og = K.shape, K.shape[0] // geo["group"]
    win = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))),
                                                   (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]
    B, _, Ho, Wo = win.shape[:4]
    y = np.empty((B, Ho, Wo, co))
    for q in range(g):                                            # im2col + BLAS: inner products of length n
        cols = win[:, q * cg:(q + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(B * Ho * Wo, cg * kh * kw)
        y[..., q * og:(q + 1) * og] = (cols @ K[q * og:(q + 1) * og].reshape(og, -1).T).reshape(B, Ho, Wo, og)
    y = y.transpose(0, 3, 1, 2)
    return y if b is None else y + b[:, None, None]


def apply(st, h):
    """One stage in float64: (output, per-sample bound on its own rounding error, Lipschitz)."""
    kind, B = st["kind"], len(h)
    if kind in ("reshape", "relu", "minmax"):                     # exact operations
        if kind != "minmax":
            return (h.reshape((B,) + st["out"]) if kind == "reshape" else np.maximum(h, 0.0)), 0.0, 1.0
        a, b = np.split(h, 2, axis=1)
        hi, lo = np.maximum(a, b), np.minimum(a, b)
        return np.concatenate([hi, lo] if st["order"] == "maxmin" else [lo, hi], axis=1), 0.0, 1.0
    if kind == "affine":                                          # one IEEE operation per entry
        c, op = st["c"], st["op"]
        y = (h + c if op == "Add" else h * c if op == "Mul" else h / c if op == "Div"
             else c - h if st["first"] else h - c)
        return y, vup(vup(norm_up(y, 1) * (2 * U)) + y[0].size * ETA), st["lip"]
    if "abs" not in st:                                           # || |W| ||_2 <= sqrt(max row sum * max col sum)
        W = np.abs(st["W"])
        g, n = st["geo"].get("group", 1), W[0].size
        rows, cols = W.reshape(len(W), -1).sum(axis=1), W.reshape(g, len(W) // g, W.shape[1], -1).sum(axis=(1, 3))
        st["abs"] = up(math.sqrt(up(float(infl(rows.max(), n)) * float(infl(cols.max(), W.size)))))
        pos = int(np.prod(st["out"][1:]))
        st["bnorm"], st["n"] = (0.0 if st["bias"] is None else up(norm_up(st["bias"]) * up(math.sqrt(pos)))), n + 1
    y = conv(h, st["W"], st["bias"], st["geo"]) if kind == "conv" else h @ st["W"].T
    y = y + st["bias"] if kind == "dense" and st["bias"] is not None else y
    # |fl(W x + b) - (W x + b)| <= gamma_{n+1} (|W| |x| + |b|) entrywise, any summation order
    r = vup(gam(st["n"]) * vup(vup(st["abs"] * norm_up(h, 1)) + st["bnorm"]))
    return y, vup(r + y[0].size * st["n"] * ETA), 1.0


def forward(items, x, batch=16):
    """Float64 logits and per-sample e with ||logits - exact logits||_2 <= e (proofs/certificate.md)."""
    def run(i):
        h, e = np.asarray(x[i:i + batch], F64), np.zeros(len(x[i:i + batch]))
        for sts, L in items:
            loc = np.zeros(len(h))
            for st in sts:                                        # error of the item's own nodes at h ...
                h, r, m = apply(st, h)
                loc = vup(vup(loc * m) + r)
            e = vup(vup(e * L) + loc)                             # ... plus the propagated input error
        return h, e
    outs = [run(0)] + pmap(run, range(batch, len(x), batch))      # the first batch fills per-stage caches
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


# ------------------------------------------------------------------ the check
def match(name, op, stages, pos, consts):
    """Check that certificate entry `op` describes stages[pos:...]; returns (stages, kernel, folds)."""
    names, geo = list(op["nodes"] or fail(name, "covers no graph node")), dict(op["geometry"])
    sts = stages[pos:pos + len(names)]
    if [s["name"] for s in sts] != names:
        fail(name, f"covers {names} but the graph's next nodes are {[s['name'] for s in sts]}")
    head, rest = sts[0], sts[1:]
    if op.get("kind") != head["kind"]:
        fail(name, f"kind {op.get('kind')!r} but the graph node is {head['kind']!r}")
    if rest and (head["kind"] not in ("conv", "dense")
                 or any(s["kind"] != "affine" or s["op"] not in ("Mul", "Div") or s["first"] for s in rest)):
        fail(name, "only Mul/Div by a constant can be folded into a linear operator")
    want, got = {k: v for s in sts for k, v in s["inits"].items()}, dict(op["initializers"])
    if set(got) != set(want):
        fail(name, f"lists initializers {sorted(got)}, the graph uses {sorted(want)}")
    for k, v in want.items():
        if got[k] != {"sha256": sha(v), "dtype": str(v.dtype), "shape": list(v.shape)}:
            fail(name, f"sha256, dtype or shape of initializer {k!r} does not match the model")
    if set(geo) - {"proof"} != set(head["geo"]):                  # proof: a hint (which family to prove on)
        fail(name, f"geometry lists {sorted(geo)}, the graph's node has {sorted(head['geo'])}")
    for k, v in head["geo"].items():
        if geo.get(k) != v:
            fail(name, f"geometry {k} = {geo.get(k)} but the graph has {v}")
    if head["kind"] not in ("conv", "dense"):
        if op["recipe"] != head["recipe"]:
            fail(name, "recipe differs from the graph's node")
        return sts, None, 0
    steps = head["recipe"] + [{"step": "fold", "op": s["op"], "initializer": s["recipe"][0]["initializer"]}
                              for s in rest]
    if [s.get("node") for s in op["recipe"] if s.get("step") == "fold"] != [s["name"] for s in rest]:
        fail(name, "the recipe's fold steps do not name the folded graph nodes in order")
    mine, theirs = build(steps, consts, name), build(op["recipe"], consts, name)
    if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
        fail(name, "the recipe does not rebuild the operator the graph computes")
    return sts, mine, len(rest)


def check(model_bytes: bytes, cert: dict, x=None, y=None, *, bounds_only: bool = False) -> dict:
    """Re-verify `cert` for the ONNX model `model_bytes` and the data x, y; raises CheckFailed.
    Without data only ``bounds_only=True`` is accepted: then the model, the operator bounds, the
    composition and K are proven for the certificate's input shape, and no sample claim is checked."""
    if (x is None) != (y is None) or (x is None) != bool(bounds_only):
        raise ValueError("check() needs the data (x, y), or no data and bounds_only=True (samples not checked)")
    try:                                  # one BLAS thread: threaded LAPACK crawls on shared cores (speed only)
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(1)
    except ImportError:
        limit = contextlib.nullcontext()
    with limit:
        try:
            return _check(model_bytes, cert, x, y)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise CheckFailed("certificate", f"malformed or unsupported ({type(e).__name__}: {e})") from None


def sample_shape(model, cert, x) -> tuple:
    """The per-sample input shape: the data's (with data), else the certificate's; either must fit the
    model's declared input and equal the certificate's ``model.input_shape``."""
    g, claimed = model.graph, cert["model"]["input_shape"]
    inp = [i for i in g.input if i.name not in {t.name for t in g.initializer}]
    if len(inp) != 1 or len(g.output) != 1:
        fail("model", "needs exactly one input and one output")
    if cert["model"].get("input") != inp[0].name or cert["model"].get("output") != g.output[0].name:
        fail("model", "input / output names differ from the graph's")
    shape = tuple(int(v) for v in (x.shape[1:] if x is not None else claimed))
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp[0].type.tensor_type.shape.dim]
    if len(dims) != 1 + len(shape) or any(d is not None and d != v for d, v in zip(dims[1:], shape)):
        fail("model", f"the model's declared input {dims} does not take samples of shape {list(shape)}")
    if not isinstance(claimed, list) or claimed != list(shape):
        fail("model", f"input_shape {claimed} but the data's samples have shape {list(shape)}")
    return shape


def _check(model_bytes, cert, x, y):
    sem = cert.get("semantics")                                   # absent: exact semantics
    if sem is not None:
        fsem.params(sem if isinstance(sem, dict) else {})
    for path, text in TEXTS.items():
        if path == ("claim",) and sem is not None:
            text = fsem.claim_text(sem["name"], sem["accumulate"])
        v = cert
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if v != text:
            fail("certificate", f"{'.'.join(path)} is not the text this checker proves")
    if cert.get("format") != FORMAT:
        fail("certificate", f"format {cert.get('format')!r} is not {FORMAT}")
    if hashlib.sha256(model_bytes).hexdigest() != cert["model"]["sha256"]:
        fail("model", "sha256 differs from the certificate's")
    model = onnx.load_from_string(model_bytes)
    stages, consts = walk(model, sample_shape(model, cert, x))
    for st in stages:
        if st["kind"] in ("conv", "dense"):
            st["W"] = build(st["recipe"], consts, st["name"])
    items, pos, ops = [], 0, cert["operators"]
    for k, op in enumerate(ops):
        name = f"operator {k} ({', '.join(op.get('nodes') or [])})"
        if op.get("index") != k:
            fail(name, f"index {op.get('index')!r} is not its position {k}")
        sts, K, folds = match(name, op, stages, pos, consts)
        t = number(op["bound"], name, "claimed bound")
        if K is not None and not prove(K, sts[0], op["geometry"].get("proof") or {}, t, folds):
            fail(name, f"claimed bound {t!r} is not proven (Rump criterion fails)")
        if K is None and not t >= sts[0]["lip"]:
            fail(name, f"claimed bound {t!r} is below the rule's {sts[0]['lip']!r}")
        items.append((sts, t))
        pos += len(sts)
    hd, comp = cert["head"], cert["composition"]
    sts, W, _ = match("head", {**hd, "nodes": [hd["node"]]}, stages, pos, consts)
    if sts[0]["kind"] != "dense" or pos + 1 != len(stages):
        fail("head", "the head must be the last graph node, a dense layer")
    if sorted(comp["order"]) != list(range(len(ops))) or not all(type(k) is int for k in comp["order"]):
        fail("composition", "the order must list every operator exactly once")
    L, body = 1.0, number(comp["body"], "composition", "body")
    for k in comp["order"]:
        L = up(L * items[k][1])
    if not (body >= L and number(hd["L_body"], "head", "L_body") == body):
        fail("composition", f"body bound {body!r} is below the upward-rounded product {L!r}")
    (C, D), Kc = W.shape, np.array(hd["K"], dtype=F64)
    if Kc.shape != (C, C) or not np.all(np.isfinite(Kc) & (Kc >= 0)) or np.any(np.diag(Kc) != 0):
        fail("head", f"K must be a finite non-negative {C}x{C} matrix with a zero diagonal")
    for i in range(C):                                            # ||d||^2 <= (fsum(fl(fl(d)^2)) + D eta)(1 + 8u)
        s = np.array([math.fsum(v) for v in (W - W[i]) ** 2])
        Kup = vup(body * vup(np.sqrt(vup(vup(s + D * ETA) * up(1 + 8 * U)))))
        j = np.nonzero((Kc[i] < Kup) & (np.arange(C) != i))[0]
        if j.size:
            fail(f"K[{i}][{j[0]}]", f"{float(Kc[i, j[0]])!r} is below L_body ||w_i - w_j|| <= {float(Kup[j[0]])!r}")
    items.append((sts, up(norm_up(W))))                           # head: ||W||_2 <= ||W||_F
    out = {"valid": True, "operators": len(ops), "body": L, "input_shape": cert["model"]["input_shape"],
           "bounds_only": x is None, "samples_checked": 0, "certified": 0}
    return out if x is None else {**out, **check_samples(model_bytes, cert, items, Kc, x, y)}


def number(v, item, what, lo=0.0):
    """A JSON number (not a bool), finite and >= lo."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= lo):
        fail(item, f"{what} {v!r} is not a finite number >= {lo}")
    return float(v)


def check_samples(model_bytes, cert, items, Kc, x, y) -> dict:
    """Every per-sample claim and every summary figure, re-derived from this checker's own forward pass."""
    S, N, eps = cert["samples"], len(x), number(cert["eps"], "eps", "eps")
    x, y = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64)
    if hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest() != cert["data"]["sha256"]:
        fail("data", "the data's sha256 differs from the certificate's")
    if not (cert["data"]["n"] == len(S) == cert["summary"]["n"] == N) or isinstance(cert["data"]["n"], bool):
        fail("data", f"the data has {N} samples; data.n, summary.n and the samples must say so")
    f, e = forward(items, x)
    import onnxruntime as ort
    try:
        sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        feed = x[:8].astype(F64) if "double" in sess.get_inputs()[0].type else x[:8]
        ref, f0 = sess.run(None, {sess.get_inputs()[0].name: feed})[0], f[:8]    # a cross-check, not a proof
    except Exception as ex:                                       # noqa: BLE001 (any onnxruntime refusal)
        fail("model", f"onnxruntime cannot run the model on the data ({type(ex).__name__})")
    if ref.shape != f0.shape or not np.max(np.abs(ref - f0), initial=0.0) <= 1e-3 * (1 + np.max(np.abs(f0), initial=0)):
        fail("model", "this checker's forward pass disagrees with onnxruntime")
    (N, C), sq2e = f.shape, vup(SQRT2 * e)[:, None]
    if [s.get("index") for s in S] != list(range(N)) or any(s.get("label") != int(v) for s, v in zip(S, y)):
        fail("samples", "indices must be 0..n-1 and labels must be the data's")
    for s in S:
        if (type(s.get("certified")) is not bool or type(s.get("pred")) is not int or not -1 <= s["pred"] < C
                or not isinstance(s.get("margins"), list) or len(s["margins"]) != C):
            fail(f"sample {s['index']}", f"needs certified (bool), pred (-1..{C - 1}) and {C} margins")
        number(s.get("radius"), f"sample {s['index']}", "radius")
    claim, pred = np.array([s["certified"] for s in S], bool), np.array([s["pred"] for s in S], np.int64)
    rad = np.array([float(s["radius"]) for s in S])
    M = np.array([[math.nan if v is None else number(v, f"sample {s['index']}", "margin", -math.inf)
                   for v in s["margins"]] for s in S]).reshape(N, C)
    fin, p = np.all(np.isfinite(f), axis=1) & np.isfinite(e), np.clip(pred, 0, C - 1)
    d = f[np.arange(N), p][:, None] - f                          # rigorous bounds on f_p - f_j (exact):
    lo = np.nextafter(np.nextafter(d - 2 * U * np.abs(d), -np.inf) - sq2e, -np.inf)
    hi, others = vup(vup(d + 2 * U * np.abs(d)) + sq2e), np.arange(C)[None, :] != p[:, None]
    lo, hi = np.where(fin[:, None], lo, -np.inf), np.where(fin[:, None], hi, np.inf)
    lo_x, sem = lo, cert.get("semantics")
    if sem is not None:                                           # the executed model over the whole ball
        rec = np.array([[number(v, f"sample {s['index']}", "stage norm") for v in s.get("stage_norms") or []]
                        for s in S], dtype=F64).reshape(N, -1)
        lo = fsem.lower_over_ball(lo, rec, items, x, eps, rad, sem, apply)

    def first(bad, why):
        if np.any(bad):
            fail(f"sample {np.nonzero(bad)[0][0]}", why)
    # pred: a class no other class provably beats (the argmax, wherever the bounds decide it); -1: no finite logits
    first(np.where(pred >= 0, ~fin | np.any(others & (hi < 0), axis=1), fin), "claimed prediction is not the model's")
    first(claim & (np.any(others & ~(lo > vup(eps * Kc[p])), axis=1) | (pred < 0)),
          "claimed certified, but a margin lower bound is <= eps K")
    first((rad > 0) & (np.any(others & ~((lo > 0) & (vup(rad[:, None] * Kc[p]) <= lo)), axis=1) | (pred < 0)),
          "claimed radius exceeds the radius this checker derives (some margin lower bound < radius K)")
    first(np.any(~others & ~np.isnan(M), axis=1) | ((pred < 0) & np.any(~np.isnan(M), axis=1)),
          "a margin is stated at j = pred or without a prediction")
    first(np.any(others & (M > lo_x), axis=1), "a claimed margin exceeds this checker's lower bound")
    summ, correct = cert["summary"], pred == y
    want = {"n": N, "certified": int(claim.sum()), "clean_accuracy": float(correct.sum()) / N if N else 0.0,
            "vra": float((claim & correct).sum()) / N if N else 0.0}
    for k, v in want.items():
        if type(summ.get(k)) is not type(v) or summ[k] != v:
            fail("summary", f"{k} = {summ.get(k)!r} but the samples give {v!r}")
    return {"samples_checked": N, "certified": want["certified"], "vra": want["vra"]}


if __name__ == "__main__":                                        # standalone: no certlib needed
    import json
    args = [a for a in sys.argv[1:] if a != "--bounds-only"]
    only = len(args) < len(sys.argv) - 1
    if len(args) != (2 if only else 3):
        print("usage: python checker.py MODEL.onnx CERT.json DATA.npz (arrays x, y)\n"
              "       python checker.py MODEL.onnx CERT.json --bounds-only (model, bounds, composition, K;"
              " no sample claim is checked)", file=sys.stderr)
        sys.exit(2)
    data = None if only else np.load(args[2])
    try:
        with open(args[0], "rb") as fh, open(args[1]) as fc:
            res = check(fh.read(), json.load(fc), *((data["x"], data["y"]) if data is not None else ()),
                        bounds_only=only)
    except CheckFailed as ex:
        print(f"certificate INVALID: {ex}", file=sys.stderr)
        sys.exit(4)
    print(json.dumps(res))
