"""Sample streams for ``certlib verify``: batches of ``(indices, x, y)`` in a
fixed order, never the whole split at once.

* :class:`ArrayStream` slices an in-memory :class:`~certlib.data.Dataset`
  (digits, npz, CIFAR): nothing new is held.
* :class:`FolderStream` decodes an image folder (``imagenet:``,
  ``imagefolder:``, ``tinyimagenet:``) with Pillow in ``torch.utils.data``
  worker processes, one batch at a time (at most ``workers * prefetch``
  batches in flight).  Pixels are exactly those of :func:`certlib.data.load`
  (uint8 / 255 in float32), so a streamed run certifies the same numbers.

``--limit N`` keeps the FIRST N samples of the split (as ``load(...).take(N)``
and ``certlib check`` do, so a certificate's data hash matches).  Under
``torchrun`` rank ``r`` of ``w`` takes samples ``r, r + w, r + 2w, ...``.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np

from certlib.data.base import DataError, Dataset
from certlib.data.folders import ImageFolder

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # global indices (int64), x float32 N,C,H,W, y int64


class ArrayStream:
    """Batches of an in-memory dataset (see the module docstring)."""

    def __init__(self, data: Dataset):
        self.data = data
        self.name, self.num_classes = data.name, data.num_classes

    def __len__(self) -> int:
        return len(self.data)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.x.shape[1:])

    def batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        idx = np.arange(rank, len(self), world, dtype=np.int64)
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield j, self.data.x[j], self.data.y[j]

    def sha256(self) -> str:
        return self.data.sha256()


class _Decode:
    """torch Dataset: sample i -> (i, uint8 (C,H,W) array or None, label, error text or "")."""

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        try:  # a worker's exception would reach the user as a traceback: hand it back as text
            return i, self.folder.read_eval(i), self.folder.samples[i][1], ""
        except DataError as e:
            return i, None, -1, str(e)


def _collate(items):
    bad = [e for _, _, _, e in items if e]
    if bad:
        return None, None, None, bad[0]
    shapes = {a.shape for _, a, _, _ in items}
    if len(shapes) > 1:
        first = items[0][1].shape
        odd = next(k for k, (_, a, _, _) in enumerate(items) if a.shape != first)
        return None, None, None, (f"sample {items[odd][0]} has shape {items[odd][1].shape[1:]} but sample "
                                  f"{items[0][0]} has {first[1:]}; imagefolder images must all have one size "
                                  "(resize them first, or use imagenet:DIR for the resize-256/crop-224 transform)")
    return (np.array([i for i, _, _, _ in items], dtype=np.int64), np.stack([a for _, a, _, _ in items]),
            np.array([y for _, _, y, _ in items], dtype=np.int64), "")


class FolderStream:
    """An image folder decoded batch by batch in ``workers`` processes
    (0: in this process).  ``limit``: the first ``limit`` samples only."""

    def __init__(self, folder: ImageFolder, limit: int | None = None, workers: int = 2, prefetch: int = 2):
        if not len(folder):
            raise DataError(f"{folder.name}: no images")
        n = min(len(folder), limit) if limit else len(folder)
        self.folder, self.n, self.workers, self.prefetch = folder, n, max(0, int(workers)), prefetch
        self.name = folder.name if n == len(folder) else f"{folder.name}[:{n}]"
        self.num_classes = folder.num_classes
        self._shape = None

    def __len__(self) -> int:
        return self.n

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self._shape is None:
            self._shape = tuple(self.folder.read_eval(0).shape)
        return self._shape

    def _uint8_batches(self, batch_size: int, rank: int, world: int):
        import torch

        idx = list(range(rank, self.n, world))
        chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        kw = dict(num_workers=self.workers, collate_fn=_collate)
        if self.workers:
            kw["prefetch_factor"] = self.prefetch
        loader = torch.utils.data.DataLoader(_Decode(self.folder), batch_sampler=chunks, **kw)
        shape = self.sample_shape
        for i, x, y, err in loader:
            if err:
                raise DataError(err)
            if tuple(x.shape[1:]) != shape:
                raise DataError(f"sample {int(i[0])} has shape {tuple(x.shape[2:])} but sample 0 has "
                                f"{shape[1:]}; imagefolder images must all have one size")
            yield i, x, y

    def batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        for i, x, y in self._uint8_batches(batch_size, rank, world):
            yield i, x.astype(np.float32) / 255.0, y  # exactly ImageArrays.to_dataset's pixels

    def sha256(self, batch_size: int = 256) -> str:
        """The data hash of :meth:`certlib.data.Dataset.sha256` (x as float32
        bytes, then y as int64), computed in one streamed pass."""
        h, ys = hashlib.sha256(), []
        for _, x, y in self.batches(batch_size):
            h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
            ys.append(y)
        h.update(np.concatenate(ys).astype(np.int64).tobytes())
        return h.hexdigest()


def open_stream(spec: str, limit: int | None = None, workers: int = 2):
    """The test split of ``spec`` as a stream: image folders are decoded batch
    by batch; the other specs (small arrays) are loaded as today."""
    from certlib.data import load, parse_spec
    from certlib.data.folders import open_folder

    kind, _ = parse_spec(spec)
    if kind in ("imagenet", "imagefolder", "tinyimagenet"):
        return FolderStream(open_folder(spec, "test"), limit, workers)
    return ArrayStream(load(spec, "test").take(limit))


__all__ = ["ArrayStream", "FolderStream", "open_stream"]
