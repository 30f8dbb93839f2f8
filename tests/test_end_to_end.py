"""Train a (briefly trained) digits LiResNet, export it, verify it through the
CLI, and falsify the certificates with PGD-l2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from certlib.data import load as load_data

JSON_KEYS = {"model", "sha256", "eps", "n", "clean_accuracy", "vra", "lipschitz", "layers", "seconds",
             "certlib_version"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from certlib.train import preset_config, train

    out = tmp_path_factory.mktemp("digits")
    cfg = preset_config("digits", out=str(out), epochs=8, verify=False)
    train(cfg, quiet=True)
    return out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "certlib.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_verify_cli_json_tsv_plot(trained, tmp_path):
    j, t, p = tmp_path / "r.json", tmp_path / "r.tsv", tmp_path / "r.png"
    r = _cli("verify", str(trained / "model.onnx"), "--data", "digits", "--eps", "0.3",
             "--json", str(j), "--tsv", str(t), "--plot", str(p))
    assert r.returncode == 0, r.stderr
    rep = json.loads(j.read_text())
    assert JSON_KEYS <= set(rep)
    assert rep["lipschitz"]["sound"] is True and rep["n"] == 360
    assert {"body", "method", "sound"} <= set(rep["lipschitz"]) and rep["lipschitz"].get("rule", "product") == "product"
    assert all(set(layer) >= {"name", "op", "bound", "method"} for layer in rep["layers"])
    rows = t.read_text().strip().split("\n")
    assert rows[0].split("\t") == ["idx", "label", "pred", "correct", "certified", "radius"]
    assert len(rows) == 361
    vals = np.array([[float(v) for v in row.split("\t")] for row in rows[1:]])
    # radius > eps exactly for certified rows; VRA from the TSV equals the JSON's
    assert np.all(vals[vals[:, 4] == 1, 5] >= 0.3)
    assert abs(float(np.mean(vals[:, 3] * vals[:, 4])) - rep["vra"]) < 1e-12
    assert p.stat().st_size > 1000


def test_estimate_only_is_labelled_and_not_above_bounds(trained, tmp_path):
    js, je = tmp_path / "s.json", tmp_path / "e.json"
    m = str(trained / "model.onnx")
    assert _cli("verify", m, "--eps", "0.3", "--json", str(js)).returncode == 0
    r = _cli("verify", m, "--eps", "0.3", "--estimate-only", "--json", str(je))
    assert r.returncode == 0, r.stderr
    s, e = json.loads(js.read_text()), json.loads(je.read_text())
    assert e["lipschitz"]["sound"] is False and "NOT SOUND" in r.stderr
    assert e["lipschitz"]["body"] <= s["lipschitz"]["body"]
    for ls, le in zip(s["layers"], e["layers"]):
        assert le["bound"] <= ls["bound"], (ls, le)


def test_certified_test_points_resist_pgd(trained):
    from certlib.attack import pgd_l2
    from certlib.onnx.importer import load
    from certlib.verify import verify_graph

    _, g = load(trained / "model.onnx")
    ds = load_data("digits", "test")
    eps = 0.3
    rep = verify_graph(g, ds, eps)
    cert = rep.result.certified
    assert cert.sum() > 0
    flipped, xadv = pgd_l2(g, ds.x[cert], rep.result.pred[cert], eps, steps=40, restarts=2)
    assert not flipped.any(), f"{flipped.sum()} certified points broken: soundness bug"
    assert np.all(np.linalg.norm((xadv - ds.x[cert]).reshape(cert.sum(), -1), axis=1) <= eps)


def test_export_cli_roundtrip(trained, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "again.onnx"
    r = _cli("export", str(trained / "checkpoint.safetensors"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    x = load_data("digits").x[:5]
    a = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(trained / "model.onnx")).run(None, {"input": x})[0]
    np.testing.assert_array_equal(a, b)


def test_usage_errors(trained):
    m = str(trained / "model.onnx")
    for args in (["--eps", "-1"], ["--eps", "0.3", "--data", "nope"], ["--eps", "0.3", "--method", "magic"],
                 ["--eps", "0.3", "--data", "npz:/does/not/exist.npz"], ["--eps", "0.3", "--limit", "0"]):
        r = _cli("verify", m, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_attack_cli_finds_no_violation(trained, tmp_path):
    j = tmp_path / "a.json"
    r = _cli("attack", str(trained / "model.onnx"), "--eps", "0.3", "--limit", "60", "--steps", "15",
             "--restarts", "2", "--json", str(j))
    assert r.returncode == 0, r.stderr
    rep = json.loads(j.read_text())
    assert rep["violations"] == [] and rep["attacked"] == rep["certified"]
    assert 0 < rep["empirical_lipschitz_lower"] <= rep["certified_lipschitz_upper"]
    assert "lower bound" in r.stderr
