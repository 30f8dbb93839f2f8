"""Streaming certification (certlib/verify_stream.py, certlib/data/stream.py):
a streamed image folder gives the in-memory run's report sample for sample;
--limit keeps the first N; TSV and certificate from the kept records; clear
errors for broken folders and for --device cuda without CUDA."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper
from PIL import Image

from onnx_builders import make_model


def write_folder(root, per_class=7, classes=3, size=8, seed=0):
    """imagefolder:ROOT (val/c*/NNNNN.png, empty train/c*) and ROOT/m.onnx, a
    Flatten-Gemm-Relu-Gemm model for (3, size, size) inputs."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / "val" / f"c{c}"
        d.mkdir(parents=True)
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    d_in = 3 * size * size
    inits = {"W1": rng.normal(size=(16, d_in)) / 8, "b1": rng.normal(size=16),
             "W2": rng.normal(size=(classes, 16)), "b2": rng.normal(size=classes)}
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="head", transB=1)]
    onnx.save(make_model(nodes, inits, (3, size, size), classes), str(root / "m.onnx"))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("stream"))


def _flat(text):
    return " ".join(text.split())  # rich wraps long messages


@pytest.fixture
def _cli(cli_main):
    """``certlib ARGS`` in-process (tests/conftest.py::cli_main)."""
    return cli_main


@pytest.mark.parametrize("workers,batch", [(0, 4), (1, 5)])
def test_stream_equals_in_memory(folder, workers, batch):
    from certlib.data import load
    from certlib.data.stream import FolderStream, open_stream
    from certlib.onnx.importer import load as load_model
    from certlib.verify import verify_graph
    from certlib.verify_stream import verify_stream

    spec = f"imagefolder:{folder}"
    ds = load(spec)
    _, g = load_model(folder / "m.onnx")
    eps = 0.05
    ref = verify_graph(g, ds, eps, batch_size=batch)
    stream = open_stream(spec, workers=workers)
    assert isinstance(stream, FolderStream) and len(stream) == 21
    rep, data = verify_stream(g, stream, eps, batch_size=batch)
    r, q = rep.result, ref.result
    assert rep.data_sha256 == ref.data_sha256 == ds.sha256() and rep.data == ds.name
    np.testing.assert_array_equal(data.y, ds.y)
    for k in ("pred", "correct", "certified"):
        np.testing.assert_array_equal(getattr(r, k), getattr(q, k), err_msg=k)
    # a sample recomputed on the float64 path shares its BLAS call with other samples (another batch
    # here): its logits, hence radius and slack, may differ in the last bits; each is sound on its own
    for k in ("radius", "slack"):
        np.testing.assert_allclose(getattr(r, k), getattr(q, k), rtol=1e-9, atol=0, err_msg=k)
    assert r.vra == q.vra and r.clean_accuracy == q.clean_accuracy and 0 < r.certified.sum() < r.n
    assert float(rep.analysis.body.value) == float(ref.analysis.body.value)
    assert rep.runtime_disagree == ref.runtime_disagree


def test_array_stream_strided_shares_cover_the_split():
    from certlib.data import load
    from certlib.data.stream import ArrayStream

    s = ArrayStream(load("digits").take(50))
    seen = np.concatenate([i for r in range(3) for i, _, _ in s.batches(7, r, 3)])
    assert sorted(seen.tolist()) == list(range(50))
    assert s.sha256() == load("digits").take(50).sha256()


def test_cli_stream_tsv_limit_json_and_certificate(folder, tmp_path, _cli):
    m = folder / "m.onnx"
    full_tsv, lim_tsv, j, cert = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "b.json", tmp_path / "c.json"
    # batches of 3 in both runs: the float32 forward's last bits depend on the batch (BLAS kernels)
    r = _cli("verify", m, "--data", f"imagefolder:{folder}", "--eps", "0.05", "--tsv", full_tsv,
             "--batch-size", "3", "--workers", "0")
    assert r.returncode == 0, r.stderr
    r = _cli("verify", m, "--data", f"imagefolder:{folder}", "--eps", "0.05", "--tsv", lim_tsv, "--json", j,
             "--limit", "9", "--batch-size", "3", "--workers", "1")
    assert r.returncode == 0, r.stderr
    full, lim = full_tsv.read_text().splitlines(), lim_tsv.read_text().splitlines()
    assert full[0].split("\t") == ["idx", "label", "pred", "correct", "certified", "radius"]
    assert len(full) == 22 and lim == full[:10]  # --limit 9: the first 9 samples, same rows
    rep = json.loads(j.read_text())
    assert rep["n"] == 9 and rep["data"] == "imagefolder/test[:9]"
    # the certificate names the streamed data and the independent checker accepts it
    r = _cli("verify", m, "--data", f"imagefolder:{folder}", "--eps", "0.05", "--limit", "9", "--batch-size", "4",
             "--workers", "1", "--proof", cert)
    assert r.returncode == 0, r.stderr
    c = json.loads(cert.read_text())
    assert c["data"]["n"] == 9 and len(c["samples"]) == 9
    ok = _cli("check", m, cert)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["samples_checked"] == 9


def test_stream_errors_are_messages(folder, tmp_path, _cli):
    bad = write_folder(tmp_path / "bad", per_class=2)
    (bad / "val" / "c1" / "zz.png").write_bytes(b"not a png")
    r = _cli("verify", bad / "m.onnx", "--data", f"imagefolder:{bad}", "--eps", "0.1", "--workers", "1")
    assert r.returncode == 2 and "cannot decode image" in _flat(r.stderr) and "Traceback" not in r.stderr
    mixed = write_folder(tmp_path / "mixed", per_class=2)
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(mixed / "val" / "c2" / "big.png")
    r = _cli("verify", mixed / "m.onnx", "--data", f"imagefolder:{mixed}", "--eps", "0.1", "--workers", "0")
    assert r.returncode == 2 and "must all have one size" in _flat(r.stderr) and "Traceback" not in r.stderr
    r = _cli("verify", folder / "m.onnx", "--data", f"imagefolder:{folder}", "--eps", "0.1", "--limit", "0")
    assert r.returncode == 2 and "--limit" in r.stderr


def test_device_flag_errors(folder, tmp_path, _cli):
    import torch

    m = folder / "m.onnx"
    r = _cli("verify", m, "--eps", "0.1", "--data", f"imagefolder:{folder}", "--device", "tpu")
    assert r.returncode == 2 and "--device must be cpu, cuda or auto" in _flat(r.stderr), r.stderr
    if torch.cuda.is_available():
        return
    for args in [("verify", m, "--eps", "0.1", "--data", f"imagefolder:{folder}"), ("bounds", m),
                 ("attack", m, "--eps", "0.1", "--limit", "2", "--data", f"imagefolder:{folder}"),
                 ("check", m, tmp_path / "no-such-cert.json")]:
        r = _cli(*args, "--device", "cuda")
        assert r.returncode == 2 and "no CUDA device is available" in _flat(r.stderr), r.stderr
        assert "Traceback" not in r.stderr
