"""Per-op tests for the core handlers (certlib/onnx/ops/core.py): each builds a
model with onnx.helper, checks the IR forward against onnxruntime, and checks
that the sound bound is >= the empirical Lipschitz constant an attack finds
(tests/op_harness.py).  Branch merges (Add/Sub/Sum/Concat/Max/Min of data
tensors, Split into branches) are in tests/test_dag.py."""

import numpy as np
import pytest
from onnx import helper

from certlib.errors import UnsupportedModelError
from certlib.onnx.importer import import_model
from op_harness import check_model, head_model

RNG = np.random.default_rng(7)


@pytest.mark.parametrize("attrs,hw,out", [
    (dict(pads=[1, 1, 1, 1]), 5, 5),
    (dict(pads=[0, 1, 2, 1], strides=[2, 2]), 6, None),
    (dict(auto_pad="SAME_UPPER", strides=[2, 1]), 5, None),
    (dict(auto_pad="SAME_LOWER"), 4, 4),
    (dict(auto_pad="VALID", dilations=[2, 2]), 6, 2),
    (dict(group=2, pads=[1, 1, 1, 1]), 4, 4),
])
def test_conv(attrs, hw, out):
    cin, cout = 2, 4
    w = RNG.normal(size=(cout, cin // attrs.get("group", 1), 3, 3))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", **attrs)]
    m0 = helper.make_model(helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", 1, [1, cin, hw, hw])],
                                             [helper.make_tensor_value_info("c", 1, None)],
                                             [helper.make_tensor("w", 1, w.shape, w.ravel().astype(np.float32)),
                                              helper.make_tensor("b", 1, [cout], RNG.normal(size=cout).astype(np.float32))]))
    import onnx
    shape = onnx.shape_inference.infer_shapes(m0).graph.output[0].type.tensor_type.shape.dim
    dim = int(np.prod([d.dim_value for d in shape[1:]]))
    m = head_model(nodes, {"w": w, "b": RNG.normal(size=cout)}, (cin, hw, hw), "c", dim)
    check_model(m)


@pytest.mark.parametrize("attrs,trans", [(dict(transB=1), True), (dict(alpha=0.5, beta=2.0), False),
                                         (dict(transB=1, alpha=-1.5), True)])
def test_gemm(attrs, trans):
    W = RNG.normal(size=(6, 12) if trans else (12, 6)).astype(np.float32).astype(np.float64)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W", "c"], ["g"], name="gemm", **attrs)]
    m = head_model(nodes, {"W": W, "c": RNG.normal(size=6)}, (3, 2, 2), "g", 6)
    g, a, lower, upper = check_model(m)
    w = W if trans else W.T
    true = abs(attrs.get("alpha", 1.0)) * np.linalg.svd(w, compute_uv=False)[0]
    assert a.body.value >= true and a.body.value <= true * (1 + 1e-9)


def test_matmul():
    W = RNG.normal(size=(12, 5))
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "W"], ["g"], name="mm")]
    check_model(head_model(nodes, {"W": W}, (3, 2, 2), "g", 5))


@pytest.mark.parametrize("op,const_first", [("Add", False), ("Add", True), ("Sub", False), ("Sub", True),
                                            ("Mul", False), ("Mul", True), ("Div", False)])
def test_elementwise_by_constant(op, const_first):
    k = RNG.uniform(0.5, 2.0, size=(1, 3, 1, 1)) * RNG.choice([-1, 1], size=(1, 3, 1, 1))
    ins = ["k", "x"] if const_first else ["x", "k"]
    nodes = [helper.make_node(op, ins, ["e"], name="elt")]
    g, a, lower, upper = check_model(head_model(nodes, {"k": k}, (3, 2, 2), "e", 12))
    k32 = np.abs(np.asarray(k, dtype=np.float32).astype(np.float64))
    rule = {"Add": 1.0, "Sub": 1.0, "Mul": k32.max(), "Div": (1 / k32).max()}[op]
    assert a.body.value >= rule * (1 - 1e-15)


def test_div_of_constant_by_data_is_refused():
    nodes = [helper.make_node("Div", ["k", "x"], ["e"], name="inverse")]
    with pytest.raises(UnsupportedModelError, match="inverse"):
        import_model(head_model(nodes, {"k": np.ones((1, 3, 1, 1))}, (3, 2, 2), "e", 12))


def test_batchnorm():
    c = 3
    inits = {"g": RNG.uniform(0.5, 2, c), "beta": RNG.normal(size=c), "mu": RNG.normal(size=c),
             "var": RNG.uniform(0.2, 2, c)}
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "beta", "mu", "var"], ["n"], name="bn",
                              epsilon=1e-3)]
    g, a, _, _ = check_model(head_model(nodes, inits, (c, 2, 2), "n", 12))
    s = np.abs(np.float32(inits["g"]).astype(np.float64) / np.sqrt(np.float32(inits["var"]).astype(np.float64) + float(np.float32(1e-3))))
    assert a.body.value >= s.max() * (1 - 1e-15)


def test_relu_flatten_reshape_identity_dropout_softmax():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Identity", ["r"], ["i"], name="id"),
             helper.make_node("Dropout", ["i"], ["d"], name="drop"),
             helper.make_node("Reshape", ["d", "shape"], ["s"], name="reshape")]
    inits = {"shape": np.array([0, -1])}
    m = head_model(nodes, inits, (2, 3, 2), "s", 12)
    # integer shape initializer (head_model stores float32): rebuild it as int64
    from onnx import numpy_helper
    for i, t in enumerate(m.graph.initializer):
        if t.name == "shape":
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape"))
    # a final Softmax is dropped (argmax unchanged)
    m.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], name="softmax", axis=1))
    m.graph.output[0].name = "p"
    g = import_model(m)   # also checks the IR against onnxruntime (the probabilities' logits)
    assert [n.kind for n in g.nodes] == ["activation", "reshape", "reshape", "linear"]
    assert g.output_name == "p"
    m.graph.node.pop()   # without the Softmax: the full harness (forward, bound, attack)
    m.graph.output[0].name = "y"
    check_model(m)


def test_softmax_inside_the_network_is_refused():
    nodes = [helper.make_node("Softmax", ["x"], ["s"], name="inner_softmax", axis=1)]
    with pytest.raises(UnsupportedModelError, match="inner_softmax"):
        import_model(head_model(nodes, {}, (3, 2, 2), "s", 12))


def test_legacy_export_of_f_pad_folds_its_constant_of_shape(tmp_path):
    """torch's legacy exporter builds F.pad's pads with ConstantOfShape + Concat;
    the folder must turn them into constants."""
    import io

    import onnx
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 3)
            self.fc = torch.nn.Linear(3 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(self.conv(torch.nn.functional.pad(x, (1, 1, 1, 1))).flatten(1))

    buf = io.BytesIO()
    torch.onnx.export(Net().eval(), torch.rand(1, 2, 4, 4), buf, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
    m = onnx.load_from_string(buf.getvalue())
    assert any(n.op_type == "ConstantOfShape" for n in m.graph.node) or any(n.op_type == "Pad" for n in m.graph.node)
    check_model(m)


@pytest.mark.parametrize("mode", [True, False])
def test_dropout_training_mode_refused(mode):
    """Dropout with training_mode=1 drops entries at random: refused, naming the
    node; training_mode=0 is the identity."""
    from onnx import numpy_helper
    nodes = [helper.make_node("Constant", [], ["mode"], name="mode", value=numpy_helper.from_array(np.array(mode))),
             helper.make_node("Dropout", ["x", "ratio", "mode"], ["d"], name="drop_train")]
    m = head_model(nodes, {"ratio": np.array(0.5)}, (2, 2, 2), "d", 8, opset=13)
    if mode:
        with pytest.raises(UnsupportedModelError, match="drop_train.*training_mode"):
            import_model(m, check_runtime=False)
    else:
        g = import_model(m)
        assert [n.kind for n in g.nodes] == ["reshape", "linear"]
