"""Seeded randomness and batched, on-device augmentation.

Every random draw of a run is a pure function of ``(seed, epoch, step)`` (or
``(seed, epoch, sample index)`` in loader workers), never of a generator's
running state: a resumed run, a run on another number of ranks and a run on
another device draw exactly the same numbers.  Draws are made on the CPU
(a few integers per sample) and the images are transformed on the device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    a, b = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int((int(a) << 31) ^ int(b)) & 0x7FFFFFFFFFFFFFFF


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(*parts))


# stream tags, so that different uses of one (seed, epoch, step) never share numbers
PERM, AUG, SAMPLE = 1, 2, 3


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch`` (CPU int64), as DistributedSampler's
    ``set_epoch`` gives, but independent of the number of ranks."""
    return torch.randperm(n, generator=generator(seed, PERM, epoch))


def crop_flip_params(batch: int, pad: int, flip: bool, seed: int, epoch: int, step: int) -> torch.Tensor:
    """(batch, 3) int64: crop offsets (dy, dx) in [0, 2 pad] and a flip bit,
    for the GLOBAL batch of ``step`` (ranks slice their rows)."""
    g = generator(seed, AUG, epoch, step)
    off = torch.randint(0, 2 * pad + 1, (batch, 2), generator=g)
    fl = torch.randint(0, 2, (batch, 1), generator=g) if flip else torch.zeros(batch, 1, dtype=torch.int64)
    return torch.cat([off, fl], dim=1)


def crop_flip(x: torch.Tensor, params: torch.Tensor, pad: int) -> torch.Tensor:
    """Batched random crop (zero padding ``pad``) + horizontal flip, as
    torchvision's RandomCrop(size, padding=pad) + RandomHorizontalFlip, in one
    gather on the device.  ``params`` from :func:`crop_flip_params`."""
    B, C, H, W = x.shape
    if B == 0:
        return x
    p = params.to(x.device, non_blocking=True)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    ar_h = torch.arange(H, device=x.device)
    ar_w = torch.arange(W, device=x.device)
    rows = p[:, 0:1] + ar_h                                   # (B, H)
    cols = torch.where(p[:, 2:3].bool(), W - 1 - ar_w, ar_w) + p[:, 1:2]  # (B, W), flipped when asked
    b = torch.arange(B, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)  # NHWC storage: already channels_last
