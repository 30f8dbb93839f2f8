"""Certificates (certlib/certificate.py) and the independent checker (proofs/checker.py).

Untouched certificates are accepted; every mutation of a claim (a bound below the
truth, a swapped weight hash, a wrong K_ij, a sample flipped to certified, a
recipe without the residual identity, a removed operator, ...) is rejected with
the failing item named.  Oracles: explicit matrices + numpy SVD for operator
norms, an extended-precision forward pass for the logits' error bounds."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from certlib.certificate import array_sha256, build_certificate
from certlib.data import Dataset
from certlib.data import load as load_data
from certlib.models.liresnet import build
from certlib.onnx.export import export_onnx
from certlib.onnx.importer import load as load_model
from certlib.proofs import checker as ck
from certlib.proofs.checker import CheckFailed, check
from certlib.verify import verify_file

ROOT = Path(__file__).resolve().parents[1]


def _certify(path, ds, spec="x", method="exact"):
    """Certificate at eps = the median certified radius (about half the samples certify)."""
    r = verify_file(path, ds, 0.0, method).result.radius
    eps = float(np.median(r[r > 0]))
    return build_certificate(path, verify_file(path, ds, eps, method, fold_inputs=False), ds, spec)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    torch.manual_seed(3)
    m = build("digits", width=8, depth=2, dense_dim=16)
    with torch.no_grad():  # larger residual branches, as after training
        for b in m.blocks:
            b.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("cert") / "model.onnx"
    export_onnx(m.eval(), path)
    ds = load_data("digits")
    cert = _certify(path, ds, "digits")
    idx = {o["nodes"][0]: k for k, o in enumerate(cert["operators"])}
    return SimpleNamespace(path=path, blob=path.read_bytes(), cert=cert, ds=ds, idx=idx,
                           graph=load_model(path)[1])


def rejected(fx, cert, item: str, blob=None, x=None, y=None) -> CheckFailed:
    with pytest.raises(CheckFailed) as e:
        check(blob or fx.blob, cert, fx.ds.x if x is None else x, fx.ds.y if y is None else y)
    assert item in e.value.item, str(e.value)
    return e.value


def test_untouched_certificate_is_accepted(fx):
    cert = json.loads(json.dumps(fx.cert, allow_nan=False))  # strict JSON round trip
    res = check(fx.blob, cert, fx.ds.x, fx.ds.y)
    assert res["valid"] and res["samples_checked"] == 360
    assert 0 < res["certified"] == cert["summary"]["certified"] < 360
    assert res["body"] <= cert["composition"]["body"]
    assert check(fx.blob, cert, bounds_only=True)["samples_checked"] == 0  # bounds and K only, when asked
    with pytest.raises(ValueError, match="bounds_only"):
        check(fx.blob, cert)
    kinds = [o["kind"] for o in cert["operators"]]
    assert kinds.count("conv") == 4 and kinds.count("minmax") == 5 and kinds.count("dense") == 1


@pytest.mark.parametrize("name", ["stem.conv", "block0.conv", "neck.conv", "neck.dense"])
def test_claimed_bound_below_truth_is_rejected(fx, name):
    k = fx.idx[name]
    node = next(n for n in fx.graph.nodes if n.name == name)
    truth = float(np.linalg.svd(node.op.to_dense(), compute_uv=False)[0])
    claim = fx.cert["operators"][k]["bound"]
    assert truth <= claim <= truth * (1 + 1e-8)
    for lowered in (truth * (1 - 1e-6), claim * (1 - 1e-6)):
        c = copy.deepcopy(fx.cert)
        c["operators"][k]["bound"] = lowered
        assert "not proven" in rejected(fx, c, f"operator {k} ({name})").why


def test_rule_bound_below_one_is_rejected(fx):
    c = copy.deepcopy(fx.cert)
    c["operators"][fx.idx["block0.minmax.concat"]]["bound"] = 1.0 - 1e-12
    rejected(fx, c, "operator")


def test_swapped_weight_hash_is_rejected(fx):
    c = copy.deepcopy(fx.cert)
    a = c["operators"][fx.idx["block0.conv"]]["initializers"]["block0.conv.weight"]
    b = c["operators"][fx.idx["block1.conv"]]["initializers"]["block1.conv.weight"]
    a["sha256"], b["sha256"] = b["sha256"], a["sha256"]
    assert "sha256" in rejected(fx, c, "block0.conv").why
    c = copy.deepcopy(fx.cert)
    c["head"]["initializers"]["head.weight"]["sha256"] = array_sha256(np.zeros(3))
    rejected(fx, c, "head")


def test_wrong_K_is_rejected(fx):
    c = copy.deepcopy(fx.cert)
    c["head"]["K"][2][5] *= 1 - 1e-6
    rejected(fx, c, "K[2][5]")
    c = copy.deepcopy(fx.cert)
    c["head"]["L_body"] *= 1 - 1e-6  # K recomputed from the head weight and L_body
    rejected(fx, c, "composition")


def test_sample_flipped_to_certified_is_rejected(fx):
    c = copy.deepcopy(fx.cert)
    s = next(s for s in c["samples"] if not s["certified"] and s["pred"] >= 0)
    s["certified"] = True
    c["summary"]["certified"] += 1
    c["summary"]["vra"] = float(np.mean([t["certified"] and t["pred"] == t["label"] for t in c["samples"]]))
    rejected(fx, c, f"sample {s['index']}")
    c = copy.deepcopy(fx.cert)
    c["summary"]["certified"] += 1
    rejected(fx, c, "summary")


def test_recipe_without_residual_identity_is_rejected(fx):
    k = fx.idx["block0.conv"]
    load = {"step": "load", "initializer": "block0.conv.weight"}
    assert fx.cert["operators"][k]["recipe"] == [load]  # the exported kernel already holds I + W
    for coef in (-1.0, 1.0):  # "kernel = W without I", and I added a second time
        c = copy.deepcopy(fx.cert)
        c["operators"][k]["recipe"] = [load, {"step": "identity_centre", "coef": coef}]
        assert "does not rebuild" in rejected(fx, c, f"operator {k}").why
    c = copy.deepcopy(fx.cert)  # the operator without I, with its (smaller) norm as the claim
    node = next(n for n in fx.graph.nodes if n.name == "block0.conv")
    K = node.op.kernel.copy()
    K[np.arange(8), np.arange(8), 1, 1] -= 1.0
    W = type(node.op)(K, node.op.input_shape, padding=node.op.padding)
    c["operators"][k]["bound"] = float(np.linalg.svd(W.to_dense(), compute_uv=False)[0]) * 1.01
    assert c["operators"][k]["bound"] < fx.cert["operators"][k]["bound"]
    rejected(fx, c, f"operator {k}")


def test_operator_removed_is_rejected(fx):
    c = copy.deepcopy(fx.cert)
    del c["operators"][fx.idx["block1.conv"]]
    for k, o in enumerate(c["operators"]):  # renumbered: the gap is found by the node walk
        o["index"] = k
    c["composition"]["order"] = list(range(len(c["operators"])))
    assert "next nodes" in rejected(fx, c, "operator").why


def test_body_bound_lowered_is_rejected(fx):
    c = copy.deepcopy(fx.cert)
    c["composition"]["body"] *= 1 - 1e-9
    c["head"]["L_body"] = c["composition"]["body"]
    rejected(fx, c, "composition")
    c = copy.deepcopy(fx.cert)
    c["composition"]["order"] = c["composition"]["order"][1:]  # a factor left out
    rejected(fx, c, "composition")


def test_claimed_margin_above_truth_is_rejected(fx):
    c = copy.deepcopy(fx.cert)
    s = next(s for s in c["samples"] if s["certified"])
    j = next(j for j, m in enumerate(s["margins"]) if m is not None)
    s["margins"][j] += 1e-6 * abs(s["margins"][j])
    rejected(fx, c, f"sample {s['index']}")


def test_wrong_model_or_data_is_rejected(fx, tmp_path):
    torch.manual_seed(4)
    other = tmp_path / "other.onnx"
    export_onnx(build("digits", width=8, depth=2, dense_dim=16).eval(), other)
    rejected(fx, fx.cert, "model", blob=other.read_bytes())
    y = fx.ds.y.copy()
    y[0] = (y[0] + 1) % 10
    rejected(fx, fx.cert, "data", y=y)
    c = copy.deepcopy(fx.cert)
    c["eps"] *= 2  # the certified claims no longer hold
    rejected(fx, c, "sample")


def test_folded_strided_net_certificate(tmp_path):
    """Sub/Div normalisation, a strided asymmetric-padded conv with Mul and Div folded
    into it, Gemm with alpha, MatMul: certified with exact and power bounds, checked."""
    sys.path.insert(0, str(ROOT / "tests"))
    from onnx_builders import make_model

    rng = np.random.default_rng(0)
    inits = {"mean": np.array([0.5, 0.4]).reshape(1, 2, 1, 1), "std": np.array([0.25, 0.3]).reshape(1, 2, 1, 1),
             "w": rng.normal(size=(4, 2, 3, 3)), "b": rng.normal(size=4), "s": rng.uniform(0.5, 2, (4, 1, 1)),
             "d": rng.uniform(0.5, 2, (1, 4, 1, 1)), "W1": rng.normal(size=(8, 36)) / 6, "c1": rng.normal(size=8),
             "W2": rng.normal(size=(8, 3))}
    mk = helper.make_node
    nodes = [mk("Sub", ["x", "mean"], ["a"], name="norm.sub"), mk("Div", ["a", "std"], ["b0"], name="norm.div"),
             mk("Conv", ["b0", "w", "b"], ["c"], name="conv", pads=[1, 0, 1, 2], strides=[2, 2]),
             mk("Mul", ["c", "s"], ["c2"], name="scale"), mk("Div", ["c2", "d"], ["c3"], name="unscale"),
             mk("Relu", ["c3"], ["e"], name="relu"), mk("Flatten", ["e"], ["f"], name="flatten"),
             mk("Gemm", ["f", "W1", "c1"], ["h"], name="fc1", transB=1, alpha=0.5),
             mk("Relu", ["h"], ["i"], name="relu2"), mk("MatMul", ["i", "W2"], ["y"], name="fc2")]
    path = tmp_path / "net.onnx"
    onnx.save(make_model(nodes, inits, (2, 6, 6), 3), path)
    ds = Dataset(rng.random((40, 2, 6, 6), dtype=np.float32), rng.integers(0, 3, 40), "syn", 3)
    blob = path.read_bytes()
    for method in ("exact", "power"):
        cert = _certify(path, ds, method=method)
        conv = next(o for o in cert["operators"] if o["kind"] == "conv")
        assert conv["nodes"] == ["conv", "scale", "unscale"] and conv["recipe"][-1]["step"] == "fold"
        assert check(blob, cert, ds.x, ds.y)["certified"] > 0
    c = copy.deepcopy(cert)
    next(o for o in c["operators"] if o["kind"] == "conv")["recipe"].pop()  # drop a fold step
    with pytest.raises(CheckFailed, match="fold steps"):
        check(blob, c, ds.x, ds.y)
    c = copy.deepcopy(cert)
    next(o for o in c["operators"] if o["kind"] == "conv")["recipe"][-1]["op"] = "Mul"  # Div read as Mul
    with pytest.raises(CheckFailed, match="does not rebuild"):
        check(blob, c, ds.x, ds.y)
    c = copy.deepcopy(cert)
    next(o for o in c["operators"] if o["nodes"] == ["norm.div"])["bound"] = 3.99  # 1 / min(std) = 4
    with pytest.raises(CheckFailed, match="below the rule"):
        check(blob, c, ds.x, ds.y)


def test_dft_certificate_and_invalid_grid(tmp_path):
    torch.manual_seed(5)
    path = tmp_path / "c.onnx"
    export_onnx(build("cifar10", width=10, depth=1, dense_dim=16).eval(), path)  # 10*16*16 > 2048: DFT
    rng = np.random.default_rng(1)
    ds = Dataset(rng.random((6, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, 6), "syn", 10)
    cert = _certify(path, ds)
    fams = {o["nodes"][0]: o["geometry"].get("proof") for o in cert["operators"]}
    assert fams["stem.conv"] == {"family": "dft", "grid": [18, 18]}  # 5x5 s2 p2 on 32: ceil(36/2)
    assert fams["block0.conv"]["family"] == "dft"
    blob = path.read_bytes()
    assert check(blob, cert, ds.x, ds.y)["valid"]
    for name, bad in (("stem.conv", [17, 18]), ("block0.conv", [16, 16])):  # below n + p: not a relaxation
        c = copy.deepcopy(cert)
        next(o for o in c["operators"] if o["nodes"] == [name])["geometry"]["proof"]["grid"] = bad
        with pytest.raises(CheckFailed, match=name):
            check(blob, c, ds.x, ds.y)


def _extended_forward(g, x):
    """The IR's function in 80-bit extended precision (64-bit significand): an oracle."""
    h = np.asarray(x, dtype=np.longdouble).reshape(len(x), -1)
    for n in g.nodes:
        kind = type(n).__name__
        if kind == "LinearNode":
            M = n.op.to_dense().astype(np.longdouble)
            h = h @ M.T
            if n.bias is not None:
                b = np.asarray(n.bias, np.longdouble)
                h = h + (np.repeat(b, h.shape[1] // b.size) if b.size < h.shape[1] else b)
        elif kind == "AffineNode":
            s = np.broadcast_to(n.scale, n.in_shape).reshape(-1).astype(np.longdouble)
            t = np.broadcast_to(n.shift, n.in_shape).reshape(-1).astype(np.longdouble)
            h = h * s + t
        elif kind == "ActivationNode":
            if n.activation == "relu":
                h = np.maximum(h, 0)
            else:
                a, b = np.split(h, 2, axis=1)
                h = np.concatenate([np.maximum(a, b), np.minimum(a, b)], axis=1)
    return h


@pytest.mark.skipif(np.finfo(np.longdouble).eps > 1e-18, reason="needs 80-bit long double")
def test_forward_error_bounds_cover_extended_precision(fx):
    from certlib.ir.compose import analyze

    x = fx.ds.x[:64]
    ref = _extended_forward(fx.graph, x)
    a = analyze(fx.graph)
    f, err = fx.graph.forward(x, a.node_bounds)  # certlib's bound (proofs/margin_slack.md)
    stages, consts = ck.walk(onnx.load(fx.path), (1, 8, 8))
    for s in stages:
        if s["kind"] in ("conv", "dense"):
            s["W"] = ck.build(s["recipe"], consts, s["name"])
    items = [([s], o["bound"]) for s, o in zip(stages, fx.cert["operators"])]
    items.append(([stages[-1]], ck.up(ck.norm_up(stages[-1]["W"]))))
    fc, ec = ck.forward(items, x)  # the checker's own bound
    for logits, e in ((f, err), (fc, ec)):
        diff = np.sqrt(np.sum((logits.astype(np.longdouble) - ref) ** 2, axis=1)).astype(np.float64)
        assert np.all(diff <= e)
        assert np.all(e <= 1e-9 * (1 + np.abs(logits).max()))  # and not vacuous


@st.composite
def _matrices(draw):
    m, n = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
    M = rng.standard_normal((m, n)) * draw(st.sampled_from([1.0, 1e-3, 1e5]))
    if draw(st.booleans()):
        M = M + 1j * rng.standard_normal((m, n)) * draw(st.sampled_from([1.0, 1e-3]))
    if draw(st.booleans()) and min(m, n) > 1:  # repeated top singular values
        U, _, Vt = np.linalg.svd(M, full_matrices=False)
        M = (U * np.r_[2.0, 2.0, np.ones(min(m, n) - 2)][:min(m, n)]) @ Vt
    return M


@settings(max_examples=150, deadline=None)
@given(_matrices())
def test_checker_norm_proofs_never_below_truth(M):
    sigma = float(np.linalg.svd(M, compute_uv=False)[0])
    assert not ck.gram_ok(M, sigma * (1 - 1e-9))  # sound: nothing below the truth
    assert ck.gram_ok(M, sigma * (1 + 1e-6))      # and complete with a little room


def test_checker_is_independent_of_certlib(fx, tmp_path):
    mods = set()
    for f in sorted((ROOT / "proofs").glob("checker*.py")):  # checker.py and its split-out parts
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mods.add((node.module or "").split(".")[0])
    assert mods <= {"__future__", "concurrent", "contextlib", "hashlib", "math", "os", "sys", "json", "numpy",
                    "onnx", "onnxruntime", "threadpoolctl", "", "checker_norms", "checker_semantics"}, mods
    cert, bad = tmp_path / "cert.json", tmp_path / "bad.json"
    cert.write_text(json.dumps(fx.cert))
    c = copy.deepcopy(fx.cert)
    c["head"]["K"][0][1] *= 0.5
    bad.write_text(json.dumps(c))
    data = tmp_path / "data.npz"
    np.savez(data, x=fx.ds.x, y=fx.ds.y)
    run = ("import runpy, sys; sys.modules['certlib'] = None; sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")
    checker = str(ROOT / "proofs" / "checker.py")
    r = subprocess.run([sys.executable, "-c", run, checker, str(fx.path), str(cert), str(data)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["certified"] == fx.cert["summary"]["certified"]
    r = subprocess.run([sys.executable, "-c", run, checker, str(fx.path), str(bad), str(data)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 4 and "K[0][1]" in r.stderr


def test_cli_verify_proof_then_check(fx, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "certlib.cli", *args], capture_output=True, text=True,
                              timeout=300)

    cert = tmp_path / "cert.json"
    r = cli("verify", str(fx.path), "--data", "digits", "--eps", repr(fx.cert["eps"]), "--limit", "100",
            "--proof", str(cert))
    assert r.returncode == 0, r.stderr
    c = json.loads(cert.read_text())
    assert c["data"] == {**c["data"], "spec": "digits", "n": 100} and len(c["samples"]) == 100
    r = cli("check", str(fx.path), str(cert))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["samples_checked"] == 100
    c["operators"][fx.idx["neck.dense"]]["bound"] *= 0.99
    cert.write_text(json.dumps(c))
    r = cli("check", str(fx.path), str(cert), "--data", "digits")
    assert r.returncode == 4 and "neck.dense" in r.stderr and "Traceback" not in r.stderr


def test_writer_refuses_estimates(fx):
    from certlib.errors import UsageError

    rep = verify_file(fx.path, fx.ds.take(8), 0.1, estimate_only=True)
    with pytest.raises(UsageError, match="sound"):
        build_certificate(fx.path, rep, fx.ds.take(8), "digits")
