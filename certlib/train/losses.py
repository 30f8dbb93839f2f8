"""Training losses for Lipschitz-margin networks.

All take logits y (B, C), integer labels (B,), the margin constants K (C, C)
(training-time: L_body estimate * ||w_i - w_j||, differentiable) and eps.

* ``emma`` (the adaptive loss of the ICLR'24 follow-up code,
  hukkai/liresnet models/margin_layer.py ``emma_loss``): y'_i = y_i + eps_i
  K_{y,i} for i != y with eps_i = clip((y_y - y_i) / K_{y,i}, 0.01 eps, eps),
  eps_i detached; loss = CE(y', y).
* ``margin``: every eps_i = eps, nothing detached (the loss the NeurIPS'23
  code snapshot trains with; hukkai/liresnet ``margin_loss``).
* ``trades`` (GloRo TRADES, klasleino/gloro gloro/training/losses.py and
  hukkai/liresnet ``trades_loss``): CE(y, label) + lambda * KL(P || Q) with
  P = [softmax(y), 0] and Q the softmax of [y, y_bot], where the bottom logit
  y_bot = max_{i != p}(y_i + eps K_{p,i}) is taken relative to the PREDICTION
  p = argmax y (not the label); KL = -log(1 - q_bot) = lse([y, y_bot]) - lse(y).
  Nothing is detached (both upstream versions differentiate through P).
* ``ce``: plain cross-entropy.

Which preset uses which loss, and why: docs/presets.md.

``reduction`` is "mean" (default), "sum" or "none" (per-sample losses); the
trainer sums and divides by the GLOBAL batch size, so that DDP ranks with
unequal shares of a last, partial batch still average exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("emma", "margin", "trades", "ce")


def _others(labels: torch.Tensor, C: int) -> torch.Tensor:
    return ~F.one_hot(labels, C).bool()


def _reduce(v: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    if reduction == "none":
        return v
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def emma(y: torch.Tensor, labels: torch.Tensor, K: torch.Tensor, eps: float,
         reduction: str = "mean") -> torch.Tensor:
    C = y.shape[1]
    Ky = K[labels]  # (B, C)
    mask = _others(labels, C)
    with torch.no_grad():
        gap = y.gather(1, labels[:, None]) - y
        eps_i = (gap / Ky.clamp_min(1e-12)).clamp(0.01 * eps, eps)
    y2 = y + torch.where(mask, eps_i * Ky, torch.zeros_like(y))
    return _reduce(F.cross_entropy(y2, labels, reduction="none"), reduction)


def margin(y: torch.Tensor, labels: torch.Tensor, K: torch.Tensor, eps: float,
           reduction: str = "mean") -> torch.Tensor:
    mask = _others(labels, y.shape[1])
    y2 = y + torch.where(mask, eps * K[labels], torch.zeros_like(y))
    return _reduce(F.cross_entropy(y2, labels, reduction="none"), reduction)


def trades(y: torch.Tensor, labels: torch.Tensor, K: torch.Tensor, eps: float,
           lam: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    pred = y.detach().argmax(dim=1)
    mask = _others(pred, y.shape[1])
    shifted = torch.where(mask, y + eps * K[pred], torch.full_like(y, float("-inf")))
    y_bot = shifted.max(dim=1, keepdim=True).values
    kl = torch.logsumexp(torch.cat([y, y_bot], dim=1), dim=1) - torch.logsumexp(y, dim=1)
    return _reduce(F.cross_entropy(y, labels, reduction="none") + lam * kl, reduction)


def ce(y: torch.Tensor, labels: torch.Tensor, K: torch.Tensor, eps: float,
       reduction: str = "mean") -> torch.Tensor:
    return _reduce(F.cross_entropy(y, labels, reduction="none"), reduction)


def get(name: str, trades_lambda: float = 1.0):
    if name == "emma":
        return emma
    if name == "margin":
        return margin
    if name == "trades":
        def trades_fixed(y, labels, K, eps, reduction="mean"):
            return trades(y, labels, K, eps, trades_lambda, reduction)

        return trades_fixed
    if name == "ce":
        return ce
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
