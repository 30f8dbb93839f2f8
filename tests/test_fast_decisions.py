"""The fast path's decisions (proofs/fast_forward.md, "Identical decisions"):
the band that keeps a float32 decision only where the float64 path's must be
the same, the per-sample bound on the float64 path's error it uses, the probe
that skips float32 on models it cannot settle, and the onnxruntime veto."""

import dataclasses

import numpy as np
import pytest
import torch

from certlib.fast_certify import settled
from certlib.ir import fast
from certlib.ir.compose import analyze
from certlib.verifiers.operators import Conv2d
from certlib.verify import predict

from test_fast_forward import _graph, _same


@pytest.fixture(scope="module")
def digits():
    from certlib.data import load as load_data
    return load_data("digits", "test")


def test_tiny_margin_falls_back_to_float64(digits):
    # random weights, no bias: logit gaps are below the float32 band
    g = _graph("digits", 3, width=16, depth=2)
    a = analyze(g, "exact")
    f64, e64 = predict(g, digits.x, a.node_bounds)
    from certlib.certify import certify
    eps = float(np.median(certify(f64, e64, digits.y, a.K, a.body, 0.0).radius))
    f, s = _same(g, digits, eps)
    assert f.fast["recomputed_float64"] > 0
    assert f.fast["float64_path"] < f.fast["recomputed_float64"]  # the a priori float64 tier decided most


def test_settled_band():
    K = np.array([[0.0, 1.0], [1.0, 0.0]])
    f = np.array([[1.0, 1.0 - 1e-6], [5.0, 0.0], [5.0, 0.0], [np.nan, 0.0]])
    e = np.array([1e-6, 1e-3, 1e-3, 1e-6])
    ok, yes = settled(f, e, K, 1.0)
    assert list(ok) == [False, True, True, False]
    ok, yes = settled(f[1:3], e[1:3], K, 4.999)   # certification threshold inside the band
    assert not ok.any()


@pytest.mark.parametrize("threshold", [0.0, 1.01])
def test_probe_skips_float32_when_it_settles_too_little(digits, threshold, monkeypatch):
    """When the first PROBE samples' float32 logits settle too few decisions,
    the rest go straight to the float64 tier; decisions equal the float64
    path's either way."""
    import certlib.verify as v

    monkeypatch.setattr(v, "PROBE_SETTLED", threshold)
    g = _graph("digits", 1, bias_scale=3.0, width=16, depth=2)
    f, s = _same(g, digits, 0.01)
    skipped = f.fast["float32_skipped"]
    assert skipped == (len(digits) - v.PROBE if threshold > 1 else 0)
    if threshold > 1:
        assert f.fast["recomputed_float64"] >= skipped


def test_runtime_veto_covers_every_sample_with_a_positive_radius(monkeypatch):
    """A sample not certified at eps still claims its radius (the certified
    accuracy curve counts it at every r below it): when onnxruntime's argmax
    disagrees, the veto must zero that radius too, not only certified ones."""
    from certlib.bounds import Bound
    from certlib.certify import certify
    from certlib.onnx import importer
    from certlib.verify import _runtime_veto

    f = np.array([[1.0, 0.0], [1.0, 0.9], [0.0, 1.0]])
    K = np.full((2, 2), 1.0)
    np.fill_diagonal(K, 0.0)
    res = certify(f, np.zeros(3), np.array([0, 0, 1]), K, Bound.one(), 0.5)
    assert list(res.certified) == [True, False, True] and res.radius[1] > 0
    monkeypatch.setattr(importer, "runtime_argmax", lambda g, x: np.ones(len(x), dtype=np.int64))
    g = dataclasses.replace(_graph("digits", 0, width=16, depth=2), runtime_model=b"x")
    bad = _runtime_veto(g, np.zeros((3, 1)), res)
    assert 1 in bad and res.radius[1] == 0.0


def _with_const_errors(g, rho=1e-6):
    """g with a stored-constant error on the first conv's bias and an Add
    node charging a shift error (terms that do not shrink with the precision)."""
    import copy

    from certlib.ir.graph import AffineNode, LinearNode
    g = copy.deepcopy(g)
    i = next(k for k, n in enumerate(g.nodes) if isinstance(n, LinearNode) and isinstance(n.op, Conv2d))
    c = g.nodes[i].op.kernel.shape[0]
    g.nodes[i].bias = np.full(c, 0.5) if g.nodes[i].bias is None else g.nodes[i].bias
    g.nodes[i].bias_abs_err = np.full(c, rho)
    shape = g.nodes[i].out_shape
    g.nodes.insert(i + 1, AffineNode("a", "Add", shape, shape, scale=np.ones(1), shift=np.full((shape[0], 1, 1), 0.25),
                                     shift_abs_err=np.full((shape[0], 1, 1), rho)))
    return g


@pytest.mark.parametrize("case", ["digits", "cifar_mixed", "const_errors", "float64_tier"])
def test_other_bound_covers_the_float64_paths_reported_error(digits, case):
    """forward32(..., other=True)'s third output bounds the error bound that
    the float64 path reports (the band of fast_certify.settled needs exactly
    that), and is far below the float32 bound where the float32 terms dominate."""
    dtype = torch.float32
    if case == "digits":
        g, x = _graph("digits", 0, width=16, depth=2), digits.x[:64]
    elif case == "const_errors":
        g, x = _with_const_errors(_graph("digits", 0, width=16, depth=2)), digits.x[:64]
    else:
        g = _graph("cifar10", 1, width=64, depth=4, dense_dim=64)
        x = np.random.default_rng(0).random((8, *g.input_shape)).astype(np.float32)
        dtype = torch.float64 if case == "float64_tier" else dtype
    a = analyze(g, "exact")
    fg = fast.prepare(g, "cpu", dtype)
    f32, e32, e_other = fast.forward32(fg, x, a.node_bounds, other=True)
    _, e64 = predict(g, x, a.node_bounds)
    assert np.all(np.isfinite(e_other))
    assert np.all(e64 <= e_other)
    if case == "float64_tier":
        assert np.all(e_other <= 2 * e32 * (1 + 1e-12))   # theta = 1 everywhere: the old other = 2
    elif case == "digits":
        assert np.all(e_other <= e32 * 2.0 ** -15)        # the precision terms shrink by ~2^-29
    else:
        assert np.all(e_other < e32)


def test_other_bound_is_void_when_the_float32_error_rivals_the_activations():
    """The ratio argument needs the float64 path's activations within twice the
    float32 ones' norm: where the float32 error bound exceeds the activation
    norm, the bound on the float64 path's error is inf (the sample falls back)."""
    g = _graph("digits", 0, width=16, depth=2)
    a = analyze(g, "exact")
    fg = fast.prepare(g)
    x = np.zeros((2, *g.input_shape), dtype=np.float32)
    x[1] = 1e-30   # (the data is exact in float32: no input rounding)
    f, e, eo = fast.forward32(fg, x, a.node_bounds, other=True)
    _, e64 = predict(g, x, a.node_bounds)
    assert np.all(e64 <= eo)
    fg.thetas = None
    huge = [1e4] * len(a.node_bounds)
    _, e_h, eo_h = fast.forward32(fg, np.random.default_rng(0).random((2, *g.input_shape)), huge, other=True)
    assert np.all(np.isfinite(e_h)) and np.all(np.isinf(eo_h))


def test_unchunked_plan_is_proven_and_its_estimate_is_an_over_estimate():
    """prepare(chunked=False) runs long convolutions as one conv with its own
    (larger) proven bound; unchunk_ratio times the chunked bound is above it
    (the probe's plan choice relies on that, for speed only)."""
    g = _graph("cifar10", 4, width=128, depth=2, dense_dim=32)
    a = analyze(g, "exact")
    x = np.random.default_rng(1).random((6, *g.input_shape)).astype(np.float32)
    chunked, plain = fast.prepare(g), fast.prepare(g, chunked=False)
    assert chunked.unchunk_ratio > 4 and plain.unchunk_ratio == 1.0
    assert any(p.chunks > 1 for p in fast._lins(chunked.prepared))
    assert all(p.chunks == 1 for p in fast._lins(plain.prepared))
    f8, e8 = fast.forward32(chunked, x, a.node_bounds)
    f1, e1 = fast.forward32(plain, x, a.node_bounds)
    f64, e64 = predict(g, x, a.node_bounds)
    for f, e in ((f8, e8), (f1, e1)):
        assert np.all(np.linalg.norm(f - f64, axis=1) <= e + e64)
    assert np.all(e8 < e1) and np.all(e1 <= e8 * chunked.unchunk_ratio)


@pytest.mark.parametrize("loss", [1, -1])
def test_probe_drops_the_chunks_when_they_do_not_change_the_decisions(monkeypatch, loss):
    """Decisions far from the band: the probe runs the rest unchunked (unless
    told to keep every settled sample: loss -1); decisions equal the float64
    path's either way."""
    import certlib.verify as v
    from certlib.data import Dataset

    monkeypatch.setattr(v, "PROBE_UNCHUNK_LOSS", loss)
    g = _graph("cifar10", 4, bias_scale=50.0, width=128, depth=2, dense_dim=32)
    rng = np.random.default_rng(2)
    ds = Dataset(rng.random((4 * v.PROBE, *g.input_shape)).astype(np.float32), rng.integers(0, 10, 4 * v.PROBE),
                 "random", 10)
    f, _ = _same(g, ds, 0.05)
    assert f.fast["float32_unchunked"] == (loss == 1)
    assert f.fast["recomputed_float64"] < len(ds) // 2


def test_other_bound_compares_the_two_paths_inside_a_merged_block():
    """Inside a block the two paths' inner inputs are compared node by node: a
    stored-constant error (which does not shrink with the precision) charged at
    the float64 path's inner activation, where float32 rounding made this
    forward's zero, stays below the bound (adversarial review)."""
    from certlib.ir.graph import ActivationNode, AffineNode, Graph, IndexNode, LinearNode, ParallelNode
    from certlib.verifiers.operators import Dense

    nA, m = 64, 4
    W = np.ones((m, nA)) / np.sqrt(nA)
    nodes = [
        AffineNode("sh", "Sub", (nA + 1,), (nA + 1,), scale=np.array(1.0), shift=np.r_[-np.ones(nA), 0.0]),
        ParallelNode("cat", "Concat", (nA + 1,), (nA + 1 + m,), merge="concat", signs=(1.0, 1.0), axis=0, branches=[
            [], [IndexNode("sl", "Slice", (nA + 1,), (nA,), fn="slice", params={"slices": [(0, nA, 1)]}),
                 ActivationNode("id", "Clip", (nA,), (nA,), activation="clip", params={"min": -2.0 ** 100,
                                                                                        "max": 2.0 ** 100}),
                 LinearNode("w", "Gemm", (nA,), (m,), op=Dense(W), weight_rel_err=2.0 ** -20)]]),
        LinearNode("out", "Gemm", (nA + 1 + m,), (10,), op=Dense(np.eye(10, nA + 1 + m))),
    ]
    g = Graph("x", (nA + 1,), "y", nodes, num_classes=10)
    a = analyze(g, "exact")
    x = np.r_[np.full(nA, 1.0 + 2.0 ** -25 + 2.0 ** -60), 1.0][None]    # part A rounds to 1.0 in float32
    _, e32, E = fast.forward32(fast.prepare(g), x, a.node_bounds, other=True)
    _, e64 = g.forward(x, a.node_bounds)
    assert e64[0] > 1e-12          # the path's charge is there ...
    assert e64[0] <= E[0] < e32[0]  # ... and bounded


def test_norm_bound_of_a_very_long_row_falls_back_to_float64():
    """A row too long for gamma32 of its chunked sum uses the float64 sum."""
    from certlib.ir.fast_rules import _norm_up

    n = 4194319                     # prime: one chunk
    assert float(_norm_up(torch.ones(1, n, dtype=torch.float32))[0]) >= np.sqrt(n)
