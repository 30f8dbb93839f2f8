"""Typed training configuration and the per-preset recipes.

The large presets follow the NeurIPS 2023 code (PAPER.md): AdamW lr 1e-3,
weight decay 1e-4 (0 for ImageNet), batch 256 (1024 ImageNet), 800 epochs (400
ImageNet), 20 warm-up epochs then cosine decay to 1e-5 of the peak, gradient
clipping at 3, eps ramped per epoch from 0.1 eps to 1.5 eps over the first
half, test eps 36/255.  ``digits`` is a CPU-sized recipe of our own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainConfig:
    preset: str = "digits"
    data: str = "digits"
    out: str = "runs/digits"
    epochs: int = 150
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    min_lr_ratio: float = 1e-5
    grad_clip: float = 3.0
    loss: str = "emma"
    eps: float = 0.3            # test eps; training ramps to eps_end * eps
    eps_start: float = 0.1
    eps_end: float = 1.5
    trades_lambda: float = 1.0
    power_iters: int = 10
    seed: int = 0
    device: str = "auto"
    verify: bool = True         # sound VRA at the end (same path as `certlib verify`)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_PAPER = dict(epochs=800, batch_size=256, lr=1e-3, weight_decay=1e-4, warmup_epochs=20,
              eps=36 / 255, loss="emma")

RECIPES: dict[str, dict] = {
    "digits": dict(data="digits", epochs=150, batch_size=128, lr=3e-3, weight_decay=0.0,
                   warmup_epochs=5, eps=0.3),
    "cifar10": dict(data="cifar10:data/cifar10", **_PAPER),
    "cifar10-l18w256": dict(data="cifar10:data/cifar10", **_PAPER),
    "cifar100": dict(data="cifar100:data/cifar100", **_PAPER),
    "cifar100-l18w256": dict(data="cifar100:data/cifar100", **_PAPER),
    "tinyimagenet": dict(data="tinyimagenet:data/tiny-imagenet-200", **_PAPER),
    "imagenet": dict(data="imagenet:data/imagenet", **{**_PAPER, "epochs": 400, "batch_size": 1024,
                                                        "weight_decay": 0.0}),
}


def preset_config(preset: str, **overrides) -> TrainConfig:
    if preset not in RECIPES:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(RECIPES)}")
    base = dict(RECIPES[preset])
    base.update({k: v for k, v in overrides.items() if v is not None})
    base.setdefault("out", f"runs/{preset}")
    return TrainConfig(preset=preset, **base)


def eps_at(cfg: TrainConfig, epoch: int) -> float:
    """Per-epoch training eps: eps * (start + (end - start) * min(2 epoch / epochs, 1))."""
    frac = min(2.0 * epoch / max(cfg.epochs, 1), 1.0)
    return cfg.eps * (cfg.eps_start + (cfg.eps_end - cfg.eps_start) * frac)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    import math

    warm = cfg.warmup_epochs * steps_per_epoch
    total = max(cfg.epochs * steps_per_epoch, 1)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(t, 1.0)))
