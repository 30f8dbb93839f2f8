"""The body bound of a LiResNet is >= the true Lipschitz constant of its
linear chain (explicit matrices + numpy float64 SVD as the oracle)."""

import numpy as np
import pytest
import torch

from certlib.ir.graph import ActivationNode, AffineNode, LinearNode
from certlib.ir.compose import analyze, split_head
from certlib.models.liresnet import build
from certlib.onnx.export import build_onnx
from certlib.onnx.importer import import_model


@pytest.fixture(scope="module")
def small_graph():
    torch.manual_seed(3)
    m = build("digits", width=8, depth=2, dense_dim=16)
    with torch.no_grad():  # trained-like scales: larger residual branches
        for b in m.blocks:
            b.weight.mul_(20.0)
    m.eval()
    return m, import_model(build_onnx(m))


def _dense(node):
    if isinstance(node, LinearNode):
        return node.op.to_dense()
    if isinstance(node, AffineNode):
        n = int(np.prod(node.in_shape))
        return np.diag(np.broadcast_to(node.scale, node.in_shape).reshape(n))
    n = int(np.prod(node.in_shape))
    return np.eye(n)


def test_each_stage_bound_covers_its_matrix(small_graph):
    _, g = small_graph
    a = analyze(g, "exact")
    by_name = {lb.name: lb for lb in a.layers}
    for node in g.nodes[:split_head(g)]:
        if isinstance(node, LinearNode):
            truth = np.linalg.svd(node.op.to_dense(), compute_uv=False)[0]
            b = by_name[node.name].bound
            assert truth <= b, node.name
            assert b <= truth * 1.25, (node.name, b, truth)  # zero padding: not exact, but close


def test_body_bound_covers_whole_linear_chain(small_graph):
    _, g = small_graph
    a = analyze(g, "exact")
    M = None
    for node in g.nodes[:split_head(g)]:
        if isinstance(node, ActivationNode):
            continue  # MinMax replaced by the identity: one linear path of the network
        D = _dense(node)
        M = D if M is None else D @ M
    truth = np.linalg.svd(M, compute_uv=False)[0]
    assert truth <= a.body.value


def test_minmax_is_one_lipschitz():
    from certlib.models.layers import MinMax

    torch.manual_seed(0)
    mm = MinMax()
    x = torch.randn(500, 8, 3, 3, dtype=torch.float64)
    y = torch.randn(500, 8, 3, 3, dtype=torch.float64)
    lhs = (mm(x) - mm(y)).flatten(1).norm(dim=1)
    rhs = (x - y).flatten(1).norm(dim=1)
    assert torch.all(lhs <= rhs * (1 + 1e-12))


def test_certified_points_survive_pgd(small_graph):
    """Random-weight model: whatever certifies must resist the attack."""
    from certlib.attack import pgd_l2
    from certlib.certify import certify
    from certlib.verify import predict

    _, g = small_graph
    a = analyze(g, "exact")
    x = np.random.default_rng(0).random((64, 1, 8, 8)).astype(np.float32)
    logits, err = predict(g, x, a.node_bounds)
    pred = logits.argmax(1)
    eps = float(np.median(certify(logits, err, pred, a.K, a.body, 0.0).radius))
    r = certify(logits, err, pred, a.K, a.body, eps)
    assert r.certified.sum() > 0
    flipped, _ = pgd_l2(g, x[r.certified], pred[r.certified], eps, steps=30, restarts=2)
    assert not flipped.any()
    # the attack is real: with a large radius it does change predictions
    flipped_big, _ = pgd_l2(g, x[:16], pred[:16], 10.0, steps=30)
    assert flipped_big.sum() >= 8
