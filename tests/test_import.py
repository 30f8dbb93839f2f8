"""ONNX import: onnxruntime as the oracle; unsupported nodes all listed; clear errors."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from certlib.attack import empirical_lipschitz
from certlib.errors import UnsupportedModelError, UsageError
from certlib.ir.graph import ActivationNode, AffineNode, LinearNode
from certlib.ir.compose import analyze
from certlib.onnx.importer import import_model, load
from onnx_builders import plain_net, unsupported_net


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "certlib.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_plain_net_matches_onnxruntime_and_bound_holds():
    m = plain_net()
    g = import_model(m)
    kinds = [type(n) for n in g.nodes]
    assert kinds.count(LinearNode) == 3 and kinds.count(AffineNode) == 3 and kinds.count(ActivationNode) == 2
    x = np.random.default_rng(5).random((16, 2, 6, 6)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    ours, _ = g.forward(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    a = analyze(g, "exact")
    # Lipschitz of the logits <= L_body * ||W_head||_2 (oracle: numpy SVD)
    upper = a.body.value * np.linalg.svd(a.head_weight, compute_uv=False)[0]
    lower = empirical_lipschitz(g, x, steps=60)
    assert 0 < lower <= upper


def test_unsupported_nodes_are_all_listed():
    with pytest.raises(UnsupportedModelError) as ei:
        import_model(unsupported_net())
    names = {it.name for it in ei.value.items}
    assert {"bad_erf", "bad_sin"} <= names
    assert ei.value.exit_code == 3


def test_cli_exit_codes(tmp_path):
    p = tmp_path / "bad.onnx"
    onnx.save(unsupported_net(), p)
    r = _cli("bounds", str(p))
    assert r.returncode == 3, r.stderr
    assert "bad_erf" in r.stderr and "bad_sin" in r.stderr and "Traceback" not in r.stderr
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01garbage" * 10)
    r = _cli("bounds", str(junk))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = _cli("bounds", str(tmp_path / "missing.onnx"))
    assert r.returncode == 2 and "not found" in r.stderr


def test_dynamic_shape_needs_input_shape(tmp_path):
    p = tmp_path / "dyn.onnx"
    onnx.save(plain_net(dynamic=True), p)
    with pytest.raises(UsageError, match="input-shape"):
        load(p)
    _, g = load(p, input_shape=(2, 6, 6))
    assert g.input_shape == (2, 6, 6)


def test_opset_versions_are_resolved_with_onnx_defs():
    from onnx import helper

    from certlib.onnx.ops.registry import Ctx, Skip, check_opset, same_interface, schema_version

    # Split gained num_outputs at version 18: a different interface
    assert schema_version("Split", 18) == 18 and not same_interface("Split", 13, 18)
    # Flatten 21 -> 25 only added element types: accepted at opset 25
    assert same_interface("Flatten", 21, 25)
    check_opset(helper.make_node("Flatten", ["a"], ["b"]), Ctx(None, 25))
    with pytest.raises(Skip, match="not an ONNX operator at opset 12"):
        check_opset(helper.make_node("Gelu", ["a"], ["b"]), Ctx(None, 12))
    with pytest.raises(Skip, match="opsets >= 7"):
        check_opset(helper.make_node("Relu", ["a"], ["b"]), Ctx(None, 6))


def _torch_groupsort_net():
    import torch

    class GS(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            h = self.conv(x)
            n, c, hh, ww = h.shape   # shapes computed at run time in a dynamic export
            p = h.reshape(n, c // 2, 2, hh, ww)
            h = torch.cat([p.max(2, keepdim=True)[0], p.min(2, keepdim=True)[0]], 2).reshape(n, c, hh, ww)
            return self.fc(h.flatten(1))

    torch.manual_seed(0)
    return GS().eval()


@pytest.mark.parametrize("batch,dynamic", [(1, True), (1, False), (3, False)])
def test_shapes_computed_at_run_time_and_fixed_batches(batch, dynamic):
    """Dynamic exports compute Reshape targets from Shape(x); static exports
    write the batch size into them.  Both import as the model run on `batch`
    samples at a time (Graph.batch), each sample on its own."""
    import io

    import torch

    buf = io.BytesIO()
    kw = dict(dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}) if dynamic else {}
    torch.onnx.export(_torch_groupsort_net(), torch.rand(batch, 1, 4, 4), buf, dynamo=False, input_names=["x"],
                      output_names=["y"], opset_version=17, **kw)
    m = onnx.load_from_string(buf.getvalue())
    assert dynamic == any(n.op_type == "Shape" for n in m.graph.node)
    g = import_model(m)
    assert g.batch == batch
    assert any(n.kind == "activation" for n in g.nodes)   # the GroupSort-2 became one MinMax node
    x = np.random.default_rng(1).random((6, 1, 4, 4)).astype(np.float32)
    sess = ort.InferenceSession(m.SerializeToString())
    ref = np.concatenate([sess.run(None, {"x": x[i:i + batch]})[0] for i in range(0, 6, batch)])
    np.testing.assert_allclose(g.forward(x)[0], ref, rtol=1e-5, atol=1e-5)


def test_absurd_fixed_batch_is_refused_before_anything_is_allocated():
    """Fuzz finding: a model whose batch dimension is fixed to 2^40 made the
    runtime check try to allocate 128 TiB."""
    m = plain_net()
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1 << 40
    with pytest.raises(UnsupportedModelError, match="batch size is fixed to 1099511627776"):
        import_model(m)
