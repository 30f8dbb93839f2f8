"""Nonlinear ONNX ops (certlib/onnx/ops/nonlinear.py): each imports, matches
onnxruntime, bounds soundly (empirical Lipschitz <= bound), its stage bound is
exactly the rule of proofs/activations.md / proofs/maxpool.md, the rule is
attained (an independent lower bound reaches it), and what cannot be
represented exactly is refused with a reason."""

from __future__ import annotations

import io
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from certlib.bounds import up
from certlib.errors import UnsupportedModelError
from certlib.ir.graph import U64, AffineNode, LinearNode
from certlib.onnx.importer import import_model
from op_harness import check_model, head_model

ort.set_default_logger_severity(3)


def _layer(a, label: str) -> float:
    hits = [lb.bound for lb in a.layers if lb.op == label]
    assert len(hits) == 1, [(lb.op, lb.bound) for lb in a.layers]
    return hits[0]


def _build(nodes, inits, in_shape, out_name, opset=18, check=True):
    """A bare model x -> nodes -> out_name (no head); ``check=False`` skips the
    ONNX checker (for attributes an opset does not define)."""
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])
    rank = 2 if out_name == "y" else len(in_shape) + 1  # "y": after a Flatten
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [f"d{i}" for i in range(rank)])
    g = helper.make_graph(nodes, "g", [inp], [out],
                          [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if check:
        onnx.checker.check_model(m)
    return m


def _ort(m, x):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _one(op, in_shape, opset=18, inits=None, inputs=("x",), **attrs):
    """A head model around a single op (body output flattened)."""
    node = helper.make_node(op, list(inputs), ["a"], name="op", **attrs)
    out = _ort(_build([node], inits or {}, in_shape, "a", opset), np.zeros((1, *in_shape), np.float32))
    return head_model([node], inits or {}, in_shape, "a", int(np.prod(out.shape[1:])), opset=opset)


def _refused(m, *words):
    with pytest.raises(UnsupportedModelError) as ei:
        import_model(m)
    msg = str(ei.value)
    assert all(w in msg for w in words), msg
    return msg


# ------------------------------------------------------------ pointwise
@pytest.mark.parametrize("alpha", [0.01, -0.5, 2.5])
def test_leaky_relu(alpha):
    g, a, lower, upper = check_model(_one("LeakyRelu", (2, 3, 3), alpha=alpha))
    rule = max(1.0, abs(np.float32(alpha)))
    assert _layer(a, "leaky_relu") == rule
    x = np.array([-1.0, -2.0, 3.0]) if abs(alpha) > 1 else np.array([1.0, 2.0, -3.0])
    f = lambda v: np.where(v >= 0, v, np.float32(alpha) * v)  # noqa: E731  independent reference
    assert abs(f(x)[1] - f(x)[0]) / 1.0 == pytest.approx(rule, rel=1e-12)  # the rule is attained


def test_prelu_per_channel_slope():
    slope = np.array([0.25, -3.0, 0.5], dtype=np.float32).reshape(3, 1, 1)
    g, a, lower, upper = check_model(_one("PRelu", (3, 4, 4), inits={"s": slope}, inputs=("x", "s")))
    assert _layer(a, "prelu") == 3.0
    x = np.zeros((1, 3, 4, 4))
    x[0, 1, 2, 2] = -1.0  # channel 1 (slope -3) on its negative side: the rule is attained
    y0, y1 = (_ort(_build([helper.make_node("PRelu", ["x", "s"], ["a"])], {"s": slope}, (3, 4, 4), "a"),
                   v.astype(np.float32)) for v in (np.zeros_like(x), x))
    assert np.linalg.norm(y1 - y0) == 3.0


@pytest.mark.parametrize("shape", [(), (1,), (4,), (1, 4, 4)])
def test_prelu_broadcast_forms(shape):
    slope = np.linspace(-0.5, 1.5, int(np.prod(shape))).reshape(shape).astype(np.float32)
    g, a, *_ = check_model(_one("PRelu", (3, 4, 4), inits={"s": slope}, inputs=("x", "s")))
    assert _layer(a, "prelu") == max(1.0, float(np.max(np.abs(slope))))


def test_prelu_refusals():
    bad = np.ones((2, 1, 1), np.float32)  # 2 slopes for 3 channels
    node = helper.make_node("PRelu", ["x", "s"], ["a"], name="op")
    _refused(head_model([node], {"s": bad}, (3, 4, 4), "a", 48), "op", "does not broadcast")
    batch = np.ones((2, 3, 1, 1), np.float32)  # would broadcast along the batch
    _refused(head_model([node], {"s": batch}, (3, 4, 4), "a", 48), "op")
    nan = np.array([np.nan], np.float32)
    _refused(head_model([node], {"s": nan}, (3, 4, 4), "a", 48), "op", "NaN")


def test_abs():
    g, a, lower, upper = check_model(_one("Abs", (2, 3, 3)))
    assert _layer(a, "abs") == 1.0


def test_tanh():
    g, a, *_ = check_model(_one("Tanh", (2, 3, 3)))
    assert _layer(a, "tanh") == 1.0
    t = 1e-6  # tanh'(0) = 1: the rule is attained
    assert 1 - 1e-9 < (math.tanh(t) - math.tanh(-t)) / (2 * t) <= 1.0


def test_sigmoid():
    g, a, *_ = check_model(_one("Sigmoid", (2, 3, 3)))
    assert _layer(a, "sigmoid") == 0.25  # exactly 1/4, not a rounded value
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    t = 1e-5  # s'(0) = 1/4: attained
    assert 0.25 - 1e-9 < (s(t) - s(-t)) / (2 * t) <= 0.25 + 1e-15
    # the rule at opsets 7 and 13 (both schema versions the handler covers)
    for opset in (7, 13):
        assert import_model(_build([helper.make_node("Sigmoid", ["x"], ["a"])], {}, (2,), "a", opset)
                            ).nodes[0].lipschitz == 0.25


@pytest.mark.parametrize("lo,hi", [(-0.5, 0.5), (0.0, 6.0), (None, 0.25), (-0.3, None)])
def test_clip_inputs_opset13(lo, hi):
    inits, ins = {}, ["x", "", ""]
    if lo is not None:
        inits["lo"], ins[1] = np.float32(lo), "lo"
    if hi is not None:
        inits["hi"], ins[2] = np.float32(hi), "hi"
    while not ins[-1]:
        ins.pop()
    g, a, *_ = check_model(_one("Clip", (2, 3, 3), opset=13, inits=inits, inputs=ins))
    assert _layer(a, "clip") == 1.0


def test_clip_min_above_max_is_constant_max():
    # ONNX: Min(max, Max(x, min)); every output is max (the attack finds ratio 0, so no check_model)
    node = helper.make_node("Clip", ["x", "lo", "hi"], ["a"], name="op")
    m = _build([node], {"lo": np.float32(0.7), "hi": np.float32(0.2)}, (4,), "a", opset=13)
    g = import_model(m)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(g.forward(x)[0], _ort(m, x))
    assert np.all(g.forward(x)[0] == np.float32(0.2)) and g.nodes[0].lipschitz == 1.0


def test_clip_attributes_before_opset11():
    node = helper.make_node("Clip", ["x"], ["a"], name="op", min=-0.25, max=0.5)
    m = _build([node], {}, (5,), "a", opset=10)
    g = import_model(m)
    x = np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5)
    np.testing.assert_array_equal(g.forward(x)[0], _ort(m, x))
    assert g.nodes[0].params == {"min": -0.25, "max": 0.5} and g.nodes[0].lipschitz == 1.0
    # attributes are no longer allowed since opset 11 (built without the checker)
    _refused(_build([node], {}, (5,), "a", opset=13, check=False), "op", "inputs, not attributes")


def test_clip_refusals():
    # a non-constant min (computed from x): refused, naming the Clip node
    nodes = [helper.make_node("ReduceMin", ["x"], ["m"], name="rmin", keepdims=0),
             helper.make_node("Clip", ["x", "m"], ["a"], name="clip_dyn")]
    _refused(head_model(nodes, {}, (2, 3, 3), "a", 18), "clip_dyn")
    node = helper.make_node("Clip", ["x", "lo"], ["a"], name="op")
    _refused(head_model([node], {"lo": np.zeros(2, np.float32)}, (2, 3, 3), "a", 18), "op", "scalar")
    _refused(head_model([node], {"lo": np.float32(np.nan)}, (2, 3, 3), "a", 18), "op", "NaN")


# ------------------------------------------------------------- MaxPool
def _share_count(attrs, hw, opset):
    """Independent oracle: run onnxruntime on every one-hot input and count the
    windows that output the 1 (zeros elsewhere): the largest count is c."""
    n = hw[0] * hw[1]
    m = _build([helper.make_node("MaxPool", ["x"], ["a"], **attrs)], {}, (1, *hw), "a", opset)
    y = _ort(m, np.eye(n, dtype=np.float32).reshape(n, 1, *hw))
    return int((y.reshape(n, -1) == 1.0).sum(axis=1).max())


@pytest.mark.parametrize("attrs,hw,opset,rule", [
    (dict(kernel_shape=[2, 2], strides=[2, 2]), (6, 6), 18, 1.0),
    (dict(kernel_shape=[3, 3], strides=[1, 1]), (6, 6), 18, 3.0),
    (dict(kernel_shape=[3, 3], strides=[3, 3], pads=[1, 1, 1, 1]), (7, 7), 18, 1.0),
    (dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), (7, 7), 18, 2.0),
    (dict(kernel_shape=[3, 2], strides=[1, 2]), (6, 6), 18, None),   # c = 3: sqrt rounded up
    (dict(kernel_shape=[2, 2], strides=[1, 1], dilations=[2, 1]), (6, 5), 18, 2.0),
    (dict(kernel_shape=[2, 3], strides=[2, 2], ceil_mode=1), (5, 6), 22, None),
    (dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"), (6, 5), 18, 2.0),
    (dict(kernel_shape=[6, 6], strides=[1, 1]), (6, 6), 18, 1.0),    # one window: no overlap left
])
def test_maxpool_rule_equals_window_count(attrs, hw, opset, rule):
    node = helper.make_node("MaxPool", ["x"], ["a"], name="op", **attrs)
    m = _build([node, helper.make_node("Flatten", ["a"], ["y"])], {}, (2, *hw), "y", opset)  # >= 2 outputs
    L = import_model(m).nodes[0].lipschitz
    c = _share_count(attrs, hw, opset)
    if rule is not None:
        assert L == rule == math.sqrt(c)
    assert math.sqrt(c) <= L <= up(math.sqrt(c))


def test_maxpool_overlapping_bound_and_attack():
    m = _one("MaxPool", (2, 6, 6), kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    g, a, lower, upper = check_model(m)
    assert _layer(a, "maxpool") == 3.0


def test_maxpool_non_overlapping_and_global():
    g, a, *_ = check_model(_one("MaxPool", (2, 6, 6), kernel_shape=[2, 2], strides=[2, 2]))
    assert _layer(a, "maxpool") == 1.0
    g, a, *_ = check_model(_one("GlobalMaxPool", (3, 4, 5)))
    assert _layer(a, "maxpool") == 1.0 and g.nodes[0].out_shape == (3, 1, 1)


def test_maxpool_refusals():
    k = dict(kernel_shape=[2, 2], strides=[2, 2])
    used = [helper.make_node("MaxPool", ["x"], ["a", "idx"], name="mp_idx", **k),
            helper.make_node("Cast", ["idx"], ["idxf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "idxf"], ["b"])]
    _refused(head_model(used, {}, (1, 4, 4), "b", 4), "mp_idx", "Indices")
    unused = [helper.make_node("MaxPool", ["x"], ["a", "idx"], name="mp", **k)]
    check_model(head_model(unused, {}, (1, 4, 4), "a", 4))  # an unused Indices output is fine
    so = [helper.make_node("MaxPool", ["x"], ["a"], name="mp_so", storage_order=1, **k)]
    _refused(head_model(so, {}, (1, 4, 4), "a", 4), "mp_so", "storage_order")
    valid = [helper.make_node("MaxPool", ["x"], ["a"], name="mp_v", kernel_shape=[3, 3], strides=[2, 2],
                              auto_pad="VALID", ceil_mode=1)]
    _refused(head_model(valid, {}, (1, 6, 6), "a", 9), "mp_v", "disagree")
    drop = [helper.make_node("MaxPool", ["x"], ["a"], name="mp_drop", kernel_shape=[2, 2], strides=[2, 2],
                             pads=[0, 0, 1, 1], ceil_mode=1)]  # ceil window would start in the padding
    _refused(head_model(drop, {}, (1, 4, 4), "a", 4, opset=18), "mp_drop", "right padding")
    old = [helper.make_node("MaxPool", ["x"], ["a"], name="mp8", dilations=[1, 1], **k)]
    _refused(_build(old + [helper.make_node("Flatten", ["a"], ["y"])], {}, (1, 4, 4), "y", 8, check=False),
             "mp8", "before opset 10")
    three_d = [helper.make_node("MaxPool", ["x"], ["a"], name="mp1d", kernel_shape=[2], strides=[2])]
    _refused(head_model(three_d, {}, (2, 6), "a", 6), "mp1d", "2-D")


# --------------------------------------------------------- AveragePool
def _pool_norm(op, attrs, hw, opset):
    """Independent oracle: the explicit matrix of the pooling map, column by
    column from onnxruntime on one-hot inputs; its largest singular value."""
    n = hw[0] * hw[1]
    m = _build([helper.make_node(op, ["x"], ["a"], **attrs)], {}, (1, *hw), "a", opset)
    y = _ort(m, np.eye(n, dtype=np.float32).reshape(n, 1, *hw)).reshape(n, -1).astype(np.float64)
    y[y != 0] = 1.0 / np.round(1.0 / y[y != 0])  # entries are float32(1/D): recover the exact 1/D
    return np.linalg.svd(y, compute_uv=False)[0], y.shape[1]


@pytest.mark.parametrize("attrs,hw,opset,exact,const_err", [
    (dict(kernel_shape=[2, 2], strides=[2, 2]), (6, 6), 18, True, 0.0),
    (dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1), (5, 5), 18, True, U64),
    (dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), (6, 6), 18, False, U64),
    (dict(kernel_shape=[3, 2], strides=[2, 1], ceil_mode=1, count_include_pad=1), (6, 5), 18, False, U64),
    (dict(kernel_shape=[2, 2], strides=[1, 1], dilations=[2, 1]), (5, 5), 19, True, 0.0),
    (dict(kernel_shape=[3, 3], strides=[1, 1], auto_pad="SAME_LOWER", count_include_pad=1), (4, 4), 18, True, U64),
])
def test_average_pool_is_a_bounded_conv(attrs, hw, opset, exact, const_err):
    truth, out_dim = _pool_norm("AveragePool", attrs, hw, opset)
    node = helper.make_node("AveragePool", ["x"], ["a"], name="op", **attrs)
    m = head_model([node], {}, (1, *hw), "a", out_dim, opset=opset)
    g, a, lower, upper = check_model(m)
    conv, div = g.nodes[0], g.nodes[1]
    assert isinstance(conv, LinearNode) and np.all(conv.op.kernel == 1.0) and isinstance(div, AffineNode)
    assert div.const_err == const_err
    assert a.body.value >= truth  # sound
    if exact:  # uniform divisor: the scale folds into the conv; the bound is the true norm
        assert a.body.value <= truth * (1 + 1e-9)


def test_global_average_pool():
    truth, _ = _pool_norm("GlobalAveragePool", {}, (4, 4), 18)
    assert truth == pytest.approx(0.25, rel=1e-7)  # one channel: ||mean|| = 1/sqrt(HW)
    g, a, *_ = check_model(_one("GlobalAveragePool", (3, 4, 4)))
    assert g.nodes[1].const_err == 0.0  # 1/16 is exact
    assert 0.25 <= a.body.value <= 0.25 * (1 + 1e-9)
    g, a, *_ = check_model(_one("GlobalAveragePool", (2, 3, 3)))
    assert g.nodes[1].const_err == U64  # 1/9 rounds: charged
    assert 1 / 3 <= a.body.value <= (1 / 3) * (1 + 1e-9)


def test_average_pool_refusals():
    dil = [helper.make_node("AveragePool", ["x"], ["a"], name="ap_d", kernel_shape=[2, 2], dilations=[2, 2])]
    _refused(_build(dil + [helper.make_node("Flatten", ["a"], ["y"])], {}, (1, 5, 5), "y", 18, check=False),
             "ap_d", "before opset 19")
    same = [helper.make_node("AveragePool", ["x"], ["a"], name="ap_s", kernel_shape=[1, 1], strides=[3, 3],
                             auto_pad="SAME_UPPER")]
    _refused(head_model(same, {}, (1, 6, 6), "a", 4), "ap_s", "negative padding")


# ----------------------------------------------------- torch exporters
def _export(module, shape):
    torch = pytest.importorskip("torch")
    f = io.BytesIO()
    try:
        torch.onnx.export(module.eval(), torch.zeros(1, *shape), f, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    except ImportError as e:  # pragma: no cover - the exporter needs a package that is not installed
        pytest.skip(f"torch.onnx.export (legacy exporter) unavailable: {type(e).__name__}: {e}")
    return onnx.load_from_string(f.getvalue())


def _check_torch(net, m, in_shape):
    """check_model on the export, and the IR against the torch module itself."""
    import torch

    g, a, _, _ = check_model(m)
    x = torch.rand(4, *in_shape) * 2 - 1
    np.testing.assert_allclose(g.forward(x.numpy())[0], net(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    return g, a


def test_torch_export_activations_and_pools():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(3, stride=1, padding=1),
                        nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.PReLU(4), nn.Hardtanh(-0.5, 0.5),
                        nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    m = _export(net, (2, 6, 6))
    ops = {n.op_type for n in m.graph.node}
    assert {"LeakyRelu", "MaxPool", "Tanh", "AveragePool", "PRelu", "Clip", "Sigmoid"} <= ops
    g, a = _check_torch(net, m, (2, 6, 6))
    assert _layer(a, "maxpool") == 3.0 and _layer(a, "sigmoid") == 0.25 and _layer(a, "tanh") == 1.0
    assert _layer(a, "leaky_relu") == 1.0 and _layer(a, "clip") == 1.0
    assert _layer(a, "prelu") == max(1.0, float(net[6].weight.detach().abs().max()))


def test_torch_export_ceil_mode_pools():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(1)
    net = nn.Sequential(nn.MaxPool2d(2, stride=2, ceil_mode=True), nn.ReLU6(),
                        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
                        nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    m = _export(net, (2, 7, 7))
    g, a = _check_torch(net, m, (2, 7, 7))
    assert _layer(a, "maxpool") == 1.0


def test_torch_export_global_pools():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(2)
    # the legacy exporter writes AdaptiveMaxPool2d(1) as a MaxPool over the whole input
    for pool, keys in ((nn.AdaptiveAvgPool2d(1), {"GlobalAveragePool"}),
                       (nn.AdaptiveMaxPool2d(1), {"GlobalMaxPool", "MaxPool"})):
        net = nn.Sequential(nn.Conv2d(2, 4, 3), pool, nn.Flatten(), nn.Linear(4, 3))
        m = _export(net, (2, 5, 5))
        assert keys & {n.op_type for n in m.graph.node}
        _check_torch(net, m, (2, 5, 5))
