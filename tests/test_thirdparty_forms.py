"""Third-party export forms (proofs/thirdparty_forms.md): legacy circular
padding (Slice + Concat) as a wrap pad, centering (ReduceMean + Sub) as an
exact projection, l2-norm pooling with its window-overlap rule.  Each rule is
checked against an explicit matrix or exact arithmetic (fractions / mpmath),
and each import against onnxruntime."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from onnx import helper

from certlib.ir.norm_ops import CenterNode, L2PoolNode
from certlib.onnx.importer import import_model
from certlib.onnx.ops.registry import Skip, sample_axis
from op_harness import check_model, head_model


def _matrix(node, shape):
    n = int(np.prod(shape))
    e = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    out, _ = node.apply(e, False)
    return out.reshape(n, -1).numpy().T


# ------------------------------------------------------------------ centering
@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4),
       axes=st.sampled_from([(0,), (1,), (2,), (1, 2), (0, 1, 2)]), seed=st.integers(0, 10 ** 6))
def test_center_is_an_exact_projection(c, h, w, axes, seed):
    """P = I - mean-projection: symmetric and idempotent in exact arithmetic
    (so ||P|| <= 1, = 1 unless every group has one entry); the node's matrix
    is P; its rounding-error bound covers the float64 evaluation against the
    exact (Fraction) result."""
    shape = (c, h, w)
    node = CenterNode("c", "ReduceMean+Sub", shape, shape, lipschitz=1.0, params={"axes": list(axes)})
    M = _matrix(node, shape)
    n = node.group_size()
    # exact P from the group structure
    idx = np.arange(M.shape[0]).reshape(shape)
    keep = [a for a in range(3) if a not in axes]
    P = [[Fraction(0)] * M.shape[0] for _ in range(M.shape[0])]
    groups = {}
    for pos in np.ndindex(*shape):
        groups.setdefault(tuple(pos[a] for a in keep), []).append(int(idx[pos]))
    for g in groups.values():
        for i in g:
            for j in g:
                P[i][j] = (1 if i == j else 0) - Fraction(1, n)
    m = len(P)
    assert all(P[i][j] == P[j][i] for i in range(m) for j in range(m))
    P2 = [[sum(P[i][k] * P[k][j] for k in range(m)) for j in range(m)] for i in range(m)]
    assert P2 == P
    np.testing.assert_allclose(M, np.array(P, dtype=float), atol=1e-15)
    s = np.linalg.svd(M, compute_uv=False)[0]
    assert s <= 1 + 1e-12 and (n == 1 or s >= 1 - 1e-12)
    # rounding: the bound covers |computed - exact|
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, *shape)) * 10.0 ** rng.integers(-5, 5)
    y, err = node.apply(torch.as_tensor(x), True)
    for b in range(2):
        xf = [Fraction(float(v)) for v in x[b].ravel()]
        exact = [sum(P[i][j] * xf[j] for j in range(m)) for i in range(m)]
        d = math.sqrt(float(sum((Fraction(float(v)) - e) ** 2 for v, e in zip(y[b].numpy().ravel(), exact))))
        assert d <= float(err[b]), (d, float(err[b]))


def test_center_import_and_refusals():
    """x - ReduceMean(x) imports as one CenterNode (bound 1, onnxruntime
    agrees, the attack stays below the bound); the batch axis, keepdims=0 and
    an empty axis list are refused."""
    def model(axes, keep=1, opset=17):
        nodes = [helper.make_node("ReduceMean", ["x"], ["m"], name="rm", axes=axes, keepdims=keep),
                 helper.make_node("Sub", ["x", "m"], ["z"], name="sub")]
        return head_model(nodes, {}, (2, 3, 3), "z", 18, opset=opset)

    g, a, lower, upper = check_model(model([-2, -1]))
    assert any(isinstance(n, CenterNode) for n in g.nodes)
    assert [lb.bound for lb in a.layers if lb.op == "center"] == [1.0]
    for bad in ([0, 2, 3], [-4]):
        with pytest.raises(Exception, match="batch axis"):
            import_model(model(bad))
    with pytest.raises(Exception):
        import_model(model([2, 3], keep=0))


def test_sample_axis():
    assert sample_axis(-1, (3, 5, 7)) == 2 and sample_axis(1, (3, 5, 7)) == 0
    for bad in (0, -4, 4, -5):
        with pytest.raises(Skip):
            sample_axis(bad, (3, 5, 7))


# ------------------------------------------------------------------ l2 pool
def _l2_model(k, s, c, form):
    """LPPool(2) export forms: Pow(2), Sign/Abs/[Relu]/Mul or not, Mul(c) or
    not, Pow(0.5) or Sqrt."""
    sq = helper.make_node("Pow", ["x", "two"], ["sq"], name="pow")
    nodes = [sq, helper.make_node("AveragePool", ["sq"], ["a"], name="pool", kernel_shape=[k, k],
                                  strides=[s, s])]
    t = "a"
    if form[1]:
        nodes += [helper.make_node("Sign", ["a"], ["sg"]), helper.make_node("Abs", ["a"], ["ab"])]
        if form[0]:
            nodes.append(helper.make_node("Relu", ["ab"], ["rl"]))
        nodes.append(helper.make_node("Mul", ["rl" if form[0] else "ab", "sg"], ["sm"]))
        t = "sm"
    if c is not None:
        nodes.append(helper.make_node("Mul", [t, "c"], ["sc"]))
        t = "sc"
    nodes.append(helper.make_node("Pow", [t, "half"], ["z"], name="root") if form[2]
                 else helper.make_node("Sqrt", [t], ["z"], name="root"))
    out = (6 - k) // s + 1
    inits = {"two": np.array(2.0), "half": np.array(0.5), "c": np.array(c if c is not None else 1.0)}
    return head_model(nodes, inits, (2, 6, 6), "z", 2 * out * out)


@settings(max_examples=12, deadline=None)
@given(k=st.integers(1, 3), s=st.integers(1, 3), c=st.sampled_from([None, 4.0, 2.5]),
       form=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_l2pool_import_and_overlap_rule(k, s, c, form):
    """Every export form imports as one L2PoolNode; onnxruntime agrees; its
    bound is sqrt(c m / k^2), m = (largest number of windows holding one
    entry per axis)^2, and that bound is attained (one entry moved from 0:
    every window holding it grows by sqrt(c / k^2) |t|), so it is exact."""
    g, a, lower, upper = check_model(_l2_model(k, s, c, form), attack_steps=30)
    pools = [n for n in g.nodes if isinstance(n, L2PoolNode)]
    assert len(pools) == 1
    node = pools[0]
    share = max(int(np.bincount((np.arange((6 - k) // s + 1)[:, None] * s + np.arange(k)).ravel()).max()), 0)
    cc = 1.0 if c is None else c
    L2 = Fraction(cc) * share * share / (k * k)
    assert Fraction(node.lipschitz) ** 2 >= L2                            # sound
    assert node.lipschitz <= math.sqrt(float(L2)) * (1 + 1e-15)           # no slack
    # attained: move the most shared entry from 0 to t
    out = (6 - k) // s + 1
    cnt = np.bincount((np.arange(out)[:, None] * s + np.arange(k)).ravel(), minlength=6)
    i = int(np.argmax(cnt))
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    x[0, 0, i, i] = 0.75
    y, _ = node.apply(x, False)
    ratio = float(torch.linalg.vector_norm(y)) / 0.75
    assert ratio == pytest.approx(math.sqrt(float(L2)), rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10 ** 6), scale=st.integers(-545, 500))
@example(seed=0, scale=-540)   # squares underflow
@example(seed=1, scale=-520)
def test_l2pool_rounding_bound(seed, scale):
    """The node's error bound covers |float64 result - exact result| (mpmath,
    80 digits), tiny (underflowing squares) and huge inputs included."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, 1, 4, 4)) * 2.0 ** scale
    node = L2PoolNode("p", "LpPool(2)", (1, 4, 4), (1, 2, 2), lipschitz=1.0,
                      params={"kernel": (2, 2), "strides": (2, 2), "c": 4.0})
    y, err = node.apply(torch.as_tensor(x), True)
    mpmath.mp.dps = 80
    d2 = mpmath.mpf(0)
    for i in range(2):
        for j in range(2):
            w = x[0, 0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].ravel()
            exact = mpmath.sqrt(4 * sum(mpmath.mpf(float(v)) ** 2 for v in w) / 4)
            d2 += (mpmath.mpf(float(y[0, 0, i, j])) - exact) ** 2
    assert float(mpmath.sqrt(d2)) <= float(err[0])


def test_l2pool_refuses_padding():
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("AveragePool", ["sq"], ["a"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Sqrt", ["a"], ["z"])]
    m = head_model(nodes, {"two": np.array(2.0)}, (1, 4, 4), "z", 9)
    with pytest.raises(Exception, match="padding"):
        import_model(m)


# ------------------------------------------------------------ wrap concat
def _wrap_model(kernel, b, e, order=(2, 3), extra_slice=False):
    """Slice + Concat wrap padding of H then W (torch's legacy circular
    export), then a valid stride-1 conv."""
    big = 2 ** 62
    nodes, t = [], "x"
    ints = {}
    for k, ax in enumerate(order):
        ints[f"ax{k}"] = [ax]
        ints[f"tb{k}"], ints[f"te{k}"] = [-b], [big]
        ints[f"hb{k}"], ints[f"he{k}"] = [0], [e + (1 if extra_slice else 0)]
        parts = [t]
        if b:
            nodes.append(helper.make_node("Slice", [t, f"tb{k}", f"te{k}", f"ax{k}"], [f"tail{k}"]))
            parts.insert(0, f"tail{k}")
        if e or extra_slice:
            nodes.append(helper.make_node("Slice", [t, f"hb{k}", f"he{k}", f"ax{k}"], [f"head{k}"]))
            parts.append(f"head{k}")
        nodes.append(helper.make_node("Concat", parts, [f"p{k}"], axis=ax, name=f"pad{k}"))
        t = f"p{k}"
    nodes.append(helper.make_node("Conv", [t, "w"], ["z"], name="conv"))
    C, _, kh, kw = kernel.shape
    oh, ow = 5 + b + e + (1 if extra_slice else 0) - kh + 1, 5 + b + e + (1 if extra_slice else 0) - kw + 1
    return head_model(nodes, {"w": kernel}, (kernel.shape[1], 5, 5), "z", C * oh * ow, int_inits=ints)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10 ** 6), kb=st.sampled_from([(3, 1, 1), (3, 2, 0), (2, 0, 1), (4, 2, 1)]),
       order=st.sampled_from([(2, 3), (3, 2), (-2, -1)]))
def test_wrap_concat_is_one_circular_conv(seed, kb, order):
    """Slice + Concat padding of both axes imports as one wrap pad, and wrap
    pad + conv is bounded as one circular convolution: the bound is >= the
    norm of the explicit matrix of the whole map and within 1e-9 of it (the
    sqrt(2)-per-axis copy rule would give up to 2x)."""
    k, b, e = kb
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, 2, k, k))
    g, a, lower, upper = check_model(_wrap_model(w, b, e, order), attack_steps=20)
    conv_lb = [lb for lb in a.layers if lb.name == "conv"]
    assert len(conv_lb) == 1 and "circular" in conv_lb[0].method
    n = 2 * 25
    pad, conv = g.nodes[0], g.nodes[1]
    E = torch.eye(n, dtype=torch.float64).reshape(n, 2, 5, 5)
    y, _ = conv.apply(pad.apply(E, False)[0], False)
    true = np.linalg.svd(y.reshape(n, -1).numpy(), compute_uv=False)[0]
    assert true <= conv_lb[0].bound <= true * (1 + 1e-9)


def test_wrap_concat_not_head_tail_is_not_a_wrap():
    """A head Slice one entry too long is not a wrap pad: no circular fold;
    the import still reproduces onnxruntime and the bound stays sound."""
    w = np.random.default_rng(0).normal(size=(2, 2, 3, 3))
    g, a, lower, upper = check_model(_wrap_model(w, 1, 1, extra_slice=True), attack_steps=20)
    assert not any("circular" in lb.method for lb in a.layers)


def test_wrap_concat_two_slices_on_one_side_is_not_a_wrap():
    """Concat([Slice tail, Slice tail, t]) is not a wrap pad (both copies are
    kept): the import still reproduces onnxruntime and no circular fold."""
    big = 2 ** 62
    ints = {"ax": [2], "tb": [-1], "te": [big], "tb2": [-2], "te2": [big]}
    nodes = [helper.make_node("Slice", ["x", "tb", "te", "ax"], ["s1"]),
             helper.make_node("Slice", ["x", "tb2", "te2", "ax"], ["s2"]),
             helper.make_node("Concat", ["s1", "s2", "x"], ["p"], axis=2, name="pad"),
             helper.make_node("Conv", ["p", "w"], ["z"], name="conv")]
    w = np.random.default_rng(0).normal(size=(2, 2, 3, 1))
    m = head_model(nodes, {"w": w}, (2, 5, 5), "z", 2 * 6 * 5, int_inits=ints)
    g, a, lower, upper = check_model(m, attack_steps=20)
    assert not any("circular" in lb.method for lb in a.layers)
