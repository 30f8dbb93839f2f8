"""Certificates for the executed precision (proofs/float_semantics.md).

The oracle for the execution-error bound: small dense networks with nasty
constants executed by an explicit simulation of the format (numpy float16 /
float32, bfloat16 by torch rounding) in several summation orders, against the
exact-arithmetic logits (Fractions) at points of the ball; the executed
logits must lie within e_ball of the exact ones at every point."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from certlib.data import Dataset
from certlib.errors import UnsupportedModelError, UsageError
from certlib.ir import semantics as S
from certlib.ir.compose import analyze
from certlib.ir.execute import execute
from certlib.ir.graph import ActivationNode, Graph, LinearNode, ReshapeNode
from certlib.onnx.importer import load
from certlib.verifiers.operators import Dense
from certlib.verify import verify_file, verify_graph
from tests.sem_models import cancel_data, cancel_onnx


def _round(v, fmt: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if fmt == "float16":
        return a.astype(np.float16).astype(np.float64)
    if fmt == "float32":
        return a.astype(np.float32).astype(np.float64)
    return torch.as_tensor(a).to(torch.float32).to(torch.bfloat16).double().numpy()


def _acc(terms: list, fmt: str, order: str, rng) -> float:
    """Sum in format ``fmt`` (each partial sum rounded) in the given order."""
    t = list(terms)
    if order == "reverse":
        t = t[::-1]
    elif order == "random":
        rng.shuffle(t)
    if order == "pairwise":
        while len(t) > 1:
            t = [float(_round(t[i] + t[i + 1], fmt)) if i + 1 < len(t) else t[i] for i in range(0, len(t), 2)]
        return t[0]
    s = 0.0
    for v in t:
        s = float(_round(s + v, fmt))
    return s


def _simulate(layers, x, sem: S.Semantics, order: str, rng) -> np.ndarray:
    """The dense chain executed: constants and activations stored in the format, products and sums in the
    accumulation format in ``order``, output rounded to storage; ReLU between layers."""
    acc = "float32" if sem.split else sem.name
    h = _round(x, sem.name)
    for k, (W, b) in enumerate(layers):
        Wp, bp = _round(W, sem.name), _round(b, sem.name)
        out = []
        for i in range(len(Wp)):
            prods = [float(_round(Wp[i, j] * h[j], acc)) for j in range(len(h))] + [float(bp[i])]
            out.append(_acc(prods, acc, order, rng))
        h = _round(np.array(out), sem.name)
        if k < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def _exact(layers, x) -> list:
    h = [Fraction(float(v)) for v in x]
    for k, (W, b) in enumerate(layers):
        h = [sum((Fraction(float(W[i, j])) * h[j] for j in range(len(h))), Fraction(float(b[i])))
             for i in range(len(W))]
        if k < len(layers) - 1:
            h = [max(v, Fraction(0)) for v in h]
    return h


def _graph(layers) -> Graph:
    nodes, d = [], layers[0][0].shape[1]
    for k, (W, b) in enumerate(layers):
        nodes.append(LinearNode(f"l{k}", "Gemm", (W.shape[1],), (W.shape[0],), op=Dense(W), bias=b))
        if k < len(layers) - 1:
            nodes.append(ActivationNode(f"r{k}", "Relu", (W.shape[0],), (W.shape[0],), activation="relu"))
    return Graph("x", (d,), "y", nodes, num_classes=layers[-1][0].shape[0])


def _nasty(case: int):
    rng = np.random.default_rng(case)
    dims = [5, 7, 6, 3]
    layers = []
    for k in range(3):
        W = rng.normal(size=(dims[k + 1], dims[k]))
        b = rng.normal(size=dims[k + 1])
        if case % 3 == 1:     # cancelling large constants: a big bias, removed by the next layer's bias
            b = b * 2.0 ** 9
        if case % 3 == 2:     # tiny weights (subnormal in float16) next to large ones
            W[:, ::2] *= 2.0 ** -20
            W[:, 1::2] *= 2.0
        layers.append((_round(W, "float32"), _round(b, "float32")))
    return layers, rng


@pytest.mark.parametrize("fmt,acc", [("float16", "float32"), ("float16", "storage"), ("bfloat16", "float32"),
                                     ("float32", "float32")])
@pytest.mark.parametrize("case", range(3))
def test_execution_error_within_ball_bound(fmt, acc, case):
    layers, rng = _nasty(case)
    g = _graph(layers)
    a = analyze(g, "exact")
    sem = S.get(fmt, acc)
    rules = S.prepare(g, sem)
    x = rng.normal(size=(1, 5)) * 4
    eps = 0.5
    _, e64, eb, norms = S.ball_forward(g, rules, sem, x, a.node_bounds, eps)
    assert np.isfinite(eb[0]) and norms.shape == (1, len(g.nodes))
    worst = 0.0
    for t in range(6):
        d = rng.normal(size=5)
        xp = x[0] + d / np.linalg.norm(d) * eps * (1.0 if t % 2 else rng.uniform())
        ex = _exact(layers, xp)
        for order in ("forward", "reverse", "pairwise", "random"):
            f = _simulate(layers, xp, sem, order, rng)
            dist2 = sum((Fraction(float(v)) - e) ** 2 for v, e in zip(f, ex))
            assert dist2 <= Fraction(float(eb[0])) ** 2, (order, float(dist2) ** 0.5, eb[0])
            worst = max(worst, float(dist2) ** 0.5)
    assert worst > 0 or fmt == "float32"    # the simulation does round: the test can fail


def test_rule_is_tight_enough_to_matter():
    """The float16 bound is not vacuous on a plain model: a few units of u16 times the norms."""
    layers, rng = _nasty(0)
    g = _graph(layers)
    a = analyze(g, "exact")
    x = rng.normal(size=(1, 5))
    out = {f: S.ball_forward(g, S.prepare(g, S.get(f)), S.get(f), x, a.node_bounds, 0.1)[2][0]
           for f in ("float32", "bfloat16", "float16")}
    assert out["float32"] < out["float16"] < out["bfloat16"]
    assert out["float16"] < 1.0


@pytest.fixture(scope="module")
def cancel(tmp_path_factory):
    p = tmp_path_factory.mktemp("sem") / "cancel.onnx"
    cancel_onnx(p)
    x, y = cancel_data()
    np.savez(p.with_suffix(".npz"), x=x, y=y)
    return p, load(p)[1], Dataset(x, y, "cancel", 2)


def test_hand_built_model_flips_in_float16(cancel):
    """Exact semantics certifies; float16 (and bfloat16) semantics refuses; the model run in float16 at a
    point of the ball (x itself) predicts the other class: the exact certificate is false for it."""
    _, g, ds = cancel
    exact = verify_graph(g, ds, 0.1)
    assert exact.result.certified.all() and (exact.result.pred == 1).all()
    for fmt in ("float16", "bfloat16"):
        r = verify_graph(g, ds, 0.1, semantics=fmt)
        assert not r.result.certified.any()
        f = execute(g, ds.x, fmt)
        assert (np.argmax(f, axis=1) == 0).all()          # the flip, at x (inside every ball)
    r32 = verify_graph(g, ds, 0.1, semantics="float32")    # float32 rounds 1024 + x finely: certified
    assert r32.result.certified.all() and (r32.result.radius <= 0.1).all()
    assert (np.argmax(execute(g, ds.x, "float32"), axis=1) == 1).all()


def test_float32_flip_when_constants_cancel_at_2_24():
    """The same model with 2^24 in place of 1024, built as IR (onnxruntime runs ONNX in float32, so the
    importer's self-test already refuses the ONNX file): exact certifies, float32 refuses and flips."""
    big = 2.0 ** 24
    layers = [(np.eye(1), np.array([big])), (np.eye(1), np.array([-big])),
              (np.array([[-1.0], [1.0]]), np.array([0.1, 0.0]))]
    g = _graph(layers)
    g.nodes = [n for n in g.nodes if not isinstance(n, ActivationNode)]     # no ReLU: x - big < 0
    x, y = cancel_data()
    ds = Dataset(x.reshape(-1, 1), y, "c24", 2)
    assert verify_graph(g, ds, 0.1).result.certified.all()
    assert not verify_graph(g, ds, 0.1, semantics="float32").result.certified.any()
    assert (np.argmax(execute(g, ds.x, "float32"), axis=1) == 0).all()
    # float16 cannot even store 2^24: refused as a model, not evaluated under exact semantics
    with pytest.raises(UnsupportedModelError, match="does not fit float16"):
        verify_graph(g, ds, 0.1, semantics="float16")


def test_overflow_is_never_certified():
    W = np.eye(4) * 200.0
    layers = [(W, np.zeros(4)), (W, np.zeros(4)), (np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), np.array([0.0, 0.0]))]
    g = _graph(layers)
    a = analyze(g, "exact")
    x = np.array([[1.0, 0.0, 0.0, 0.0]])        # 200 * 200 = 40000 fits; 2 * 40000 would not
    sem = S.get("float16")
    eb = S.ball_forward(g, S.prepare(g, sem), sem, x * 2, a.node_bounds, 0.01)[2]
    assert np.isinf(eb).all()
    assert np.isinf(execute(g, x * 2, "float16")).any()


def test_unsupported_nodes_refused_not_exact():
    g = _graph([(np.eye(3), np.zeros(3)), (np.ones((2, 3)), np.zeros(2))])
    g.nodes[1] = ActivationNode("t", "Tanh", (3,), (3,), activation="tanh")
    ds = Dataset(np.zeros((2, 3), np.float32), np.zeros(2, np.int64), "z", 2)
    with pytest.raises(UnsupportedModelError, match="tanh"):
        verify_graph(g, ds, 0.1, semantics="float16")
    with pytest.raises(UsageError):
        S.get("float8")


def test_exact_semantics_unchanged(cancel):
    _, g, ds = cancel
    a, b = verify_graph(g, ds, 0.1), verify_graph(g, ds, 0.1, semantics="exact")
    assert np.array_equal(a.result.margins, b.result.margins) and np.array_equal(a.result.radius, b.result.radius)
    assert a.as_json()["claim"] == b.as_json()["claim"] and a.as_json()["semantics"] == "exact"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "certlib.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_semantics(cancel, tmp_path):
    p, _, _ = cancel
    data = f"npz:{p.with_suffix('.npz')}"
    r = _cli("verify", p, "--data", data, "--eps", "0.1", "--semantics", "float16", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "EXECUTED IN FLOAT16" in r.stderr.replace("\n", " ")
    js = json.loads((tmp_path / "r.json").read_text())
    assert js["semantics"] == "float16" and js["vra"] == 0.0 and "executed in float16" in js["claim"]
    bad = _cli("verify", p, "--data", data, "--eps", "0.1", "--semantics", "float8")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    r = _cli("attack", p, "--data", data, "--eps", "0.1", "--semantics", "float32", "--steps", "5",
             "--restarts", "1", "--json", tmp_path / "a.json")
    assert r.returncode == 0, r.stderr
    js = json.loads((tmp_path / "a.json").read_text())
    assert js["violations"] == [] and js["certified"] == 4 and js["executed_in"] == "the model executed in float32"


def test_certificate_float32_rechecked_and_tamper_rejected(cancel, tmp_path):
    """`certlib check` re-derives the float32 execution-error bound from the recorded stage norms; a
    lowered norm, a changed semantics or a radius beyond eps is rejected."""
    from certlib.certificate import write_certificate
    from certlib.proofs.checker import CheckFailed, check

    p, g, ds = cancel
    rep = verify_file(p, ds, 0.1, semantics="float32", fold_inputs=False)
    cert = write_certificate(tmp_path / "c.json", p, rep, ds, "arrays")
    assert cert["semantics"]["name"] == "float32" and "executed in float32" in cert["claim"]
    assert cert["summary"]["certified"] == 4 and all(s["radius"] <= 0.1 for s in cert["samples"])
    blob = p.read_bytes()
    assert check(blob, cert, ds.x, ds.y)["certified"] == 4
    bad = json.loads(json.dumps(cert))
    bad["samples"][0]["stage_norms"][1] *= 0.5
    with pytest.raises(CheckFailed, match="stage_norms"):
        check(blob, bad, ds.x, ds.y)
    bad = json.loads(json.dumps(cert))
    bad["semantics"]["name"] = "float16"            # the claim text no longer matches
    with pytest.raises(CheckFailed):
        check(blob, bad, ds.x, ds.y)
    bad = json.loads(json.dumps(cert))
    bad["samples"][0]["radius"] = 0.2
    with pytest.raises(CheckFailed, match="radius"):
        check(blob, bad, ds.x, ds.y)
    # the float16 certificate of the same model certifies nothing, and the checker agrees
    r16 = verify_file(p, ds, 0.1, semantics="float16", fold_inputs=False)
    c16 = write_certificate(tmp_path / "c16.json", p, r16, ds, "arrays")
    assert c16["summary"]["certified"] == 0 and check(blob, c16, ds.x, ds.y)["certified"] == 0
    forged = json.loads(json.dumps(c16))
    forged["samples"][0]["certified"] = True
    with pytest.raises(CheckFailed, match="certified"):
        check(blob, forged, ds.x, ds.y)


@pytest.mark.parametrize("fmt", ["float32", "float16"])
def test_digits_attack_finds_no_violation(fmt):
    """A digits-sized LiResNet (random weights, a large head bias for large logit gaps): the samples
    certified under the semantics survive PGD-l2 whose iterates all run in that precision."""
    from certlib.attack import pgd_l2_executed
    from certlib.data import load as load_data
    from certlib.ir.compose import split_head
    from certlib.models.liresnet import build
    from certlib.onnx.export import build_onnx
    from certlib.onnx.importer import import_model

    torch.manual_seed(0)
    m = build("digits", width=16, depth=2)
    m.eval()
    g = import_model(build_onnx(m))
    g.nodes[split_head(g)].bias = np.random.default_rng(0).normal(0, 40.0, g.num_classes)
    g.runtime_model = b""       # the ONNX file no longer matches the IR: no onnxruntime veto
    d = load_data("digits", "test")
    ds = Dataset(d.x[:10], d.y[:10], "digits[:10]", 10)
    eps = 0.05
    r = verify_graph(g, ds, eps, semantics=fmt).result
    cert = np.flatnonzero(r.certified)
    assert cert.size >= 3
    flipped, _ = pgd_l2_executed(g, ds.x[cert], r.pred[cert], eps, fmt, steps=6, restarts=1)
    assert not flipped.any()
    # the same attack does find flips of the hand-built certificate in float16 (the falsifier works)
    x, y = cancel_data()
    gc = _graph([(np.eye(1), np.array([1024.0])), (np.eye(1), np.array([-1024.0])),
                 (np.array([[-1.0], [1.0]]), np.array([0.1, 0.0]))])
    gc.nodes = [n for n in gc.nodes if not isinstance(n, ActivationNode)]
    assert pgd_l2_executed(gc, x.reshape(-1, 1), y, 0.1, "float16", steps=2, restarts=1)[0].all()
