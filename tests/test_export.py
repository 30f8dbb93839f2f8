"""certlib.onnx.export: onnxruntime is the oracle for the exported graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx_builders import randomize
from onnx import numpy_helper

from certlib.models import PRESETS, LiResNet, LiResNetConfig, build
from certlib.onnx.export import export_onnx

ALLOWED_OPS = {"Sub", "Conv", "Split", "Max", "Min", "Concat", "Flatten", "Gemm"}
SLOW_PRESETS = {"imagenet", "imagenet-eps1"}


def _randomize(model: LiResNet, seed: int = 0) -> LiResNet:
    """Random non-trivial weights whose logits are O(1) (so atol 1e-5 means something)."""
    randomize(model, seed)  # scales != 1, biases != 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks") and not name.endswith(("scale", "bias")):
                p.mul_(8.0)  # residual branch 8x its init size
        model.head.bias.mul_(10.0)
        model.stem.weight.mul_(4.0)
    return model


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _inputs(cfg: LiResNetConfig, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)


def _roundtrip(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomize(build(name)).eval()
    path = tmp_path / f"{name}.onnx"
    proto = export_onnx(model, path)
    assert {n.op_type for n in proto.graph.node} <= ALLOWED_OPS
    sess = _session(path)
    del proto
    x = _inputs(model.config, 2, seed=1)
    with torch.no_grad():
        ref = model(x).numpy()
    (got,) = sess.run(["logits"], {"input": x.numpy()})
    assert got.shape == (2, model.config.num_classes) and got.dtype == np.float32
    assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PRESETS else n for n in PRESETS],
)
def test_roundtrip_every_preset(name, tmp_path):
    _roundtrip(name, tmp_path)


def test_dynamic_batch(tmp_path):
    model = _randomize(build("digits"), seed=3)
    path = tmp_path / "digits.onnx"
    export_onnx(model, path)
    sess = _session(path)
    for n in (1, 3):
        x = _inputs(model.config, n, seed=n)
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = sess.run(None, {"input": x.numpy()})
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_graph_structure_and_names(tmp_path):
    model = _randomize(build("digits"), seed=4)
    proto = export_onnx(model, tmp_path / "m.onnx")
    g = proto.graph
    (inp,) = g.input
    (out,) = g.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 1, 8, 8]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 10]

    nodes = {n.name: n for n in g.node}
    assert len(nodes) == len(g.node)  # unique names
    for stage in ["stem.conv", "block0.conv", "block3.conv", "neck.conv"]:
        assert nodes[stage].op_type == "Conv"
        assert list(nodes[stage].input[1:]) == [f"{stage}.weight", f"{stage}.bias"]
    assert nodes["neck.dense"].op_type == "Gemm" and nodes["head"].op_type == "Gemm"
    assert nodes["head"].output[0] == "logits"
    for prefix in ["stem", "block0", "block3", "neck", "neck.dense"]:
        split = nodes[f"{prefix}.minmax.split"]
        assert split.op_type == "Split"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in split.attribute}
        assert attrs == {"axis": 1, "num_outputs": 2}
        assert nodes[f"{prefix}.minmax.max"].op_type == "Max"
        assert nodes[f"{prefix}.minmax.min"].op_type == "Min"
        assert nodes[f"{prefix}.minmax.concat"].op_type == "Concat"
    # One Conv per backbone block: the FUSED kernel.
    assert sum(n.op_type == "Conv" for n in g.node) == 1 + model.config.depth + 1

    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    assert inits["input.shift"] == np.float32(0.5)
    for i, blk in enumerate(model.blocks):
        np.testing.assert_array_equal(inits[f"block{i}.conv.weight"], blk.fused_kernel().detach().numpy())
    hw = inits["head.weight"]
    np.testing.assert_allclose(np.linalg.norm(hw.astype(np.float64), axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(inits["head.bias"], model.head.bias.detach().numpy())
    assert all(a.dtype == np.float32 for a in inits.values())

    meta = {p.key: p.value for p in proto.metadata_props}
    assert LiResNetConfig.from_dict(json.loads(meta["certlib.config"])) == model.config
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))


def test_opset17_split_sizes_input(tmp_path):
    model = _randomize(build("digits", width=8, depth=2), seed=5)
    path = tmp_path / "m17.onnx"
    proto = export_onnx(model, path, opset=17)
    assert proto.opset_import[0].version == 17
    split = next(n for n in proto.graph.node if n.op_type == "Split")
    assert len(split.input) == 2 and not any(a.name == "num_outputs" for a in split.attribute)
    x = _inputs(model.config, 2, seed=6)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_session(path).run(None, {"input": x.numpy()})[0], ref, rtol=1e-5, atol=1e-5)


def test_export_without_path_and_errors(tmp_path):
    model = build("digits", width=8, depth=1)
    proto = export_onnx(model, None)
    assert isinstance(proto, onnx.ModelProto) and not list(tmp_path.iterdir())
    with pytest.raises(TypeError):
        export_onnx(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, None, opset=11)
