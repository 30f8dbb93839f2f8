"""Branching graphs: nonlinear residuals, linear residual fusion, concat, Sub,
Split branches; and refusal of graphs that are not series-parallel."""

import numpy as np
import pytest
from onnx import helper

from certlib.errors import UnsupportedModelError
from certlib.ir.graph import ParallelNode
from certlib.ir.compose import analyze, conv_matrix, fuse_linear_branches
from certlib.onnx.importer import import_model
from op_harness import check_model, head_model


def _body(g):
    return analyze(g, "exact").body.value


def test_nonlinear_residual_is_one_plus_branch():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Add", ["x", "r"], ["s"], name="residual")]
    m = head_model(nodes, {}, (1, 4, 4), "s", 16)
    g, a, lower, upper = check_model(m)
    assert isinstance(g.nodes[0], ParallelNode) and g.nodes[0].merge == "add"
    assert a.body.value == pytest.approx(2.0)   # 1 (identity) + 1 (ReLU), rounded up
    assert a.body.value >= 2.0


def test_linear_residual_is_fused_into_one_conv():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2, 2, 3, 3)) * 0.3
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["x", "c"], ["s"], name="residual"),
             helper.make_node("Relu", ["s"], ["r"], name="relu")]
    m = head_model(nodes, {"w": w}, (2, 5, 5), "r", 50)
    g, a, lower, upper = check_model(m)
    op, _ = fuse_linear_branches(g.nodes[0])
    true_fused = np.linalg.svd(conv_matrix(op), compute_uv=False)[0]
    conv_alone = np.linalg.svd(conv_matrix(g.nodes[0].branches[1][0].op), compute_uv=False)[0]
    assert a.body.value >= true_fused
    assert a.body.value <= true_fused * (1 + 1e-9)   # exact up to rounding margins
    assert a.body.value < 1 + conv_alone              # fusion is tighter than 1 + ||K||


def test_concat_of_branches_is_root_sum_of_squares():
    nodes = [helper.make_node("Mul", ["x", "three"], ["a"], name="times3"),
             helper.make_node("Relu", ["x"], ["b"], name="relu"),
             helper.make_node("Mul", ["b", "four"], ["b4"], name="times4"),
             helper.make_node("Concat", ["a", "b4"], ["c"], name="cat", axis=1)]
    m = head_model(nodes, {"three": np.array(3.0), "four": np.array(4.0)}, (1, 3, 3), "c", 18)
    g, a, lower, upper = check_model(m)
    assert a.body.value == pytest.approx(5.0) and a.body.value >= 5.0


def test_sub_of_branches_and_split_branches():
    nodes = [helper.make_node("Split", ["x"], ["p", "q"], name="split", axis=1, num_outputs=2),
             helper.make_node("Relu", ["p"], ["rp"], name="relu_p"),
             helper.make_node("Sub", ["rp", "q"], ["d"], name="diff")]
    m = head_model(nodes, {}, (4, 2, 2), "d", 8)
    g, a, lower, upper = check_model(m)
    # each branch is a slice (<= 1), the Sub sums them
    assert a.body.value == pytest.approx(2.0)


def test_nested_blocks():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu1"),
             helper.make_node("Relu", ["r"], ["r2"], name="relu2"),
             helper.make_node("Add", ["r", "r2"], ["s1"], name="inner"),
             helper.make_node("Add", ["x", "s1"], ["s2"], name="outer")]
    m = head_model(nodes, {}, (1, 3, 3), "s2", 9)
    g, a, _, _ = check_model(m)
    assert a.body.value == pytest.approx(3.0)   # 1 + (1 * (1 + 1))


def test_not_series_parallel_is_refused_with_the_merge_named():
    nodes = [helper.make_node("Relu", ["x"], ["p"], name="p"),
             helper.make_node("Relu", ["x"], ["q"], name="q"),
             helper.make_node("Add", ["p", "q"], ["s1"], name="s1"),
             helper.make_node("Relu", ["p"], ["r"], name="r"),
             helper.make_node("Add", ["s1", "r"], ["s2"], name="s2")]
    m = head_model(nodes, {}, (1, 3, 3), "s2", 9)
    with pytest.raises(UnsupportedModelError, match="series-parallel"):
        import_model(m)


def test_product_of_branches_is_refused():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["x", "r"], ["s"], name="square")]
    m = head_model(nodes, {}, (1, 3, 3), "s", 9)
    with pytest.raises(UnsupportedModelError) as ei:
        import_model(m)
    assert any(it.name == "square" for it in ei.value.items)


def test_proof_refuses_branching_models_clearly(tmp_path):
    import onnx

    from certlib.certificate import build_certificate
    from certlib.errors import UsageError

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Add", ["x", "r"], ["s"], name="residual")]
    p = tmp_path / "res.onnx"
    onnx.save(head_model(nodes, {}, (1, 4, 4), "s", 16), p)

    class Rep:  # only .sound/.result are read before the refusal
        sound, result = True, object()

    with pytest.raises(UsageError, match="residual"):
        build_certificate(p, Rep(), None, "digits")


def test_input_normalisation_is_folded_into_the_first_conv():
    """(x - mean) / std then a conv is bounded as ||K diag(1/std)||, not
    max(1/std) * ||K|| (proofs/normalisation.md); --proof keeps them separate."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 2, 3, 3))
    std = np.array([0.1, 1.0]).reshape(1, 2, 1, 1)
    nodes = [helper.make_node("Sub", ["x", "mean"], ["a"], name="sub"),
             helper.make_node("Div", ["a", "std"], ["b"], name="div"),
             helper.make_node("Conv", ["b", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    m = head_model(nodes, {"mean": np.full((1, 2, 1, 1), 0.5), "std": std, "w": w}, (2, 4, 4), "c", 48)
    g, a, lower, upper = check_model(m)
    conv = next(n for n in g.nodes if n.kind == "linear").op
    scaled = conv_matrix(conv) / np.repeat(np.asarray(std, dtype=np.float32).reshape(-1).astype(np.float64), 16)[None, :]
    exact = np.linalg.svd(scaled, compute_uv=False)[0]
    assert exact <= a.body.value <= exact * (1 + 1e-9)
    separate = analyze(g, "exact", fold_inputs=False).body.value
    inv = 1.0 / float(np.float32(0.1))
    assert separate >= inv * np.linalg.svd(conv_matrix(conv), compute_uv=False)[0] * (1 - 1e-12)
    assert a.body.value < separate


def test_concat_of_selections_is_sqrt_of_max_copies():
    """A channel shuffle (strided channel slices concatenated) is a permutation:
    bound exactly 1, not sqrt(4); a wrap pad copies boundary rows twice: sqrt(2)."""
    shuffle = [helper.make_node("Slice", ["x", f"s{i}", "big", "ax1", "st4"], [f"c{i}"], name=f"slice{i}")
               for i in range(4)]
    shuffle.append(helper.make_node("Concat", [f"c{i}" for i in range(4)], ["sh"], name="shuffle", axis=1))
    ints = {**{f"s{i}": [i] for i in range(4)}, "big": [100], "ax1": [1], "st4": [4]}
    m = head_model(shuffle, {}, (8, 2, 2), "sh", 32, int_inits=ints)
    g, a, lower, upper = check_model(m)
    assert 1.0 <= a.body.value <= 1.0 + 1e-12   # exactly 1, rounded up once per stage

    wrap = [helper.make_node("Slice", ["x", "last", "big", "ax2"], ["top"], name="top"),
            helper.make_node("Slice", ["x", "zero", "one", "ax2"], ["bottom"], name="bottom"),
            helper.make_node("Concat", ["top", "x", "bottom"], ["w"], name="wrap", axis=2)]
    ints = {"last": [-1], "big": [100], "ax2": [2], "zero": [0], "one": [1]}
    m = head_model(wrap, {}, (1, 3, 3), "w", 15, int_inits=ints)
    g, a, lower, upper = check_model(m)
    assert a.body.value == pytest.approx(np.sqrt(2)) and a.body.value >= np.sqrt(2)


def test_neg_and_relu_concat():
    """MaxMin as deel-torchlip writes it: concat(relu(x), relu(-x)) is
    1-Lipschitz (CReLU rule), not sqrt 2 (root-sum-of-squares)."""
    nodes = [helper.make_node("Relu", ["x"], ["p"], name="pos"),
             helper.make_node("Neg", ["x"], ["n"], name="neg"),
             helper.make_node("Relu", ["n"], ["q"], name="negpart"),
             helper.make_node("Concat", ["p", "q"], ["c"], name="cat", axis=1)]
    g, a, lower, upper = check_model(head_model(nodes, {}, (2, 2, 2), "c", 16))
    assert 1.0 <= a.body.value <= 1.0 + 1e-12
    # the rule is attained: perturb one positive entry
    x = np.zeros((1, 2, 2, 2))
    x[0, 0, 0, 0] = 1.0
    f = g.nodes[0].apply(__import__("torch").as_tensor(x), False)[0].numpy()
    assert np.linalg.norm(f) == 1.0


def test_sum_of_three_branches():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["x", "two"], ["d"], name="double"),
             helper.make_node("Sum", ["x", "r", "d"], ["s"], name="sum3")]
    g, a, _, _ = check_model(head_model(nodes, {"two": np.array(2.0)}, (1, 3, 3), "s", 9))
    assert a.body.value == pytest.approx(4.0) and a.body.value >= 4.0   # 1 + 1 + 2


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_elementwise_max_min_of_branches(op):
    nodes = [helper.make_node("Mul", ["x", "three"], ["a"], name="times3"),
             helper.make_node("Mul", ["x", "four"], ["b"], name="times4"),
             helper.make_node(op, ["a", "b"], ["m"], name="merge")]
    g, a, _, _ = check_model(head_model(nodes, {"three": np.array(3.0), "four": np.array(-4.0)}, (1, 3, 3), "m", 9))
    assert g.nodes[0].merge == op.lower()
    assert a.body.value == pytest.approx(5.0) and a.body.value >= 5.0
