"""Composition helpers: the exact explicit conv matrix, folding."""

import numpy as np
from hypothesis import given, settings

from certlib.ir.compose import conv_matrix
from certlib.verifiers.strategies import conv_operators


@settings(max_examples=150, deadline=None)
@given(conv_operators())
def test_conv_matrix_is_the_operator(op):
    np.testing.assert_array_equal(conv_matrix(op), op.to_dense())


def test_three_methods_agree_on_a_digits_liresnet():
    """exact, power and sdp each bound every stage independently; on a small
    digits LiResNet (all convs small enough for the explicit-matrix SDP) they
    give the same VRA, and the raw estimate is below every sound bound."""
    import torch

    from certlib.data import load
    from certlib.models.liresnet import build
    from certlib.onnx.export import build_onnx
    from certlib.onnx.importer import import_model
    from certlib.verify import verify_graph

    torch.manual_seed(0)
    g = import_model(build_onnx(build("digits", width=2, depth=2, dense_dim=8).eval()))
    ds = load("digits")
    exact = verify_graph(g, ds, 0.0, "exact")
    cert = exact.result.radius[exact.result.correct]
    eps = float(np.median(cert)) if cert.size else 1e-3
    vras, bodies = {}, {}
    for m in ("exact", "power", "sdp"):
        rep = verify_graph(g, ds, eps, m)
        vras[m], bodies[m] = rep.result.vra, rep.analysis.body.value
    est = verify_graph(g, ds, eps, estimate_only=True)
    assert vras["exact"] > 0
    assert max(vras.values()) - min(vras.values()) <= 0.001, vras
    assert max(bodies.values()) <= min(bodies.values()) * (1 + 1e-4), bodies
    assert est.analysis.body.value <= min(bodies.values())
    sound_layers = {lb.name: lb.bound for lb in exact.analysis.layers}
    for lb in est.analysis.layers:
        assert lb.bound <= sound_layers[lb.name], lb.name
