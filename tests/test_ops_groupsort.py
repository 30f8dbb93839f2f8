"""GroupSort-2 / MinMax in the forms exporters emit (Slice halves + Max + Min
+ Concat; Reshape + ReduceMax/ReduceMin + Concat; TopK), recognised as one
1-Lipschitz activation only when the result is exactly a sort of pairs:
each model reproduces onnxruntime and is bounded soundly (tests/op_harness.py).
Proof: proofs/index_ops.md section 3."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from certlib.errors import UnsupportedModelError
from certlib.ir.graph import ActivationNode, ParallelNode
from certlib.onnx.importer import import_model
from op_harness import check_model
from test_ops_shape import BIG, _export, _model


# ------------------------------------------------------- GroupSort-2 / MinMax
def _act(g):
    nodes = g if isinstance(g, list) else g.nodes
    acts = [n for n in nodes if isinstance(n, ActivationNode)]
    assert len(acts) == 1, [type(n).__name__ for n in nodes]
    return acts[0].activation


def _halves(shape, axis, order, opset=18):
    d = shape[axis % (len(shape) + 1) - 1]
    ins = lambda k: ["x", f"s{k}", f"e{k}", "ax"]  # noqa: E731
    nodes = [helper.make_node("Slice", ins(0), ["a"], name="lo_half"),
             helper.make_node("Slice", ins(1), ["b"], name="hi_half"),
             helper.make_node("Max", ["a", "b"], ["mx"], name="max"),
             helper.make_node("Min", ["b", "a"], ["mn"], name="min"),
             helper.make_node("Concat", ["mx", "mn"] if order == "maxmin" else ["mn", "mx"], ["o"], name="cat",
                              axis=axis)]
    inits = {"s0": np.array([0]), "e0": np.array([d // 2]), "s1": np.array([d // 2]), "e1": np.array([BIG]),
             "ax": np.array([axis])}
    return _model(nodes, inits, shape, shape, opset=opset)


@pytest.mark.parametrize("shape,axis,order,act", [
    ((4, 3, 3), 1, "maxmin", "minmax"),
    ((4, 3, 3), 1, "minmax", "minmax_rev"),
    ((6,), -1, "maxmin", "minmax"),              # flat features
    ((3, 2, 4), 3, "minmax", "minmax_pairs_rev"),  # halves of the last axis: pairs of a (6, 2)-view
])
def test_minmax_slice_halves(shape, axis, order, act):
    g, a, lower, upper = check_model(_halves(shape, axis, order))
    assert _act(g) == act and a.body.value <= 1 + 1e-12


def test_groupsort_inside_a_residual_block():
    m = _halves((4, 3, 3), 1, "maxmin")
    m.graph.node[4].output[0] = "gs"
    m.graph.node.insert(5, helper.make_node("Add", ["x", "gs"], ["o"], name="residual"))
    g, a, _, _ = check_model(m)
    assert isinstance(g.nodes[0], ParallelNode) and _act(g.nodes[0].branches[1]) == "minmax"
    assert 2.0 <= a.body.value <= 2.0 * (1 + 1e-12)   # 1 + L(minmax)


def _reduce_form(view, axis, keepdims, order, opset=18, shape=(4, 3, 3), out=None):
    """Reshape to ``view`` + ReduceMax/ReduceMin over ``axis`` + Concat (+ Unsqueeze) + Reshape back."""
    kw = {} if opset >= 18 else {"axes": [axis]}
    red_in = (lambda: ["v", "rax"]) if opset >= 18 else (lambda: ["v"])
    nodes = [helper.make_node("Reshape", ["x", "view"], ["v"], name="view"),
             helper.make_node("ReduceMax", red_in(), ["mx"], name="rmax", keepdims=keepdims, **kw),
             helper.make_node("ReduceMin", red_in(), ["mn"], name="rmin", keepdims=keepdims, **kw)]
    parts = ["mx", "mn"]
    if not keepdims:
        nodes += [helper.make_node("Unsqueeze", [p, "uax"], [p + "_u"], name=p + "_u") for p in parts]
        parts = [p + "_u" for p in parts]
    nodes += [helper.make_node("Concat", parts if order == "maxmin" else parts[::-1], ["c"], name="cat", axis=axis),
              helper.make_node("Reshape", ["c", "back"], ["o"], name="back")]
    out = out or shape
    inits = {"view": np.array(view), "back": np.array([-1, *out]), "rax": np.array([axis]),
             "uax": np.array([axis])}
    return _model(nodes, inits, shape, out, opset=opset)


@pytest.mark.parametrize("view,axis,keepdims,order,opset,act", [
    ([-1, 2, 2, 3, 3], 2, 1, "maxmin", 18, "minmax_pairs"),       # adjacent channels, axes input
    ([-1, 2, 2, 3, 3], -3, 1, "minmax", 13, "minmax_pairs_rev"),  # axes attribute
    ([-1, 2, 2, 3, 3], 2, 0, "minmax", 18, "minmax_pairs_rev"),   # keepdims=0 + Unsqueeze (torch.stack)
    ([0, 2, 2, 9], 1, 1, "maxmin", 18, "minmax"),                 # channel halves
])
def test_groupsort_reduce_forms(view, axis, keepdims, order, opset, act):
    g, a, _, _ = check_model(_reduce_form(view, axis, keepdims, order, opset))
    assert _act(g) == act and len(g.nodes) == 3   # activation, Flatten, head


def _topk_form(k_from_shape=False, largest=1, k=2, view=(-1, 2, 2, 3, 3), opset=18):
    nodes = [helper.make_node("Reshape", ["x", "view"], ["v"], name="view")]
    if k_from_shape:  # the dynamic-shape export: k = Shape(v)[axis]
        nodes += [helper.make_node("Shape", ["v"], ["sh"], name="shape"),
                  helper.make_node("Gather", ["sh", "gi"], ["kk"], name="gather", axis=0),
                  helper.make_node("Reshape", ["kk", "one"], ["k"], name="k")]
    nodes += [helper.make_node("TopK", ["v", "k"], ["vals", "idx"], name="topk", axis=2, largest=largest),
              helper.make_node("Reshape", ["vals", "back"], ["o"], name="back")]
    inits = {"view": np.array(view), "back": np.array([-1, 4, 3, 3])}
    inits.update({"gi": np.array(2), "one": np.array([1])} if k_from_shape else {"k": np.array([k])})
    return _model(nodes, inits, (4, 3, 3), (4, 3, 3), opset=opset)


@pytest.mark.parametrize("k_from_shape,largest,act", [
    (False, 1, "minmax_pairs"), (False, 0, "minmax_pairs_rev"), (True, 1, "minmax_pairs")])
def test_groupsort_topk_forms(k_from_shape, largest, act):
    g, _, _, _ = check_model(_topk_form(k_from_shape, largest))
    assert _act(g) == act and len(g.nodes) == 3


def test_groupsort_forms_that_are_not_pair_sorts_are_refused():
    # groups of 3 sorted by max/min are not a GroupSort-2 (and drop the middle)
    m = _reduce_form([-1, 2, 3, 2, 3], 2, 1, "maxmin", shape=(6, 2, 3), out=(4, 2, 3))
    with pytest.raises(UnsupportedModelError, match="axis of size 3"):
        import_model(m)
    with pytest.raises(UnsupportedModelError, match=r"\[view, topk, back\]: TopK with k != the size 2 of its axis"):
        import_model(_topk_form(k=1))
    # the two Slices are not the halves of the axis
    nodes = [helper.make_node("Slice", ["x", "s0", "e0", "ax"], ["a"], name="first"),
             helper.make_node("Slice", ["x", "s1", "e1", "ax"], ["b"], name="second"),
             helper.make_node("Max", ["a", "b"], ["mx"], name="max"),
             helper.make_node("Min", ["a", "b"], ["mn"], name="min"),
             helper.make_node("Concat", ["mx", "mn"], ["o"], name="cat", axis=1)]
    m = _model(nodes, {"s0": np.array([0]), "e0": np.array([2]), "s1": np.array([3]), "e1": np.array([5]),
                       "ax": np.array([1])}, (6, 2), (4, 2))
    with pytest.raises(UnsupportedModelError, match="halves"):
        import_model(m)


def test_groupsort_with_an_intermediate_used_elsewhere_is_not_matched():
    """max is also added to the output: the form is not a closed activation,
    so it is not recognised (and the bare ReduceMax/ReduceMin are refused)."""
    m = _reduce_form([-1, 2, 2, 3, 3], 2, 1, "maxmin")
    m.graph.node.insert(4, helper.make_node("Add", ["c", "mx"], ["c2"], name="leak"))
    m.graph.node[5].input[0] = "c2"
    onnx.checker.check_model(m)
    with pytest.raises(UnsupportedModelError) as ei:
        import_model(m)
    assert {"rmax", "rmin"} & {it.name for it in ei.value.items}


# ------------------------------------------------ torch.onnx.export'ed forms
C, H, W = 4, 3, 3


class _Pairs(torch.nn.Module):
    """GroupSort-2 as Lipschitz libraries write it."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "deel":   # deel-torchlip's group_sort(x, 2), traced sizes: min first
            shape = x.shape[:1] + (x.shape[1] // 2, 2) + x.shape[2:]
            t = x.view(shape)
            return torch.cat([torch.min(t, 2, keepdim=True)[0], torch.max(t, 2, keepdim=True)[0]], dim=2).view(x.shape)
        if self.how == "halves":  # the chunk / slice form: channel halves
            a, b = x[:, :C // 2], x[:, C // 2:]
            return torch.cat([torch.max(a, b), torch.min(a, b)], dim=1)
        t = x.view(-1, C // 2, 2, H, W)   # Python-int sizes: the view targets are constants
        if self.how == "cat":
            y = torch.cat([t.min(dim=2, keepdim=True)[0], t.max(dim=2, keepdim=True)[0]], dim=2)
        elif self.how == "stack":
            y = torch.stack([t.max(dim=2)[0], t.min(dim=2)[0]], dim=2)
        else:
            y = torch.sort(t, dim=2, descending=self.how == "sort")[0]
        return y.reshape(-1, C, H, W)


def _net(how):
    return torch.nn.Sequential(_Pairs(how), torch.nn.Flatten(), torch.nn.Linear(C * H * W, 3))


EXPECT = {"cat": "minmax_pairs_rev", "stack": "minmax_pairs", "sort": "minmax_pairs", "sort_asc": "minmax_pairs_rev",
          "halves": "minmax", "deel": "minmax_pairs_rev"}


@pytest.mark.parametrize("how", ["cat", "halves", "sort", "sort_asc", "stack"])
def test_groupsort_torch_legacy_export(how):
    try:
        m = _export(_net(how), torch.randn(2, C, H, W), dynamo=False)
    except Exception as e:  # pragma: no cover - depends on the installed torch
        pytest.skip(f"legacy torch.onnx.export unusable here: {type(e).__name__}: {e}")
    g, a, lower, upper = check_model(m)
    assert _act(g) == EXPECT[how]


@pytest.mark.parametrize("how", ["deel", "sort"])
def test_groupsort_torch_dynamo_export(how):
    """The dynamo exporter with a dynamic batch: deel-torchlip's own code (its
    traced view sizes become constants there) and torch.sort (k exported as
    Shape(view)[2])."""
    try:
        m = _export(_net(how), torch.randn(2, C, H, W), dynamo=True)
    except Exception as e:  # pragma: no cover - depends on the installed torch/onnxscript
        pytest.skip(f"dynamo torch.onnx.export unusable here: {type(e).__name__}: {e}")
    g, _, _, _ = check_model(m)
    assert _act(g) == EXPECT[how]


@pytest.mark.parametrize("largest", [1, 0])
def test_full_sort_of_groups_topk(largest):
    """TopK with k = the axis size (sorted) sorts each group: GroupSort-g,
    1-Lipschitz (sorting is an l2 contraction, rearrangement inequality)."""
    nodes = [helper.make_node("Reshape", ["x", "view"], ["v"], name="view"),
             helper.make_node("TopK", ["v", "k"], ["t", "ti"], name="topk", axis=2, largest=largest),
             helper.make_node("Reshape", ["t", "back"], ["o"], name="back")]
    m = _model(nodes, {"view": np.array([-1, 3, 4, 3]), "back": np.array([-1, 12, 3]), "k": np.array([4])},
               (12, 3), (12, 3))
    g, a, lower, upper = check_model(m)
    act = next(n for n in g.nodes if n.kind == "activation")
    assert act.activation == "groupsort" and act.params["g"] == 4 and act.lipschitz == 1.0
    assert 1.0 <= a.body.value <= 1.0 + 1e-12   # exactly 1, rounded up once per stage
