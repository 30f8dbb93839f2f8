"""The public API (certlib/api.py, docs/api.md): one road with the CLI, torch
modules exported in-process and checked against the module, every data form."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import certlib
from api_models import Sneaky, mlp, trained_mlp
from certlib.api_torch import ModelMismatchError, check_module, export_module
from certlib.data import load


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("api") / "mlp.onnx"
    onnx.save(export_module(trained_mlp(), (1, 8, 8)), str(p))
    return p


def test_import_certlib_is_cheap():
    code = "import sys, certlib; print('torch' in sys.modules, 'onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_api_names_stay_callable_after_the_submodules_load():
    import certlib.attack  # noqa: F401
    import certlib.train  # noqa: F401
    import certlib.verify  # noqa: F401
    from certlib.verify import verify_graph  # noqa: F401

    assert callable(certlib.verify) and callable(certlib.attack) and callable(certlib.train)
    assert certlib.preset_config("digits").epochs > 0 and "digits" in certlib.RECIPES


def test_torch_module_gives_the_file_road_numbers(onnx_path):
    rep = certlib.verify(trained_mlp(), "digits", 0.1, limit=120)
    ref = certlib.verify(str(onnx_path), "digits", 0.1, limit=120)
    from certlib.verify import verify_file

    cli_road = verify_file(onnx_path, load("digits").take(120), 0.1)
    assert rep.sound and rep.n == 120
    assert rep.vra == ref.vra == cli_road.result.vra
    np.testing.assert_array_equal(rep.certified, cli_road.result.certified)
    np.testing.assert_array_equal(rep.radius, cli_road.result.radius)
    assert rep.lipschitz == float(cli_road.analysis.body.value)
    assert rep.vra > 0.5 and rep.clean_accuracy >= rep.vra


def test_every_data_form_gives_the_same_certificates():
    model = certlib.load_model(trained_mlp(), (1, 8, 8))
    ds = load("digits").take(64)
    base = certlib.verify(model, "digits", 0.1, limit=64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.tensor(ds.x), torch.tensor(ds.y)),
                                         batch_size=10)
    for data in ((ds.x, ds.y), (torch.tensor(ds.x), torch.tensor(ds.y)), loader, ds):
        rep = certlib.verify(model, data, "1/10", limit=64)
        np.testing.assert_array_equal(rep.certified, base.certified)
        np.testing.assert_array_equal(rep.radius, base.radius)


def test_a_module_that_differs_from_its_export_is_refused():
    sneaky = Sneaky(trained_mlp())
    model = certlib.load_model(sneaky, (1, 8, 8))
    assert certlib.verify(model, "digits", 0.1, limit=16).n == 16
    sneaky.shift = 0.5                      # the module now computes something else than the ONNX
    with pytest.raises(ModelMismatchError, match="does not reproduce the torch module"):
        certlib.verify(model, "digits", 0.1, limit=16)
    with pytest.raises(ModelMismatchError):
        certlib.lipschitz_bound(model)


def test_check_module_refuses_a_different_prediction():
    m = trained_mlp()
    x = load("digits").x[:8]
    with torch.no_grad():
        f = m(torch.tensor(x)).double().numpy()
    assert check_module(m, f, x) == 0.0
    g = f.copy()
    g[0] = f[0][::-1]                       # swap the ranking of sample 0: small, but another class
    with pytest.raises(ModelMismatchError):
        check_module(m, g, x)


def test_bad_inputs_are_usage_errors():
    with pytest.raises(certlib.UsageError):
        certlib.verify(trained_mlp(), "no-such-data", 0.1)
    with pytest.raises(certlib.UsageError):
        certlib.verify(trained_mlp(), (np.zeros((3, 1, 8, 8)), np.zeros(2, int)), 0.1)
    with pytest.raises(certlib.UsageError):
        certlib.verify(42, "digits", 0.1)
    with pytest.raises(certlib.UsageError):
        certlib.verify(trained_mlp(), "digits", -1)


def test_lipschitz_bound_covers_the_explicit_linear_map():
    torch.manual_seed(1)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 20), torch.nn.Linear(20, 10)).eval()
    b = certlib.lipschitz_bound(certlib.load_model(lin, (1, 8, 8)))
    assert isinstance(b.bound, certlib.Bound) and isinstance(b.body, certlib.Bound)
    W = (lin[2].weight.double() @ lin[1].weight.double()).detach().numpy()
    assert np.linalg.svd(W, compute_uv=False)[0] <= b.value
    assert b.value >= float(b.body.value) * float(b.head.value)


def test_lipschitz_bound_covers_empirical_ratios_of_a_relu_net():
    m = trained_mlp()
    b = certlib.lipschitz_bound(m, input_shape=(1, 8, 8))
    rng = np.random.default_rng(0)
    x = rng.random((256, 1, 8, 8))
    d = rng.standard_normal(x.shape) * 1e-3
    with torch.no_grad():
        f0, f1 = (m.double()(torch.tensor(v)).numpy() for v in (x, x + d))
    m.float()
    ratios = np.linalg.norm(f1 - f0, axis=1) / np.linalg.norm(d.reshape(256, -1), axis=1)
    assert ratios.max() <= b.value
    assert len(b.stages) >= 1 and all(s.bound >= 0 for s in b.stages)


def test_report_exports(onnx_path):
    rep = certlib.verify(onnx_path, "digits", 0.1, limit=30)
    j = json.loads(rep.to_json())
    assert j["vra"] == rep.vra and j["lipschitz"]["sound"] is True and j["n"] == 30
    rows = rep.to_tsv().strip().split("\n")
    assert rows[0].split("\t") == ["idx", "label", "pred", "correct", "certified", "radius"]
    assert len(rows) == 31 and sum(int(r.split("\t")[4]) for r in rows[1:]) == int(rep.certified.sum())
    assert "VRA=" in repr(rep)


def test_proof_and_check_round_trip(tmp_path):
    # the checker reads the legacy exporter's Flatten (the dynamo export's Reshape is not in its subset)
    onnx_path = tmp_path / "legacy.onnx"
    torch.onnx.export(trained_mlp(), (torch.zeros(2, 1, 8, 8),), str(onnx_path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
    cert = tmp_path / "cert.json"
    rep = certlib.verify(onnx_path, "digits", 0.1, limit=20, proof=cert)
    res = certlib.check(onnx_path, cert)
    assert res["certified"] == int(rep.certified.sum())
    c = json.loads(cert.read_text())
    c["eps"] = 10.0                             # claim a radius that was never proven
    with pytest.raises(certlib.ProofCheckError):
        certlib.check(onnx_path, c)


def test_attack_finds_no_violation(onnx_path):
    rep = certlib.verify(onnx_path, "digits", 0.1, limit=20)
    res = certlib.attack(onnx_path, "digits", 0.1, steps=5, restarts=1, report=rep)
    assert res.violations == [] and res.certified == int(rep.certified.sum())
    assert 0 < res.empirical_lipschitz_lower <= res.certified_lipschitz_upper
    assert rep.attack is res and "violation" in rep.to_html()


def test_untrained_module_on_cuda_device_argument_is_cpu_safe():
    rep = certlib.verify(mlp(), "digits", 0.01, limit=8, device="cpu")
    assert rep.n == 8
