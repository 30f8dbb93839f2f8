"""The checker re-derives every claim a certificate carries (proofs/certificate.md, "Claims").

- The input shape comes from the data and the model's declared input, never from the
  certificate alone (a 3x3 proof with 4x4 data swapped in is rejected: issue 10, hole 5).
- Every field of the schema, tampered one at a time, is rejected, unless the change only
  weakens a monotone claim (a lower radius / margin / eps, a larger K) or the field is in the
  documented list of non-claims (NON_CLAIMS) or proof hints (HINTS).
- The writer's K follows the checker's rule bit for bit (a valid certificate is accepted,
  head width D = 1 included), and that rule is above the exact L ||w_i - w_j|| (Fraction oracle).
- Without data `certlib check` exits 2; `--bounds-only` must be asked for and says so."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from certlib.certificate import _stated, build_certificate
from certlib.certify import certify
from certlib.data import Dataset
from certlib.ir.compose import analyze, pair_constants
from certlib.onnx.importer import load as load_model
from certlib.proofs import checker as ck
from certlib.proofs.checker import CheckFailed, check
from certlib.verify import verify_file

ROOT = Path(__file__).resolve().parents[1]

#: fields that are not claims: check() never reads them (tampering is accepted)
NON_CLAIMS = {("certlib_version",), ("model", "path"), ("data", "spec"), ("data", "name"),
              ("operators", "*", "method"), ("operators", "*", "label"), ("head", "label")}
#: proof hints: which block family to prove a bound on; another hint proves the same claim or fails
HINTS = {("operators", "*", "geometry", "proof"), ("head", "geometry", "proof")}
#: monotone claims: a change in this direction is a weaker claim, true whenever the original is
LOWER_IS_WEAKER = {("eps",), ("samples", "*", "radius"), ("samples", "*", "margins", "*")}
HIGHER_IS_WEAKER = {("head", "K", "*", "*")}


def _model(nodes, inits, in_dims, out_dim):
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_dims)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])
    g = helper.make_graph(nodes, "g", [inp], [out],
                          [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _certificate(path, ds, input_shape=None):
    r = verify_file(path, ds, 0.0, "exact", input_shape=input_shape).result.radius
    eps = float(np.median(r[r > 0]))
    rep = verify_file(path, ds, eps, "exact", input_shape=input_shape, fold_inputs=False)
    return build_certificate(path, rep, ds, "x", input_shape)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Normalisation, a padded conv with a folded Mul, ReLU, Gemm (alpha), MatMul head: 6 samples, 3 classes."""
    rng = np.random.default_rng(7)
    inits = {"mean": np.full((1, 2, 1, 1), 0.5), "std": np.array([0.25, 0.5]).reshape(1, 2, 1, 1),
             "w": rng.normal(size=(4, 2, 3, 3)), "b": rng.normal(size=4), "s": rng.uniform(0.5, 2, (4, 1, 1)),
             "W1": rng.normal(size=(8, 64)) / 8, "c1": rng.normal(size=8), "W2": rng.normal(size=(8, 3))}
    mk = helper.make_node
    nodes = [mk("Sub", ["x", "mean"], ["a"], name="sub"), mk("Div", ["a", "std"], ["b0"], name="div"),
             mk("Conv", ["b0", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             mk("Mul", ["c", "s"], ["c2"], name="scale"), mk("Relu", ["c2"], ["e"], name="relu"),
             mk("Flatten", ["e"], ["f"], name="flatten"),
             mk("Gemm", ["f", "W1", "c1"], ["h"], name="fc1", transB=1, alpha=0.5),
             mk("Relu", ["h"], ["i"], name="relu2"), mk("MatMul", ["i", "W2"], ["y"], name="head")]
    path = tmp_path_factory.mktemp("small") / "small.onnx"
    onnx.save(_model(nodes, inits, ["N", 2, 4, 4], 3), path)
    ds = Dataset(rng.random((6, 2, 4, 4), dtype=np.float32), rng.integers(0, 3, 6), "syn", 3)
    ds.y[:] = verify_file(path, ds, 0.0, "exact").result.pred  # every sample correct: VRA = certified / n
    cert = json.loads(json.dumps(_certificate(path, ds), allow_nan=False))
    return SimpleNamespace(path=path, blob=path.read_bytes(), cert=cert, ds=ds)


def _ok(blob, cert, ds) -> bool:
    try:
        check(blob, cert, ds.x, ds.y)
        return True
    except CheckFailed:
        return False


def _match(path, patterns) -> bool:
    gen = tuple("*" if isinstance(p, int) else p for p in path)
    return any(gen[:len(p)] == p for p in patterns)


def _nodes(obj, path=()):
    yield path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _nodes(v, path + (k,))


def _set(cert, path, value):
    c = copy.deepcopy(cert)
    o = c
    for k in path[:-1]:
        o = o[k]
    if value is _set:
        del o[path[-1]]
    else:
        o[path[-1]] = value
    return c


def _variants(v):
    """(value, weaker-or-stronger) pairs: +1 means larger, -1 smaller, 0 not comparable; _set = deleted."""
    if isinstance(v, bool):
        return [(not v, 0)]
    if isinstance(v, int):
        return [(v + 1, 1), (v - 1, -1)]
    if isinstance(v, float):
        out = [(v + abs(v) + 1, 1), (v - abs(v) - 1, -1)]
        return out + ([(v / 2, -1 if v > 0 else 1)] if v else [])
    if isinstance(v, str):
        return [(v + "x", 0)]
    if v is None:
        return [(0.0, 0)]
    if isinstance(v, list):
        return [(v[:-1], 0), (v + v[-1:], 0)] if v else [([0], 0)]
    return []


def test_untouched_small_certificate_is_accepted(small):
    res = check(small.blob, small.cert, small.ds.x, small.ds.y)
    assert res["samples_checked"] == 6 and 0 < res["certified"] < 6
    s = small.cert["samples"]
    assert all(t["radius"] > 0 for t in s) and sum(t["radius"] > small.cert["eps"] for t in s) >= 1


def test_every_field_tampered_is_rejected_or_not_a_claim(small):
    """Walk the certificate's JSON; tamper each node (every leaf, list length, dict key) one at a time."""
    cert, seen, accepted = small.cert, set(), []
    for path, v in list(_nodes(cert)):
        if not path:
            continue
        seen.add(tuple("*" if isinstance(p, int) else p for p in path))
        tampers = _variants(v) + ([(_set, 0)] if isinstance(path[-1], str) else [])
        for new, direction in tampers:
            ok = _ok(small.blob, _set(cert, path, new), small.ds)
            if _match(path, NON_CLAIMS):
                assert ok, f"non-claim {path} -> {new!r} was rejected"
            elif _match(path, HINTS):
                continue  # either outcome: a hint only says where to look for the proof
            elif ok:
                weaker = (direction < 0 and _match(path, LOWER_IS_WEAKER)
                          or direction > 0 and _match(path, HIGHER_IS_WEAKER)) and new is not _set
                assert weaker, f"tampered {path}: {v!r} -> {new!r} was accepted"
                accepted.append(path)
    # the walk covered the whole schema (every field the writer emits)
    for p in [("format",), ("claim",), ("model", "input_shape", "*"), ("data", "sha256"), ("data", "n"),
              ("operators", "*", "initializers", "w", "dtype"), ("operators", "*", "recipe", "*", "node"),
              ("composition", "body"), ("head", "K", "*", "*"), ("head", "L_body"), ("samples", "*", "radius"),
              ("samples", "*", "pred"), ("summary", "clean_accuracy"), ("summary", "vra"), ("margin_rule",)]:
        assert p in seen, p
    assert any(p[0] == "samples" and p[-1] == "radius" for p in accepted)  # a lower radius stays valid


def test_radius_above_the_derived_one_is_rejected(small):
    s = small.cert["samples"]
    i = next(k for k, t in enumerate(s) if not t["certified"])
    c = _set(small.cert, ("samples", i, "radius"), 1e9)  # the forgery
    with pytest.raises(CheckFailed, match=f"sample {i}.*radius"):
        check(small.blob, c, small.ds.x, small.ds.y)
    j = next(k for k, t in enumerate(s) if t["certified"])
    r = s[j]["radius"]
    c = _set(small.cert, ("samples", j, "radius"), r * (1 + 1e-6))  # just above (the cushion is ~1e-10)
    assert not _ok(small.blob, c, small.ds)
    c = _set(small.cert, ("summary", "clean_accuracy"), math.nextafter(1.0, 0.0))
    with pytest.raises(CheckFailed, match="summary"):
        check(small.blob, c, small.ds.x, small.ds.y)


def test_stated_radius_is_certlibs_lowered_by_the_cushion(small):
    """The writer states radii at most certlib's own, lowered by 1024 slacks (certlib.certificate.CUSHION)."""
    _, g = load_model(small.path)
    a = analyze(g, "exact", fold_inputs=False)
    logits, err = g.forward(small.ds.x, a.node_bounds)
    r = certify(logits, err, small.ds.y, a.K, a.body, small.cert["eps"])
    certified, radius, _ = _stated(r, a.K)
    assert radius == [t["radius"] for t in small.cert["samples"]]
    assert certified == [t["certified"] for t in small.cert["samples"]] == list(r.certified)
    assert all(0 <= x <= y and y - x <= 1e-6 * y for x, y in zip(radius, r.radius))


# ------------------------------------------------------------------ hole 5: the input shape
def _stride_net(tmp_path):
    """Conv 3x3, stride 2, pad 1 (2x2 output on both 3x3 and 4x4 inputs), ReLU, Flatten, Gemm head."""
    inits = {"w": np.ones((1, 1, 3, 3)), "W": np.array([[1.0, -1.0, 0.5, 0.0], [-0.5, 1.0, 0.0, 1.0]]),
             "c": np.array([0.1, -0.1])}
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "w"], ["c0"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
             mk("Relu", ["c0"], ["r"], name="relu"), mk("Flatten", ["r"], ["f"], name="flat"),
             mk("Gemm", ["f", "W", "c"], ["y"], name="head", transB=1)]
    path = tmp_path / "stride.onnx"
    onnx.save(_model(nodes, inits, ["N", 1, "H", "W"], 2), path)
    return path


def test_swapped_input_shape_is_rejected(tmp_path):
    """A certificate proven for 3x3 inputs, with 4x4 data swapped in and every sample claim recomputed
    by the forger with the 3x3 constants, is rejected (exit 4); so is the same claim at 4x4."""
    path = _stride_net(tmp_path)
    rng = np.random.default_rng(0)
    ds3 = Dataset(rng.random((40, 1, 3, 3), dtype=np.float32), rng.integers(0, 2, 40), "s3", 2)
    ds4 = Dataset(rng.random((40, 1, 4, 4), dtype=np.float32), rng.integers(0, 2, 40), "s4", 2)
    cert = _certificate(path, ds3, (1, 3, 3))
    blob = path.read_bytes()
    assert check(blob, cert, ds3.x, ds3.y)["valid"]
    _, g3 = load_model(path, (1, 3, 3))
    _, g4 = load_model(path, (1, 4, 4))
    a3, a4 = analyze(g3, "exact", fold_inputs=False), analyze(g4, "exact", fold_inputs=False)
    assert a4.body.value > a3.body.value * 1.1  # the conv's norm depends on the input size
    logits, err = g4.forward(ds4.x, a3.node_bounds)
    r = certify(logits, err, ds4.y, a3.K, a3.body, cert["eps"])
    certified, radius, margins = _stated(r, a3.K)
    forged = copy.deepcopy(cert)
    forged["data"].update(sha256=ds4.sha256(), n=40)
    forged["samples"] = [{"index": i, "label": int(ds4.y[i]), "pred": int(r.pred[i]),
                          "certified": certified[i], "radius": radius[i], "margins": margins[i]}
                         for i in range(40)]
    forged["summary"] = {"n": 40, "certified": sum(certified), "clean_accuracy": r.clean_accuracy,
                         "vra": sum(c and k for c, k in zip(certified, r.correct)) / 40}
    assert sum(certified) > 0
    with pytest.raises(CheckFailed, match="input_shape") as e:
        check(blob, forged, ds4.x, ds4.y)
    assert e.value.item == "model"
    honest = copy.deepcopy(forged)  # the shape stated as 4x4 everywhere: the 3x3 bound is not proven
    honest["model"]["input_shape"] = honest["operators"][0]["geometry"]["input_shape"] = [1, 4, 4]
    with pytest.raises(CheckFailed, match="not proven"):
        check(blob, honest, ds4.x, ds4.y)
    # through the CLI: exit 4, and no data at all: exit 2
    fc, npz = tmp_path / "forged.json", tmp_path / "d4.npz"
    fc.write_text(json.dumps(forged))
    np.savez(npz, x=ds4.x, y=ds4.y)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "certlib.cli", "check", str(path), str(fc), *args],
                              capture_output=True, text=True, timeout=300)
    res = cli("--data", f"npz:{npz}")
    assert res.returncode == 4 and "input_shape" in res.stderr, res.stderr
    forged["data"]["spec"] = ""
    fc.write_text(json.dumps(forged))
    res = cli()
    assert res.returncode == 2 and "no data" in res.stderr and "--bounds-only" in res.stderr, res.stderr
    fc.write_text(json.dumps(cert))
    res = cli("--bounds-only")
    assert res.returncode == 0 and "bounds only" in res.stderr and "no sample" in res.stderr, res.stderr
    assert json.loads(res.stdout)["bounds_only"] is True


def test_declared_input_shape_is_enforced(small):
    c = copy.deepcopy(small.cert)
    m = onnx.load_from_string(small.blob)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 5  # declared 2 x 5 x 4
    blob = m.SerializeToString()
    c["model"]["sha256"] = __import__("hashlib").sha256(blob).hexdigest()
    with pytest.raises(CheckFailed, match="declared input"):
        check(blob, c, small.ds.x, small.ds.y)
    with pytest.raises(CheckFailed, match="declared input"):
        check(blob, c, bounds_only=True)


# ------------------------------------------------------------------ K: one rule for writer and checker
def _checker_K(W, body):
    C, D = W.shape
    K = np.zeros((C, C))
    for i in range(C):
        s = np.array([math.fsum(v) for v in (W - W[i]) ** 2])
        K[i] = ck.vup(body * ck.vup(np.sqrt(ck.vup(ck.vup(s + D * ck.ETA) * ck.up(1 + 8 * ck.U)))))
    np.fill_diagonal(K, 0.0)
    return K


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 5), st.integers(1, 4), st.integers(-40, 40), st.integers(0, 2 ** 31),
       st.sampled_from([1.0, 0.7, 3.25, 2.0 ** -20]))
def test_writer_K_is_the_checkers_rule_and_above_the_exact_value(C, D, scale, seed, L):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(C, D)) * 2.0 ** scale
    if seed % 3 == 0:
        W[1] = W[0]                                   # equal rows
    if seed % 5 == 0:
        W = np.round(W * 4) / 4                       # exact differences, squares on the grid
    K = pair_constants(W, L)
    assert np.array_equal(K, _checker_K(W, L))        # bit for bit: a valid certificate is accepted
    for i in range(C):
        for j in range(C):
            exact2 = sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(W[i], W[j])) * Fraction(L) ** 2
            assert Fraction(K[i, j]) ** 2 >= exact2   # K_ij >= L ||w_i - w_j|| in exact arithmetic


def test_head_of_width_one_is_accepted(tmp_path):
    """D = 1: the head reads one feature (the writer's K used to be one ulp below the checker's)."""
    inits = {"W1": np.array([[0.75], [-1.5], [0.3]]), "W2": np.array([[1.0, -2.0, 0.5]]),
             "c": np.array([0.0, 0.3, 0.1])}
    mk = helper.make_node
    nodes = [mk("Flatten", ["x"], ["f"], name="flat"), mk("MatMul", ["f", "W1"], ["h"], name="fc"),
             mk("Relu", ["h"], ["r"], name="relu"), mk("Gemm", ["r", "W2", "c"], ["y"], name="head")]
    path = tmp_path / "d1.onnx"
    onnx.save(_model(nodes, inits, ["N", 1, 1, 3], 3), path)
    rng = np.random.default_rng(2)
    ds = Dataset(rng.random((30, 1, 1, 3), dtype=np.float32), rng.integers(0, 3, 30), "d1", 3)
    r = verify_file(path, ds, 0.0, "exact").result.radius
    rep = verify_file(path, ds, float(np.median(r[r > 0])), "exact", fold_inputs=False)
    cert = build_certificate(path, rep, ds, "x")
    assert np.array(cert["head"]["K"]).shape == (3, 3) and cert["head"]["geometry"]["weight_shape"] == [3, 1]
    assert check(path.read_bytes(), cert, ds.x, ds.y)["certified"] > 0


def test_supported_ops_are_one_list_shared_with_the_docs():
    """The checker's operator list is the one the writer refuses by and the one
    proofs/certificate.md states (step 1, "Model")."""
    import re

    text = (ROOT / "proofs" / "certificate.md").read_text()
    step = text[text.index("1. **Model.**"):text.index("2. **Operators.**")]
    documented = set(re.findall(r"`([A-Z][A-Za-z]+)`", step)) | set(re.findall(r"`(\w+)/(\w+)/(\w+)/(\w+)`", step)[0])
    assert documented == set(ck.SUPPORTED_OPS) - {"Constant"}


@pytest.mark.parametrize("op", ["Identity", "Dropout"])
def test_writer_refuses_an_operator_the_checker_does_not_read(tmp_path, op):
    """Identity/Dropout vanish in certlib's import, but the checker's walk fails on
    them: the writer refuses before writing a certificate nobody can check."""
    from certlib.errors import UsageError

    rng = np.random.default_rng(1)
    mk = helper.make_node
    nodes = [mk("Flatten", ["x"], ["f"], name="flatten"), mk(op, ["f"], ["g"], name="id"),
             mk("Gemm", ["g", "W"], ["y"], name="head", transB=1)]
    path = tmp_path / "m.onnx"
    onnx.save(_model(nodes, {"W": rng.normal(size=(3, 8))}, ["N", 2, 2, 2], 3), path)
    ds = Dataset(rng.random((4, 2, 2, 2), dtype=np.float32), rng.integers(0, 3, 4), "syn", 3)
    rep = verify_file(path, ds, 0.01, "exact", fold_inputs=False)
    with pytest.raises(UsageError, match=op):
        build_certificate(path, rep, ds, "x")
    with pytest.raises(CheckFailed, match="supported subset"):
        ck.walk(onnx.load(path), (2, 2, 2))
