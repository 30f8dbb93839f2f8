"""Multi-layer LipSDP for dense stacks (verifiers/lipsdp.py, proofs/lipsdp.md).

Oracles: the stage list a node becomes reproduces the node's own function
(so the quadratic constraints describe the right map); on tiny ReLU networks
with one output the true Lipschitz constant is a maximum over activation
patterns, compared in exact rational arithmetic; the Rump re-check refuses a
rho2 below the truth whatever multipliers it is handed; and on a MinMax
network trained on digits the bound lies between the attack's constant and
the product of the layer norms."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from certlib.ir.dense_stack import dense_stack
from certlib.ir.graph import ActivationNode
from certlib.verifiers import lipsdp


def _forward(stages, x):
    """The stack's map on a vector, straight from the stage list."""
    for st in stages:
        if st[0] == "dense":
            x = st[1] @ x
        elif st[0] == "slope":
            a, b = st[1], st[2]
            x = np.where(x >= 0, b * x, a * x) if (a, b) != (-1.0, 1.0) else np.abs(x)
        else:
            x = x.copy()
            for p, q in st[1]:
                x[p], x[q] = max(x[p], x[q]), min(x[p], x[q])
    return x


ACTS = [("relu", {}), ("abs", {}), ("leaky_relu", {"alpha": 0.1}), ("minmax", {}), ("minmax_rev", {}),
        ("minmax_pairs", {}), ("minmax_pairs_rev", {}),
        ("groupsort", {"P": 3, "g": 4, "Q": 1, "descending": True}),
        ("groupsort", {"P": 1, "g": 4, "Q": 3, "descending": False}),
        ("groupsort", {"P": 1, "g": 12, "Q": 1, "descending": True})]


@pytest.mark.parametrize("kind,params", ACTS, ids=[f"{k}{i}" for i, (k, _) in enumerate(ACTS)])
def test_stages_reproduce_the_node(kind, params):
    node = ActivationNode("a", kind, (12,), (12,), activation=kind, params=params)
    n0, stages = dense_stack([node], 1)
    assert n0 == 12
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.standard_normal((50, 12)), rng.integers(-2, 3, (50, 12)).astype(float)])  # ties too
    want = node.apply(torch.as_tensor(X), False)[0].numpy()
    got = np.stack([_forward(stages, x) for x in X])
    np.testing.assert_array_equal(got, want)


def _true_L2_relu_1out(W1, W2) -> Fraction:
    """max over the 2^k patterns of ||W2 D W1||^2 (one output: a squared row
    norm, exact in Fractions); every pattern is realised when W1 has
    independent rows (biases free), so this is the true squared constant."""
    best = Fraction(0)
    for d in itertools.product([0, 1], repeat=W1.shape[0]):
        row = [sum(Fraction(float(W2[0, i])) * d[i] * Fraction(float(W1[i, j])) for i in range(W1.shape[0]))
               for j in range(W1.shape[1])]
        best = max(best, sum(r * r for r in row))
    return best


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 1.0), (2, 2.0 ** -40), (3, 2.0 ** 40), (4, 1.0)])
def test_tiny_relu_against_exact_patterns(seed, scale):
    rng = np.random.default_rng(seed)
    W1 = rng.standard_normal((2, 3)) * scale
    W2 = rng.standard_normal((1, 2))
    if seed == 4:   # cancellation: the two units nearly cancel each other
        W1[1] = -W1[0] * (1 + 1e-9)
        W2[0, 1] = W2[0, 0]
    st = [("dense", W1), ("slope", 0.0, 1.0), ("dense", W2)]
    b = lipsdp.lipsdp_bound(3, st)
    truth2 = _true_L2_relu_1out(W1, W2)
    assert Fraction(b.value) ** 2 >= truth2                     # sound, exactly
    prod = np.linalg.norm(W1, 2) * np.linalg.norm(W2, 2)
    assert b.value <= prod * (1 + 1e-5)
    # a rho2 below the truth is never proven, whatever multipliers are handed in
    D, _, blocks = lipsdp._structure(3, st)
    below = float(truth2 * Fraction(999999, 1000000))
    for lam in ([np.ones(2)], [np.array([1e-3, 1e3])], [np.full(2, 1e6)]):
        assert not lipsdp.prove(3, st, below, lam)


def test_maxmin_between_orthogonal_layers_is_one():
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    st = [("dense", Q), ("compare", [(i, i + 4) for i in range(4)]), ("dense", Q.T)]
    b = lipsdp.lipsdp_bound(8, st)
    assert 1.0 <= b.value <= 1.0 + 1e-5          # the Jacobian Q^T Q = I is attained
    assert not lipsdp.prove(8, st, 1.0 - 1e-6, [np.full(4, 2.0)])


def test_lipsdp_is_tighter_than_the_product_and_refuses_large():
    rng = np.random.default_rng(6)
    Ws = [rng.standard_normal((6, 5)), rng.standard_normal((6, 6)), rng.standard_normal((2, 6))]
    st = [("dense", Ws[0]), ("slope", 0.0, 1.0), ("dense", Ws[1]), ("slope", 0.0, 1.0), ("dense", Ws[2])]
    b = lipsdp.lipsdp_bound(5, st)
    prod = np.prod([np.linalg.norm(W, 2) for W in Ws])
    assert b.value < 0.9 * prod
    xs = rng.standard_normal((4000, 5))                    # a lower bound: finite differences
    d = rng.standard_normal((4000, 5)) * 1e-7
    lo = max(np.linalg.norm(_forward(st, x + e) - _forward(st, x)) / np.linalg.norm(e) for x, e in zip(xs, d))
    assert lo <= b.value
    with pytest.raises(ValueError, match="max_dim"):
        lipsdp.lipsdp_bound(5, st, max_dim=10)


class _MaxMin(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def _train_and_export(model, path, steps: int, lr: float, n: int | None = None):
    """Train ``model`` full-batch on digits (the first ``n`` samples) with Adam
    and cross-entropy, then export it to ``path`` (opset 17, dynamic batch)."""
    import warnings

    from certlib.data import load as load_data

    d = load_data("digits", "train")
    x, y = torch.as_tensor(d.x)[:n], torch.as_tensor(d.y)[:n]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
    return path


@pytest.fixture(scope="module")
def minmax_digits(tmp_path_factory):
    """A dense MinMax network (4 layers) trained briefly on digits, exported."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), _MaxMin(), nn.Linear(64, 64), _MaxMin(),
                          nn.Linear(64, 64), _MaxMin(), nn.Linear(64, 10))
    return _train_and_export(model, tmp_path_factory.mktemp("lipsdp") / "minmax.onnx", 150, 3e-3)


def test_trained_minmax_network_on_digits(minmax_digits):
    """--method sdp bounds the body with the multi-layer LMI: below the product
    of the (exact) layer norms, above what the attack finds; --proof refuses
    such a body bound (the independent checker re-proves products only)."""
    from certlib.attack import empirical_lipschitz
    from certlib.audit import head_norm
    from certlib.bounds import up_mul
    from certlib.certificate import build_certificate
    from certlib.data import Dataset, load as load_data
    from certlib.errors import UsageError
    from certlib.ir.compose import analyze
    from certlib.onnx.importer import load
    from certlib.verify import verify_file

    _, g = load(minmax_digits)
    exact = analyze(g, "exact")
    d = load_data("digits", "test")
    data = Dataset(d.x[:32], d.y[:32], "digits[:32]", 10)
    rep = verify_file(minmax_digits, data, 0.05, "sdp", fold_inputs=False, fast=False)
    a = rep.analysis
    assert a.body_rule == "lipsdp" and a.body_info["dim"] == 64 + 3 * 32
    assert a.body.value < exact.body.value                    # the product of exact layer norms
    assert a.body.value < a.body_info["product"]
    emp = empirical_lipschitz(g, d.x[:32], steps=30)           # logits: body bound times the head's norm
    assert 0 < emp <= up_mul(float(a.body.value), head_norm(a, "exact"))
    with pytest.raises(UsageError, match="multi-layer LipSDP"):
        build_certificate(minmax_digits, rep, data, "digits")


@pytest.fixture(scope="module")
def small_conv_digits(tmp_path_factory):
    """A small LiResNet-like conv net (stem conv, a stride-4 neck conv whose
    explicit matrix was above the old SDP size limit, dense head), trained briefly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _MaxMin(), nn.Conv2d(8, 32, 4, stride=4), _MaxMin(),
                          nn.Flatten(), nn.Linear(128, 10))
    return _train_and_export(model, tmp_path_factory.mktemp("sdpconv") / "conv.onnx", 40, 1e-2, n=400)


def test_verify_sdp_on_a_conv_digits_model_matches_exact(small_conv_digits):
    """--method sdp is not refused on a stride-4 neck conv (512 inputs: the SDP
    runs on the smaller Gram side) and certifies exactly what --method exact does."""
    from certlib.data import load as load_data
    from certlib.verify import verify_file

    d = load_data("digits", "test")
    from certlib.data import Dataset

    data = Dataset(d.x[:120], d.y[:120], "digits[:120]", 10)
    ex = verify_file(small_conv_digits, data, 0.1, "exact", fast=False)
    sd = verify_file(small_conv_digits, data, 0.1, "sdp", fast=False)
    assert sd.analysis.body_rule == "product"                 # convolutions: the per-layer road
    assert ex.result.vra > 0 and sd.result.vra == ex.result.vra
    assert ex.analysis.body.value <= sd.analysis.body.value <= ex.analysis.body.value * (1 + 1e-5)
    assert list(sd.result.certified) == list(ex.result.certified)


def test_audit_sdp_bounds_the_whole_dense_network_with_its_head(minmax_digits):
    """audit --method sdp: the multi-layer LipSDP of the whole logit map (the
    head couples with the last layer) is below body x head and above the
    attack's empirical constant."""
    from certlib.audit import run_audit
    from certlib.bounds import up_mul
    from certlib.data import Dataset, load as load_data
    from certlib.onnx.importer import load

    _, g = load(minmax_digits)
    d = load_data("digits", "test")
    rep = run_audit(g, Dataset(d.x[:32], d.y[:32], "digits[:32]", 10), None, [], "sdp", steps=30)
    assert rep.rule == "multi-layer LipSDP (whole network)"
    assert 0 < rep.empirical <= rep.proven < up_mul(rep.body, rep.head)
