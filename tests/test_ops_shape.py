"""Shape/index ops and ConvTranspose: each imported model reproduces
onnxruntime, is bounded soundly, and its bound is >= the empirical Lipschitz
constant (tests/op_harness.py); ConvTranspose's bound is its exact norm.
Refusals name the node.  Proofs: proofs/index_ops.md.  The GroupSort-2 forms
are in tests/test_ops_groupsort.py."""

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from certlib.errors import UnsupportedModelError
from certlib.ir.graph import IndexNode, LinearNode, ReshapeNode
from certlib.onnx.importer import import_model
from op_harness import check_model

I64 = np.int64
BIG = 2 ** 63 - 1


def _mk(op, ins, out="o", **attrs):
    return helper.make_node(op, ins, [out], name=op.lower(), **attrs)


def _model(nodes, inits, in_shape, out_shape, opset=18, classes=3, seed=0):
    """op_harness.head_model with a MatMul head (Gemm needs C before opset
    11), keeping integer constants int64 (head_model makes them float32)."""
    rng = np.random.default_rng(seed)
    body_out = nodes[-1].output[0]
    nodes = list(nodes) + [helper.make_node("Flatten", [body_out], ["flat_out"], name="head_flatten"),
                           helper.make_node("MatMul", ["flat_out", "W_head"], ["y"], name="head")]
    consts = dict(inits, W_head=rng.normal(size=(int(np.prod(out_shape)), classes)))
    tensors = [numpy_helper.from_array(np.asarray(v, dtype=I64 if np.asarray(v).dtype.kind in "iu" else np.float32), k)
               for k, v in consts.items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _refused(m, name, match):
    with pytest.raises(UnsupportedModelError, match=match) as ei:
        import_model(m)
    assert any(it.name == name for it in ei.value.items), ei.value.items


def _unit_bound(m, shape):
    g, a, lower, upper = check_model(m)
    assert 1.0 <= a.body.value <= 1.0 + 1e-12   # moves / drops entries: 1 (rounded up)
    assert g.nodes[0].out_shape == shape
    return g


# ------------------------------------------------------------------ Transpose
def test_transpose():
    m = _model([_mk("Transpose", ["x"], perm=[0, 2, 3, 1])], {}, (2, 3, 4), (3, 4, 2))
    g = _unit_bound(m, (3, 4, 2))
    assert isinstance(g.nodes[0], IndexNode) and g.nodes[0].params["perm"] == [1, 2, 0]


def test_transpose_moving_the_batch_axis_is_refused():
    m = _model([_mk("Transpose", ["x"], perm=[1, 0, 2, 3])], {}, (2, 3, 4), (2, 3, 4))
    _refused(m, "transpose", "batch axis")


# ------------------------------------------------------------------------ Pad
@pytest.mark.parametrize("opset,pads,axes,shape", [
    (18, [0, 0, 1, 2, 0, 0, 2, 1], None, (2, 6, 7)),   # pads input, all axes
    (18, [1, 0, 0, 2], [-2, 3], (2, 4, 6)),             # opset 18 axes input (negative axis)
    (13, [0, 1, 0, -1, 0, 0, 2, 1], None, (3, 5, 4)),   # negative pads crop
])
def test_pad_constant_zero(opset, pads, axes, shape):
    ins, inits = ["x", "pads", "zero"], {"pads": np.array(pads), "zero": np.array(0.0)}
    if axes is not None:
        ins.append("axes")
        inits["axes"] = np.array(axes)
    _unit_bound(_model([_mk("Pad", ins)], inits, (2, 3, 4), shape, opset=opset), shape)


def test_pad_attribute_form_opset10():
    m = _model([_mk("Pad", ["x"], pads=[0, 0, 1, 1, 0, 1, 0, 2], mode="constant")], {}, (2, 3, 4), (3, 4, 7),
               opset=10)
    _unit_bound(m, (3, 4, 7))


@pytest.mark.parametrize("mode,pads,m", [
    ("wrap", [0, 0, 1, 1, 0, 0, 1, 1], 4),      # each axis copies its end rows twice: 2 x 2
    ("reflect", [0, 0, 1, 2, 0, 0, 1, 0], 6),   # H pads (1, 1) copy row 1 three times, W pads (2, 0) cols 1, 2 twice
    ("edge", [0, 0, 0, 2, 0, 0, 0, 0], 3),      # the first column copied 3 times
])
def test_pad_copy_modes_are_sqrt_of_max_copies(mode, pads, m):
    """edge / reflect / wrap padding copies entries: Lipschitz exactly sqrt(max
    copies of one entry), checked against the explicit 0/1 matrix."""
    b, e = pads[:4], pads[4:]
    out = tuple(d + pb + pe for d, pb, pe in zip((2, 3, 4), b[1:], e[1:]))
    opset = 19 if mode == "wrap" else 18
    mdl = _model([_mk("Pad", ["x", "pads"], mode=mode)], {"pads": np.array(pads)}, (2, 3, 4), out, opset=opset)
    g, a, lower, upper = check_model(mdl)
    node = g.nodes[0]
    basis = np.eye(24).reshape(24, 2, 3, 4)
    M = np.stack([node.apply(torch.as_tensor(v[None]), False)[0].reshape(-1).numpy() for v in basis], axis=1)
    ref = ort.InferenceSession(mdl.SerializeToString()).run(None, {"x": basis.astype(np.float32)})[0]
    assert ref.shape[0] == 24   # the model runs on the basis; the 0/1 matrix comes from the IR node
    true = np.linalg.svd(M, compute_uv=False)[0]
    assert true == pytest.approx(np.sqrt(m)) and node.lipschitz >= true and node.lipschitz == pytest.approx(np.sqrt(m))


@pytest.mark.parametrize("k,dil,groups", [(3, 1, 1), (5, 1, 2), (3, 2, 1)])
def test_wrap_pad_then_conv_is_one_circular_conv(k, dil, groups):
    """Pad(wrap) + Conv(pads 0, stride 1) keeping H x W is a circular conv:
    bounded exactly (the pair's explicit matrix), not sqrt(copies) * ||conv||."""
    rng = np.random.default_rng(k + dil)
    p = dil * (k - 1) // 2
    w = rng.normal(size=(4, 4 // groups, k, k))
    nodes = [_mk("Pad", ["x", "pads"], out="p", mode="wrap"),
             helper.make_node("Conv", ["p", "w"], ["o"], name="conv", dilations=[dil, dil], group=groups)]
    mdl = _model(nodes, {"pads": np.array([0, 0, p, p, 0, 0, p, p]), "w": w}, (4, 5, 5), (4, 5, 5), opset=19)
    g, a, lower, upper = check_model(mdl)
    basis = np.eye(100).reshape(100, 4, 5, 5)
    h = torch.as_tensor(basis)
    for node in g.nodes[:2]:
        h, _ = node.apply(h, False)
    true = np.linalg.svd(h.reshape(100, -1).numpy().T, compute_uv=False)[0]
    assert true <= a.body.value <= true * (1 + 1e-9)
    assert "circular" in a.layers[0].method


def test_pad_nonzero_value_and_batch_pads_are_refused():
    m = _model([_mk("Pad", ["x", "pads", "v"])], {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]), "v": np.array(1.0)},
               (2, 3, 4), (2, 5, 6))
    _refused(m, "pad", "not 0")
    m = _model([_mk("Pad", ["x", "pads"])], {"pads": np.array([1, 0, 0, 0, 0, 0, 0, 0])}, (2, 3, 4), (2, 3, 4))
    with pytest.raises(UnsupportedModelError, match="batch axis"):
        import_model(m)


# ---------------------------------------------------------- Squeeze/Unsqueeze
def test_unsqueeze_then_squeeze_axes_as_inputs():
    nodes = [_mk("Unsqueeze", ["x", "ax"], "u"), helper.make_node("Squeeze", ["u", "sx"], ["o"], name="squeeze")]
    m = _model(nodes, {"ax": np.array([2, -1]), "sx": np.array([-1])}, (3, 4), (3, 1, 4), opset=13)
    g, a, _, _ = check_model(m)
    assert [n.out_shape for n in g.nodes[:2]] == [(3, 1, 4, 1), (3, 1, 4)]
    assert all(isinstance(n, ReshapeNode) for n in g.nodes[:2]) and a.body.value <= 1.0 + 1e-12


def test_unsqueeze_squeeze_attribute_form_opset11():
    nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], name="unsqueeze", axes=[1]),
             helper.make_node("Squeeze", ["u"], ["o"], name="squeeze", axes=[1])]
    m = _model(nodes, {}, (3, 4), (3, 4), opset=11)
    g, _, _, _ = check_model(m)
    assert g.nodes[0].out_shape == (1, 3, 4)


def test_squeeze_refusals():
    m = _model([_mk("Squeeze", ["x"])], {}, (1, 4), (4,), opset=13)
    _refused(m, "squeeze", "batch of size 1")
    m = _model([_mk("Squeeze", ["x", "ax"])], {"ax": np.array([0])}, (1, 4), (4,), opset=13)
    _refused(m, "squeeze", "batch axis")
    m = _model([_mk("Unsqueeze", ["x", "ax"])], {"ax": np.array([0])}, (3, 4), (3, 4), opset=13)
    _refused(m, "unsqueeze", "batch axis")


# ---------------------------------------------------------------------- Slice
@pytest.mark.parametrize("starts,ends,axes,steps,shape", [
    ([1], [3], [1], None, (2, 6, 5)),                           # one axis
    ([-3, 0], [BIG, -1], [-1, 2], [1, 2], (4, 3, 3)),           # negative, clamped, step 2
    ([0, 1, -100], [BIG, 4, 100], [0, 1, 3], [1, 3, 2], (1, 6, 3)),  # batch untouched, clamping
    ([3], [1000], [-2], [1], (4, 3, 5)),                        # end past the size
])
def test_slice_inputs(starts, ends, axes, steps, shape):
    ins = ["x", "s", "e", "a"] + (["st"] if steps else [])
    inits = {"s": np.array(starts), "e": np.array(ends), "a": np.array(axes)}
    if steps:
        inits["st"] = np.array(steps)
    m = _model([_mk("Slice", ins)], inits, (4, 6, 5), shape)
    _unit_bound(m, shape)


def test_slice_attribute_form_opset9():
    m = _model([_mk("Slice", ["x"], starts=[1, -2], ends=[3, 100], axes=[1, 3])], {}, (4, 6, 5), (2, 6, 2), opset=9)
    _unit_bound(m, (2, 6, 2))


def test_slice_refusals():
    m = _model([_mk("Slice", ["x", "s", "e", "a", "st"])],
               {"s": np.array([3]), "e": np.array([0]), "a": np.array([1]), "st": np.array([-1])}, (4, 6), (3, 6))
    _refused(m, "slice", "negative Slice steps")
    m = _model([_mk("Slice", ["x", "s", "e", "a"])], {"s": np.array([1]), "e": np.array([BIG]), "a": np.array([0])},
               (4, 6), (4, 6))
    _refused(m, "slice", "batch axis")


def test_slice_with_non_constant_starts_is_refused():
    # start computed from the data's values (a shape-derived start folds at the
    # imported batch size and is fine): never a constant
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], name="max", keepdims=0),
             helper.make_node("Cast", ["mx"], ["mi"], name="cast", to=TensorProto.INT64),
             helper.make_node("Reshape", ["mi", "one"], ["start"], name="start"),
             helper.make_node("Slice", ["x", "start", "e", "a"], ["o"], name="slice")]
    m = _model(nodes, {"one": np.array([1]), "e": np.array([BIG]), "a": np.array([2])}, (3, 4), (3, 3))
    with pytest.raises(UnsupportedModelError) as ei:
        import_model(m)
    assert "slice" in {it.name for it in ei.value.items}, ei.value.items


# --------------------------------------------------- SpaceToDepth/DepthToSpace
def test_space_to_depth():
    m = _model([_mk("SpaceToDepth", ["x"], blocksize=2)], {}, (3, 4, 6), (12, 2, 3))
    _unit_bound(m, (12, 2, 3))


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space(mode):
    m = _model([_mk("DepthToSpace", ["x"], blocksize=2, mode=mode)], {}, (8, 2, 3), (2, 4, 6))
    g = _unit_bound(m, (2, 4, 6))
    assert g.nodes[0].params["mode"] == mode


def test_depth_to_space_default_mode_opset1_and_bad_sizes():
    m = _model([_mk("DepthToSpace", ["x"], blocksize=2)], {}, (4, 2, 2), (1, 4, 4), opset=9)
    _unit_bound(m, (1, 4, 4))
    m = _model([_mk("SpaceToDepth", ["x"], blocksize=2)], {}, (1, 3, 4), (4, 1, 2))
    _refused(m, "spacetodepth", "not divisible")


# -------------------------------------------------------------- ConvTranspose
CONVT = {  # name: (C_in, C_out, H, W, k, attributes)
    "s1": (2, 3, 4, 4, 3, {}),
    "s2_pads_outpad": (2, 3, 4, 3, 3, dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    "groups_dilation": (4, 2, 3, 4, 2, dict(strides=[2, 1], dilations=[2, 2], group=2, pads=[1, 0, 0, 1],
                                            output_padding=[1, 0])),
    "output_shape": (2, 2, 4, 4, 3, dict(strides=[2, 2], output_shape=[8, 7])),
    "same_upper": (2, 2, 3, 4, 3, dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    "same_lower": (2, 2, 3, 4, 4, dict(strides=[2, 2], auto_pad="SAME_LOWER")),
    "output_shape_outpad": (2, 1, 4, 4, 3, dict(strides=[2, 2], output_shape=[9, 8], output_padding=[1, 1])),
    "valid": (1, 2, 3, 3, 3, dict(strides=[3, 2], auto_pad="VALID")),
    "outpad_into_end_pads": (2, 2, 4, 4, 2, dict(strides=[2, 2], pads=[0, 0, 2, 1], output_padding=[1, 1])),
}


def _convt_model(case, bias, classes=3):
    cin, cout, H, W, k, attrs = CONVT[case]
    rng = np.random.default_rng(len(case))
    g = attrs.get("group", 1)
    inits = {"w": rng.normal(size=(cin, cout // g, k, k)) * 0.5}
    ins = ["x", "w"]
    if bias:
        inits["b"] = rng.normal(size=cout)
        ins.append("b")
    node = helper.make_node("ConvTranspose", ins, ["o"], name="convt", **attrs)
    probe = helper.make_graph([node], "p", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, H, W])],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in inits.items()])
    pm = helper.make_model(probe, opset_imports=[helper.make_opsetid("", 18)])
    pm.ir_version = 8
    sess = ort.InferenceSession(pm.SerializeToString(), providers=["CPUExecutionProvider"])
    n_in = cin * H * W
    cols = sess.run(None, {"x": np.eye(n_in, dtype=np.float32).reshape(n_in, cin, H, W)})[0]
    return _model([node], inits, (cin, H, W), cols.shape[1:], classes=classes), cols


@pytest.mark.parametrize("case", sorted(CONVT))
def test_conv_transpose_forward_and_exact_norm(case):
    """The IR reproduces onnxruntime, and the reported bound is the largest
    singular value of the explicit matrix (materialised by onnxruntime on basis
    vectors: each entry is one weight, so it is exact) up to rounding."""
    m, _ = _convt_model(case, bias=True)
    g, a, lower, upper = check_model(m)
    lin = [n for n in g.nodes if isinstance(n, LinearNode) and n.transposed]
    assert len(lin) == 1 and lin[0].op.output_shape == lin[0].in_shape
    _, cols = _convt_model(case, bias=False)
    M = cols.reshape(cols.shape[0], -1).astype(np.float64).T   # bias-free matrix, one column per input entry
    truth = np.linalg.svd(M, compute_uv=False)[0]
    layer = [lb for lb in a.layers if lb.name == "convt"]
    assert len(layer) == 1
    assert truth <= layer[0].bound <= truth * (1 + 1e-9)
    assert truth <= a.body.value <= truth * (1 + 1e-9)


def test_conv_transpose_after_a_per_channel_scale():
    """An input normalisation must not be folded into a transposed conv's
    kernel as if it were a conv (its input channels are the kernel's axis 0)."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 3, 3, 3))
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
             helper.make_node("ConvTranspose", ["xs", "w"], ["o"], name="convt", strides=[2, 2])]
    m = _model(nodes, {"s": np.array([0.25, 4.0]).reshape(2, 1, 1), "w": w}, (2, 3, 3), (3, 7, 7))
    g, a, lower, upper = check_model(m)
    basis = torch.eye(18, dtype=torch.float64).reshape(18, 2, 3, 3)
    cols = g.nodes[1].apply(g.nodes[0].apply(basis, False)[0], False)[0]   # both bias-free
    truth = np.linalg.svd(cols.reshape(18, -1).numpy().T, compute_uv=False)[0]   # scale, then ConvTranspose
    assert truth <= a.body.value


def test_conv_transpose_refusals():
    w = np.ones((2, 2, 3, 3))
    m = _model([helper.make_node("ConvTranspose", ["x", "w"], ["o"], name="convt", strides=[2, 2],
                                 output_shape=[10, 10])], {"w": w}, (2, 4, 4), (2, 10, 10))
    _refused(m, "convt", "exceeds the full transposed convolution")
    m = _model([helper.make_node("ConvTranspose", ["x", "w"], ["o"], name="convt", strides=[2, 2],
                                 auto_pad="SAME_UPPER", output_padding=[1, 1])], {"w": w}, (2, 4, 4), (2, 8, 8))
    _refused(m, "convt", "ambiguous")
    m = _model([helper.make_node("ConvTranspose", ["x", "w"], ["o"], name="convt", dilations=[2, 2],
                                 output_padding=[1, 1])], {"w": w}, (2, 4, 4), (2, 9, 9))
    _refused(m, "convt", "rows no tap reaches")   # torch allows it, onnxruntime refuses to run it
    m = _model([helper.make_node("ConvTranspose", ["x", "w"], ["o"], name="convt", kernel_shape=[2, 2])],
               {"w": w}, (2, 4, 4), (2, 6, 6))
    _refused(m, "convt", "kernel_shape")


def _export(net, x, dynamo):
    """torch.onnx.export with a dynamic batch: the dynamo exporter or the legacy one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(net, (x,), input_names=["x"], dynamo=True, verbose=False,
                                     dynamic_shapes=({0: torch.export.Dim("N")},))
            return prog.model_proto
        f = io.BytesIO()
        torch.onnx.export(net, x, f, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        return onnx.load_from_string(f.getvalue())


# ------------------------------------------------ torch.onnx.export'ed models
class _ShapeNet(torch.nn.Module):
    """Index ops and a ConvTranspose as torch writes them."""

    def __init__(self, pad):
        super().__init__()
        torch.manual_seed(0)
        self.pad = pad
        self.up = torch.nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.head = torch.nn.Linear(4 * 8 * 6, 3)

    def forward(self, x):                                  # (N, 2, 4, 4)
        x = torch.nn.functional.pixel_shuffle(torch.nn.functional.pixel_unshuffle(x, 2), 2)
        if self.pad:                                       # legacy export: pads come from ConstantOfShape
            x = torch.nn.functional.pad(x, (1, 0, 0, 1))   # (N, 2, 5, 5)
            x = x[:, :, 1:, :-1]                           # (N, 2, 4, 4)
        x = x.permute(0, 2, 3, 1).unsqueeze(3).squeeze(3).permute(0, 3, 1, 2)
        x = self.up(x)                                     # (N, 4, 8, 8)
        return self.head(x[:, :, :, 1::1][:, :, :, ::1][:, :, :, 1:7].flatten(1))


@pytest.mark.parametrize("dynamo", [False, True])
def test_shape_ops_torch_export(dynamo):
    try:
        m = _export(_ShapeNet(pad=dynamo), torch.randn(2, 2, 4, 4), dynamo)
    except Exception as e:  # pragma: no cover - depends on the installed torch/onnxscript
        pytest.skip(f"torch.onnx.export unusable here: {type(e).__name__}: {e}")
    g, a, lower, upper = check_model(m)
    ops = {n.onnx_op for n in g.nodes}
    assert "ConvTranspose" in ops and "DepthToSpace" in ops and "Transpose" in ops and "Slice" in ops
