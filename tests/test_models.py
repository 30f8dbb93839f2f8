"""certlib.models: layers, LiResNet, presets, power-iteration estimates.

Oracles: explicit formulas written here independently of the model code,
and explicit dense matrices (float64 numpy SVD) for operator norms.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from certlib.models import (
    PRESETS,
    LinearResidualConv,
    LiResNet,
    LiResNetConfig,
    LLNLinear,
    MinMax,
    build,
    conv2d_adjoint,
    power_iteration,
)
from onnx_builders import randomize as _randomize




# ------------------------------------------------------------------ MinMax


def test_minmax_values():
    x = torch.tensor([[1.0, -2.0, 5.0, 3.0, 0.0, 4.0]])  # a = [1,-2,5], b = [3,0,4]
    y = MinMax()(x)
    assert y.tolist() == [[3.0, 0.0, 5.0, 1.0, -2.0, 4.0]]
    x4 = torch.randn(2, 6, 3, 5)
    a, b = x4[:, :3], x4[:, 3:]
    torch.testing.assert_close(MinMax()(x4), torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1),
                               rtol=0, atol=0)


def test_minmax_odd_channels_raises():
    with pytest.raises(ValueError, match="even"):
        MinMax()(torch.zeros(1, 3, 2, 2))


def test_minmax_is_one_lipschitz():
    torch.manual_seed(1)
    mm = MinMax()
    x = torch.randn(200, 8, 2, 2, dtype=torch.float64)
    y = x + 0.3 * torch.randn_like(x)
    dx = (x - y).flatten(1).norm(dim=1)
    dy = (mm(x) - mm(y)).flatten(1).norm(dim=1)
    assert torch.all(dy <= dx * (1 + 1e-12))
    # Each output is a permutation of the input (values only move).
    torch.testing.assert_close(mm(x).flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values,
                               rtol=0, atol=0)
    # The Jacobian at a generic point is a permutation matrix (norm exactly 1).
    x0 = torch.randn(1, 6, 2, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(mm, x0).reshape(24, 24)
    assert set(jac.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(jac.sum(0) == 1) and torch.all(jac.sum(1) == 1)


# ---------------------------------------------------- LinearResidualConv


@pytest.mark.parametrize("k", [3, 5])
def test_fused_kernel_matches_residual_oracle(k):
    torch.manual_seed(2)
    c, depth = 6, 7
    layer = _randomize(LinearResidualConv(c, depth, kernel_size=k)).double()
    assert layer.weight.shape == (c, c, k, k) and layer.scale.shape == (c,) and layer.bias.shape == (c,)
    x = torch.randn(3, c, 9, 8, dtype=torch.float64)
    w = layer.weight * layer.scale.view(c, 1, 1, 1)
    oracle = x + depth ** -0.5 * F.conv2d(x, w, None, padding=k // 2) + layer.bias.view(1, c, 1, 1)
    torch.testing.assert_close(layer(x), oracle, rtol=1e-12, atol=1e-12)
    # The kernel itself: identity at the centre tap only.
    diff = layer.fused_kernel() - depth ** -0.5 * w
    eye = torch.zeros_like(diff)
    eye[range(c), range(c), k // 2, k // 2] = 1
    torch.testing.assert_close(diff, eye, rtol=0, atol=1e-15)


def test_linear_residual_conv_init():
    torch.manual_seed(3)
    layer = LinearResidualConv(64, 12)
    assert torch.all(layer.scale == 1) and torch.all(layer.bias == 0)
    # randn / (C*k*k): std close to 1/576.
    assert abs(layer.weight.std().item() * 64 * 9 - 1) < 0.05
    assert "identity_kernel" not in layer.state_dict()


# ------------------------------------------------------------------ LLN head


def test_lln_rows_normalised_bias_not():
    torch.manual_seed(4)
    head = LLNLinear(5, 4)
    with torch.no_grad():
        head.weight.mul_(7.0)
        head.weight[2].zero_()
        head.bias.copy_(torch.tensor([3.0, -1.0, 0.5, 2.0]))
    w = head.normalized_weight()
    norms = w.norm(dim=1)
    torch.testing.assert_close(norms[[0, 1, 3]], torch.ones(3), rtol=0, atol=1e-6)
    assert torch.all(w[2] == 0)  # all-zero row: zero, not NaN
    x = torch.randn(3, 5)
    ref = x @ (head.weight / head.weight.norm(dim=1, keepdim=True).clamp_min(1e-30)).T + head.bias
    torch.testing.assert_close(head(x), ref)
    head(x).sum().backward()
    assert torch.isfinite(head.weight.grad).all()


# ----------------------------------------------------------------- LiResNet


def _reference_forward(model: LiResNet, x: torch.Tensor) -> torch.Tensor:
    """Independent float64 forward: explicit residual form, explicit MinMax."""
    c = model.config

    def mm(t):
        h = t.shape[1] // 2
        return torch.cat([torch.maximum(t[:, :h], t[:, h:]), torch.minimum(t[:, :h], t[:, h:])], 1)

    p = {k: v.double() for k, v in model.state_dict().items()}
    t = x.double() - 0.5
    t = mm(F.conv2d(t, p["stem.weight"], p["stem.bias"], c.stem_stride, c.stem_padding))
    for i in range(c.depth):
        w = p[f"blocks.{i}.weight"] * p[f"blocks.{i}.scale"].view(-1, 1, 1, 1)
        t = mm(t + c.depth ** -0.5 * F.conv2d(t, w, None, padding=1) + p[f"blocks.{i}.bias"].view(1, -1, 1, 1))
    t = mm(F.conv2d(t, p["neck_conv.weight"], p["neck_conv.bias"], c.neck_stride))
    t = mm(F.linear(t.flatten(1), p["neck_dense.weight"], p["neck_dense.bias"]))
    hw = p["head.weight"]
    return F.linear(t, hw / hw.norm(dim=1, keepdim=True), p["head.bias"])


def test_liresnet_forward_matches_reference():
    torch.manual_seed(5)
    model = _randomize(build("digits"))
    x = torch.rand(4, 1, 8, 8)
    out = model(x)
    assert out.shape == (4, 10) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference_forward(model, x), rtol=1e-5, atol=1e-5)


def _dense_stage_matrix(model: LiResNet, name: str) -> np.ndarray:
    """Materialise a stage's linear operator (float64) from the module's
    parameters with independent code (basis vectors through F.conv2d / matmul)."""
    c = model.config
    shape = model.stage_shapes()[name]
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        if name == "stem.conv":
            out = F.conv2d(basis, model.stem.weight.double(), None, c.stem_stride, c.stem_padding)
        elif name.startswith("block"):
            blk = model.blocks[int(name[len("block"):].split(".")[0])]
            w = blk.weight.double() * blk.scale.double().view(-1, 1, 1, 1)
            out = basis + c.depth ** -0.5 * F.conv2d(basis, w, None, padding=1)
        elif name == "neck.conv":
            out = F.conv2d(basis, model.neck_conv.weight.double(), None, c.neck_stride)
        else:
            out = basis @ model.neck_dense.weight.double().T
    return out.reshape(n, -1).numpy().T  # (out_dim, in_dim)


def _spectral_norm(a: np.ndarray) -> float:
    """||A||_2 in float64: SVD for thin matrices; for the square 2048x2048
    block operators the largest eigenvalue of the Gram matrix (eigvalsh),
    which agrees with the SVD to ~1e-15 relative here and costs a fraction of
    gesdd's time on a shared 2-core machine (relative error < 1e-12: Weyl)."""
    if min(a.shape) <= 512:
        return float(np.linalg.svd(a, compute_uv=False)[0])
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    return float(np.sqrt(np.linalg.eigvalsh(gram)[-1]))


def test_power_iteration_is_below_exact_norm_and_converges():
    torch.manual_seed(6)
    model = _randomize(build("digits"))
    shapes = model.stage_shapes()
    assert list(shapes) == ["stem.conv", "block0.conv", "block1.conv", "block2.conv", "block3.conv",
                            "neck.conv", "neck.dense"]
    exact = {}
    for name in shapes:
        a = _dense_stage_matrix(model, name)
        exact[name] = (a, _spectral_norm(a))

    def check(est, tol_converged=None):
        for st in model.linear_stages():
            a, sigma = exact[st.name]
            v = st.module.power_u.detach().double().numpy().ravel()
            rayleigh = np.linalg.norm(a @ v) / np.linalg.norm(v)
            # Guarantee (exact arithmetic): ||A v|| / ||v|| <= ||A||_2.
            assert rayleigh <= sigma * (1 + 1e-11), st.name
            # The float32 value returned is that quotient up to float32 rounding
            # (so it may exceed sigma by ~1e-7 relative: it is an estimate).
            assert abs(est[st.name].item() - rayleigh) <= 1e-5 * rayleigh, st.name
            if tol_converged is not None:
                assert rayleigh >= sigma * (1 - tol_converged), (st.name, rayleigh, sigma)

    check(model.stage_estimates(n_iter=10))
    check(model.stage_estimates(n_iter=3000), tol_converged=1e-3)


def test_power_iteration_rayleigh_nondecreasing():
    torch.manual_seed(7)
    model = build("digits")
    st = model.linear_stages()[1]
    vals = [power_iteration(st.module.power_u, st.forward, 1, st.adjoint).item() for _ in range(30)]
    assert all(b >= a * (1 - 1e-6) for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize(
    "cin,size,k,stride,pad",
    [(3, 32, 5, 2, 2), (3, 64, 7, 4, 3), (3, 28, 14, 14, 0), (4, 16, 4, 4, 0), (2, 9, 3, 2, 1), (2, 8, 3, 1, 1)],
)
def test_conv2d_adjoint_is_exact_transpose(cin, size, k, stride, pad):
    torch.manual_seed(8)
    w = torch.randn(6, cin, k, k, dtype=torch.float64)
    x = torch.randn(2, cin, size, size, dtype=torch.float64)
    ax = F.conv2d(x, w, None, stride, pad)
    y = torch.randn_like(ax)
    aty = conv2d_adjoint(y, w, (size, size), stride, pad)
    assert aty.shape == x.shape
    torch.testing.assert_close((ax * y).sum(), (x * aty).sum(), rtol=1e-12, atol=1e-12)


def test_power_iteration_autograd_adjoint_agrees():
    torch.manual_seed(9)
    model = build("digits", width=8, depth=2)
    for st in model.linear_stages():
        u1 = st.module.power_u.clone()
        u2 = st.module.power_u.clone()
        s1 = power_iteration(u1, st.forward, 5, st.adjoint)
        s2 = power_iteration(u2, st.forward, 5, None)
        torch.testing.assert_close(u1, u2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s1, s2, rtol=1e-5, atol=0)


def test_lipschitz_estimate_gradients_and_buffers():
    torch.manual_seed(10)
    model = build("digits")
    u_before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("power_u")}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items() if k.endswith("power_u")}
    est1 = model.lipschitz_estimate(n_iter=3)
    est2 = model.lipschitz_estimate(n_iter=3)  # in-place updates after est1 was built
    est1.backward()  # clone-before-use: still valid
    est2.backward()
    for name, p in model.named_parameters():
        if name.startswith("head") or name.endswith("bias"):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    sd = model.state_dict()
    for k in u_before:
        assert sd[k].dtype == torch.float32 and not sd[k].requires_grad
        assert sd[k].data_ptr() == ptrs[k]  # updated in place
        assert not torch.equal(sd[k], u_before[k])
    # Product of the per-stage values.
    with torch.no_grad():
        stages = model.stage_estimates(n_iter=0)
        torch.testing.assert_close(model.lipschitz_estimate(n_iter=0), torch.stack(list(stages.values())).prod())


def test_power_buffers_in_state_dict_roundtrip():
    torch.manual_seed(11)
    model = build("digits")
    model.lipschitz_estimate(n_iter=5)
    sd = model.state_dict()
    keys = [k for k in sd if k.endswith("power_u")]
    assert keys == ["stem.power_u"] + [f"blocks.{i}.power_u" for i in range(4)] + [
        "neck_conv.power_u", "neck_dense.power_u"]
    for k, shape in zip(keys, model.stage_shapes().values()):
        assert tuple(sd[k].shape) == (1, *shape) and sd[k].dtype == torch.float32
    fresh = build("digits")
    fresh.load_state_dict(copy.deepcopy(sd))
    for k in keys:
        assert torch.equal(fresh.state_dict()[k], sd[k])
    torch.testing.assert_close(fresh.lipschitz_estimate(0), model.lipschitz_estimate(0))


def test_pairwise_head_norms():
    torch.manual_seed(12)
    model = build("digits")
    k = model.pairwise_head_norms()
    w = model.head_weight().detach().double().numpy()
    ref = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=-1)
    assert k.shape == (10, 10)
    np.testing.assert_allclose(k.detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert torch.all(k.diagonal() == 0)
    k.sum().backward()
    assert torch.isfinite(model.head.weight.grad).all()
    torch.testing.assert_close(model.head_weight().norm(dim=1), torch.ones(10), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ presets


def test_preset_geometry():
    p = PRESETS
    assert set(p) == {"digits", "cifar10", "cifar10-l18w256", "cifar100", "cifar100-l18w256",
                      "tinyimagenet", "imagenet", "imagenet-eps1"}
    d = p["digits"]
    assert (d.in_channels, d.input_size, d.num_classes, d.width, d.depth, d.dense_dim) == (1, 8, 10, 32, 4, 128)
    assert (d.stem_output_size, d.neck_output_size) == (8, 2)
    for name in ["cifar10", "cifar100"]:
        c = p[name]
        assert (c.width, c.depth, c.dense_dim, c.stem_kernel, c.stem_stride, c.stem_padding) == (512, 12, 512, 5, 2, 2)
        assert (p[f"{name}-l18w256"].width, p[f"{name}-l18w256"].depth) == (256, 18)
    assert p["cifar100"].num_classes == 100 and p["cifar10"].num_classes == 10
    t = p["tinyimagenet"]
    assert (t.input_size, t.num_classes, t.stem_kernel, t.stem_stride, t.stem_padding, t.width, t.depth,
            t.dense_dim) == (64, 200, 7, 4, 3, 256, 18, 512)
    for name in ("imagenet", "imagenet-eps1"):  # both published ImageNet runs are L18 W588
        i = p[name]
        assert (i.input_size, i.num_classes, i.stem_kernel, i.stem_stride, i.stem_padding, i.width, i.depth,
                i.dense_dim) == (224, 1000, 14, 14, 0, 588, 18, 2048)
        assert round((i.width / 3) ** 0.5) == i.stem_kernel
    for name, c in p.items():
        assert c.name == name and (c.neck_kernel, c.neck_stride) == (4, 4)
        if name != "digits":
            assert (c.stem_output_size, c.neck_output_size) == (16, 4), name
        assert c.init == ("default" if name == "digits" else "orthogonal"), name


def test_config_json_roundtrip_and_validation():
    for c in PRESETS.values():
        assert LiResNetConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="unknown"):
        LiResNetConfig.from_dict({**PRESETS["digits"].to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="even"):
        LiResNetConfig(**{**PRESETS["digits"].to_dict(), "width": 31})


def test_build_errors_and_overrides():
    with pytest.raises(ValueError) as e:
        build("resnet50")
    for name in PRESETS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="valid"):
        build("digits", widht=8)
    m = build("digits", width=8, depth=2)
    assert m.config.width == 8 and len(m.blocks) == 2 and PRESETS["digits"].width == 32
    assert m.stage_shapes()["neck.dense"] == (2 * 8 * 2 * 2,)


def test_orthogonal_init_of_stem_and_neck():
    # the paper presets start the stem and neck convs (semi-)orthogonal, as the
    # NeurIPS'23 code snapshot does (docs/presets.md); digits keeps torch's init
    torch.manual_seed(0)
    m = build("cifar10", width=8, depth=1, dense_dim=8)
    for conv in (m.stem, m.neck_conv):
        w = conv.weight.detach().double().reshape(conv.weight.shape[0], -1)
        g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(g, torch.eye(g.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)
    d = build("digits")
    w = d.stem.weight.detach().double().reshape(d.stem.weight.shape[0], -1)
    assert (w.T @ w - torch.eye(w.shape[1], dtype=torch.float64)).abs().max() > 0.1
    with pytest.raises(ValueError, match="init"):
        LiResNetConfig(**{**PRESETS["digits"].to_dict(), "init": "xavier"})
