"""Batches for the trainer: the same sample order on any number of ranks.

Every epoch visits the training split in the order of an epoch-seeded
permutation (:func:`certlib.train.augment.epoch_permutation`); step ``s``'s
GLOBAL batch is ``perm[s*B:(s+1)*B]`` (the last one may be partial, nothing is
dropped or repeated) and rank ``r`` of ``N`` takes positions ``r::N`` of it.
A resumed run restarts at any step of an epoch and sees exactly the batches
(and augmentations) it would have seen.

Two sources:
  * :class:`MemorySource` keeps a whole split on the device (float32, or
    uint8 for CIFAR / Tiny-ImageNet: 4x less memory) and augments batches
    there (crop + flip in one gather);
  * :class:`FolderSource` streams an image folder (ImageNet) through a
    ``DataLoader`` with worker processes and pinned memory; decoding, resizing
    and the random crop happen in the workers with per-sample seeds.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import torch

from certlib.data import DataError, ImageFolder, center_crop, resize_shorter, to_chw
from certlib.train.augment import SAMPLE, crop_flip, crop_flip_params, epoch_permutation, seed_for
from certlib.train.distributed import DistInfo

Batch = tuple[torch.Tensor, torch.Tensor, int]  # local images (float, [0,1]), local labels, global batch size


def step_indices(n: int, batch_size: int, seed: int, epoch: int, step: int, shuffle: bool = True,
                 perm: torch.Tensor | None = None) -> torch.Tensor:
    """The GLOBAL batch of ``step`` in ``epoch`` (CPU int64 sample indices)."""
    if perm is None:
        perm = epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)
    return perm[step * batch_size:(step + 1) * batch_size]


class _Source:
    def __init__(self, n: int, batch_size: int, info: DistInfo, device: torch.device, seed: int,
                 augment: str, crop_pad: int):
        if n == 0:
            raise DataError("the training split is empty")
        self.n, self.batch_size, self.info, self.device = n, batch_size, info, device
        self.seed, self.augment, self.crop_pad = seed, augment, crop_pad

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def _device_augment(self, x: torch.Tensor, n_global: int, epoch: int, step: int) -> torch.Tensor:
        if self.augment not in ("crop-flip", "flip"):
            return x
        pad = self.crop_pad if self.augment == "crop-flip" else 0
        params = crop_flip_params(n_global, pad, True, self.seed, epoch, step)
        return crop_flip(x, params[self.info.rank::self.info.world], pad)

    def eval_positions(self, limit: int) -> torch.Tensor:
        n = min(limit, self.n) if limit else self.n
        return torch.arange(n)[self.info.rank::self.info.world]


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class MemorySource(_Source):
    """A split held on the device; ``x`` uint8 (0..255) or float32 ([0, 1])."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, batch_size: int, info: DistInfo, device: torch.device,
                 seed: int = 0, augment: str = "none", crop_pad: int = 0):
        super().__init__(len(x), batch_size, info, device, seed, augment, crop_pad)
        if augment == "resize-crop-flip":
            raise DataError("augment resize-crop-flip needs an image-folder dataset (imagenet:DIR)")
        self.x = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        self.y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(device)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        perm = epoch_permutation(self.n, self.seed, epoch)
        r, w = self.info.rank, self.info.world
        for s in range(start_step, self.steps_per_epoch):
            g = step_indices(self.n, self.batch_size, self.seed, epoch, s, perm=perm)
            idx = g[r::w].to(self.device, non_blocking=True)
            x = _to_float(self.x[idx])
            yield self._device_augment(x, len(g), epoch, s), self.y[idx], len(g)

    def eval_batches(self, batch: int, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pos = self.eval_positions(limit)
        for i in range(0, len(pos), batch):
            idx = pos[i:i + batch].to(self.device)
            yield _to_float(self.x[idx]), self.y[idx]


class _FolderSet(torch.utils.data.Dataset):
    """Decodes ``(index, epoch)`` keys into uint8 (3, S, S) tensors."""

    def __init__(self, folder: ImageFolder, size: int, train: bool, augment: str, resize: int, seed: int):
        self.folder, self.size, self.train, self.augment = folder, size, train, augment
        self.resize, self.seed = resize, seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key):
        i, epoch = key
        im = self.folder.open(i)
        S = self.size
        if self.augment == "resize-crop-flip" or self.folder.eval_resize:
            im = resize_shorter(im, self.resize)
            if self.train and self.augment == "resize-crop-flip":
                rng = np.random.default_rng(seed_for(self.seed, SAMPLE, epoch, i))
                w, h = im.size
                left, top = int(rng.integers(0, w - S + 1)), int(rng.integers(0, h - S + 1))
                im = im.crop((left, top, left + S, top + S))
                if rng.integers(0, 2):
                    from PIL import Image

                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                im = center_crop(im, S)
        elif im.size != (S, S):
            raise DataError(f"{self.folder.samples[i][0]}: image is {im.size[0]}x{im.size[1]}, the model "
                            f"takes {S}x{S} (use --augment resize-crop-flip, or resize the images)")
        return torch.from_numpy(to_chw(im)), self.folder.samples[i][1]


class _Keys(torch.utils.data.Sampler):
    """Yields each step's local list of ``(index, epoch)`` keys."""

    def __init__(self, batches: list[torch.Tensor], epoch: int):
        self.batches, self.epoch = batches, epoch

    def __iter__(self):
        for b in self.batches:
            yield [(int(i), self.epoch) for i in b]

    def __len__(self) -> int:
        return len(self.batches)


def auto_workers(device: torch.device, info: DistInfo) -> int:
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // info.world - 1))


class FolderSource(_Source):
    """An image folder streamed through worker processes (pinned memory on CUDA)."""

    def __init__(self, folder: ImageFolder, *, size: int, train: bool, batch_size: int, info: DistInfo,
                 device: torch.device, seed: int = 0, augment: str = "none", crop_pad: int = 0,
                 resize: int = 0, workers: int = -1):
        super().__init__(len(folder), batch_size, info, device, seed, augment, crop_pad)
        self.folder = folder
        resize = resize or folder.eval_resize or round(size * 256 / 224)
        self.set = _FolderSet(folder, size, train, augment, resize, seed)
        self.workers = auto_workers(device, info) if workers < 0 else workers
        self.size = size

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    def _loader(self, batches: list[torch.Tensor], epoch: int):
        kw = dict(num_workers=self.workers, pin_memory=self.device.type == "cuda")
        if self.workers > 0:
            kw.update(prefetch_factor=4, persistent_workers=False)
        return torch.utils.data.DataLoader(self.set, batch_sampler=_Keys(batches, epoch), **kw)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        perm = epoch_permutation(self.n, self.seed, epoch)
        r, w = self.info.rank, self.info.world
        globals_ = [step_indices(self.n, self.batch_size, self.seed, epoch, s, perm=perm)
                    for s in range(start_step, self.steps_per_epoch)]
        for k, (x, y) in enumerate(self._loader([g[r::w] for g in globals_], epoch)):
            s = start_step + k
            x = _to_float(x.to(self.device, non_blocking=True))
            yield self._device_augment(x, len(globals_[k]), epoch, s), y.to(self.device, non_blocking=True), \
                len(globals_[k])

    def eval_batches(self, batch: int, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pos = self.eval_positions(limit)
        if limit and limit < self.n:  # spread the subset over all (class-sorted) samples
            spread = torch.from_numpy(np.linspace(0, self.n - 1, limit).round().astype(np.int64))
            pos = spread[self.info.rank::self.info.world]
        chunks = [pos[i:i + batch] for i in range(0, len(pos), batch)]
        for x, y in self._loader(chunks, 0):
            yield _to_float(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
