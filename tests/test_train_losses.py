"""Each training loss against an independent float64 re-derivation of the
published formula (docs/presets.md, "Losses"), on random inputs: values AND
gradients (torch.autograd through both sides) agree to 1e-12.

The re-derivations are written sample by sample and class by class with
scalar operations (explicit max-shifted log-sum-exp, explicit softmax and
KL sum), never calling certlib.train.losses or torch's cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from certlib.train import losses

TOL = dict(rtol=1e-12, atol=1e-12)


def _inputs(seed, B=9, C=6, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale)
    lab = torch.randint(0, C, (B,), generator=g)
    W = torch.rand(C, C, generator=g, dtype=torch.float64) + 0.2
    K = (W + W.T) / 2 * (1 - torch.eye(C, dtype=torch.float64))
    return y, lab, K


def _f(z):
    return float(z.detach()) if torch.is_tensor(z) else float(z)


def _lse(zs):
    m = max(_f(z) for z in zs)
    return m + torch.log(sum(torch.exp(z - m) for z in zs))


def _ce(zs, t):
    return _lse(zs) - zs[t]


def ref_margin(y, lab, K, eps):
    out = []
    for b in range(y.shape[0]):
        t = int(lab[b])
        zs = [y[b, i] + (eps * K[t, i] if i != t else 0.0) for i in range(y.shape[1])]
        out.append(_ce(zs, t))
    return torch.stack(out)


def ref_emma(y, lab, K, eps):
    out = []
    for b in range(y.shape[0]):
        t = int(lab[b])
        zs = []
        for i in range(y.shape[1]):
            if i == t:
                zs.append(y[b, i])
                continue
            # eps_i is a plain Python float: no gradient flows through it (detached)
            e = min(max(_f(y[b, t] - y[b, i]) / _f(K[t, i]), 0.01 * eps), eps)
            zs.append(y[b, i] + e * K[t, i])
        out.append(_ce(zs, t))
    return torch.stack(out)


def ref_trades(y, lab, K, eps, lam):
    """CE(y, label) + lam * KL(P || Q), P = [softmax(y), 0], Q = softmax([y, y_bot]),
    y_bot = max_{i != p} (y_i + eps K_{p,i}), p = argmax y: the literal KL sum."""
    out = []
    C = y.shape[1]
    for b in range(y.shape[0]):
        t = int(lab[b])
        row = [y[b, i] for i in range(C)]
        p = max(range(C), key=lambda i: _f(row[i]))
        bot = None
        for i in range(C):
            if i != p:
                v = row[i] + eps * K[p, i]
                bot = v if bot is None or _f(v) > _f(bot) else bot
        lse_p, lse_q = _lse(row), _lse(row + [bot])
        kl = sum(torch.exp(row[i] - lse_p) * ((row[i] - lse_p) - (row[i] - lse_q)) for i in range(C))
        # P's bottom entry is 0: 0 * log(0 / q) = 0 contributes nothing
        out.append(_ce(row, t) + lam * kl)
    return torch.stack(out)


def ref_ce(y, lab, K, eps):
    return torch.stack([_ce([y[b, i] for i in range(y.shape[1])], int(lab[b])) for b in range(y.shape[0])])


CASES = [
    ("margin", losses.margin, ref_margin),
    ("emma", losses.emma, ref_emma),
    ("trades", lambda y, l, K, e, reduction="mean": losses.trades(y, l, K, e, 1.7, reduction),
     lambda y, l, K, e: ref_trades(y, l, K, e, 1.7)),
    ("ce", losses.ce, ref_ce),
]


def _grads(fn, y, lab, K, eps, reduction):
    yy, KK = y.clone().requires_grad_(True), K.clone().requires_grad_(True)
    v = fn(yy, lab, KK, eps, reduction=reduction) if reduction else fn(yy, lab, KK, eps)
    s = v.sum() if v.dim() else v
    gy, gK = torch.autograd.grad(s, [yy, KK], allow_unused=True)
    return v.detach(), gy, (torch.zeros_like(K) if gK is None else gK)


@pytest.mark.parametrize("name,fn,ref", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_matches_float64_rederivation(name, fn, ref, seed, reduction):
    y, lab, K = _inputs(seed)
    eps = [0.05, 0.4, 2.0][seed]  # small, medium, large: emma's clip hits both ends
    red = {"none": lambda v: v, "mean": lambda v: v.mean(), "sum": lambda v: v.sum()}[reduction]
    got, gy, gK = _grads(fn, y, lab, K, eps, reduction)
    want, ry, rK = _grads(lambda a, b, c, d: red(ref(a, b, c, d)), y, lab, K, eps, None)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(gy, ry, **TOL)
    torch.testing.assert_close(gK, rK, **TOL)


def test_emma_clip_reaches_both_ends():
    # the cases above exercise eps_i = 0.01 eps, eps_i = eps and the interior
    y, lab, K = _inputs(1)
    eps = 0.4
    Ky = K[lab]
    e = ((y.gather(1, lab[:, None]) - y) / Ky.clamp_min(1e-300))[~F.one_hot(lab, 6).bool()]
    assert (e <= 0.01 * eps).any() and (e >= eps).any() and ((e > 0.01 * eps) & (e < eps)).any()


def test_trades_bottom_logit_follows_the_prediction_not_the_label():
    # a misclassified sample: label 0, prediction 1; K asymmetric in rows 0 / 1
    y = torch.tensor([[0.0, 2.0, 1.0]], dtype=torch.float64)
    lab = torch.tensor([0])
    K = torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 0.5], [3.0, 0.5, 0.0]], dtype=torch.float64)
    eps = 1.0
    got = losses.trades(y, lab, K, eps, 1.0) - F.cross_entropy(y, lab)
    # prediction 1: y_bot = max(y0 + K10, y2 + K12) = max(1, 1.5) = 1.5
    want = math.log(math.exp(0) + math.exp(2) + math.exp(1) + math.exp(1.5)) - math.log(
        math.exp(0) + math.exp(2) + math.exp(1))
    assert abs(float(got) - want) < 1e-12
    # the label's row would give y_bot = max(2 + 1, 1 + 3) = 4: a different value
    wrong = math.log(math.exp(0) + math.exp(2) + math.exp(1) + math.exp(4)) - math.log(
        math.exp(0) + math.exp(2) + math.exp(1))
    assert abs(want - wrong) > 0.5


def test_trades_equals_the_upstream_log_softmax_form():
    # hukkai/liresnet writes the KL as log_softmax(y)[:, 0] - log_softmax([y, y_bot])[:, 0]
    y, lab, K = _inputs(3)
    eps = 0.3
    p = y.argmax(1)
    mask = ~F.one_hot(p, y.shape[1]).bool()
    bot = torch.where(mask, y + eps * K[p], torch.tensor(-math.inf, dtype=y.dtype)).max(1).values
    kl = y.log_softmax(1)[:, 0] - torch.cat([y, bot[:, None]], 1).log_softmax(1)[:, 0]
    got = losses.trades(y, lab, K, eps, 1.0, reduction="none") - F.cross_entropy(y, lab, reduction="none")
    torch.testing.assert_close(got, kl, **TOL)
