"""certlib.train.power: the trainer's fast power iteration.

Oracles: the model's own one-stage-at-a-time estimate
(LiResNet.lipschitz_estimate, covered against exact norms in test_models.py)
and the split path the CUDA graph replays (iterate_ then stage_sigmas)."""

import pytest
import torch

from certlib.models.liresnet import build
from certlib.train.power import MODES, PowerIteration, _resolve, iterate_, lipschitz_estimate, stage_sigmas

SMALL = dict(width=16, depth=3, dense_dim=32)


def _pair(**kw):
    torch.manual_seed(0)
    a = build("cifar10", **kw)
    b = build("cifar10", **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def _bufs(m):
    return {k: v for k, v in m.state_dict().items() if k.endswith("power_u")}


@pytest.mark.parametrize("mode", ["conv", "gemm", "loop", "fold"])
def test_one_pass_equals_the_split_path_bitwise(mode):
    """PowerIteration shares each fused kernel between the iterations and
    ||A v||: bitwise the same estimate, buffers and gradients as iterating
    first and evaluating the stages afterwards (the CUDA-graph path)."""
    a, b = _pair(**SMALL)
    la = PowerIteration(a, 4, mode)()
    iterate_(b, 4, mode)
    lb = torch.stack(stage_sigmas(b, mode)).prod()
    assert torch.equal(la, lb)
    for k, v in _bufs(a).items():
        assert torch.equal(v, _bufs(b)[k]), k
    la.backward()
    lb.backward()
    for (k, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), k


@pytest.mark.parametrize("mode", ["conv", "gemm", "loop", "fold"])
@pytest.mark.parametrize("n_iter", [0, 2])
def test_buffers_may_change_before_backward(mode, n_iter):
    """The DDP broadcast writes the buffers in place between the estimate and
    the backward: ``v`` must never be a buffer (clone-before-use)."""
    torch.manual_seed(1)
    m = build("cifar10", **SMALL)
    before = {k: v.clone() for k, v in _bufs(m).items()}
    L = PowerIteration(m, n_iter, mode)()
    with torch.no_grad():
        for v in _bufs(m).values():
            v.mul_(-1.0)
    L.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    changed = [not torch.equal(-v, before[k]) for k, v in _bufs(m).items()]
    assert all(changed) if n_iter else not any(changed)


@pytest.mark.parametrize("mode", ["conv", "gemm", "loop", "fold"])
def test_single_block_model_matches_the_models_estimate(mode):
    ref, fast = _pair(width=16, depth=1, dense_dim=32)
    a = ref.lipschitz_estimate(5)
    b = lipschitz_estimate(fast, 5, mode)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    a.backward()
    b.backward()
    for (k, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=lambda s, k=k: f"{k}: {s}")


def test_auto_mode_and_errors():
    assert _resolve(build("digits"), "auto") == "conv"                    # narrow: one grouped call
    assert _resolve(build("cifar10", depth=2), "auto") == "loop"          # wide: oneDNN per block
    assert set(MODES) == {"auto", "gemm", "conv", "loop", "fold"}
    with pytest.raises(ValueError, match="power mode"):
        PowerIteration(build("digits"), 2, "fft")
    with pytest.raises(ValueError, match="n_iter"):
        PowerIteration(build("digits"), -1)
