"""The types every data source returns (:class:`Dataset` float32 arrays,
:class:`ImageArrays` uint8 images), the spec parser and the input checks."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np


DIGITS_TEST_SIZE = 360
DIGITS_SEED = 0


class DataError(ValueError):
    """A data spec that cannot be loaded (message is meant for the user)."""


@dataclass
class Dataset:
    x: np.ndarray  # float32 N,C,H,W in [0,1]
    y: np.ndarray  # int64 N
    name: str
    num_classes: int

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.x, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.y, dtype=np.int64).tobytes())
        return h.hexdigest()

    def take(self, limit: int | None) -> "Dataset":
        if limit is None or limit >= len(self):
            return self
        return Dataset(self.x[:limit], self.y[:limit], self.name, self.num_classes)


def parse_spec(spec: str) -> tuple[str, str | None]:
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    known = {"digits", "npz", "cifar10", "cifar100", "imagefolder", "imagenet", "tinyimagenet"}
    if kind not in known:
        raise DataError(f"unknown data spec {spec!r}; use one of: digits, npz:PATH, "
                        "cifar10:DIR, cifar100:DIR, tinyimagenet:DIR, imagenet:DIR, imagefolder:DIR")
    if kind == "digits":
        if arg:
            raise DataError("'digits' takes no path")
        return kind, None
    if not arg:
        raise DataError(f"data spec {kind!r} needs a path: {kind}:PATH")
    return kind, arg


def _check(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4:
        raise DataError(f"{where}: x must have shape N,C,H,W, got {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{where}: y must have shape (N,) with N={x.shape[0]}, got {y.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: x must be float in [0,1], got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: y must be integer labels, got dtype {y.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where}: x contains NaN or Inf")
    if x.size and (x.min() < 0 or x.max() > 1):
        raise DataError(f"{where}: x must lie in [0, 1] (found [{x.min():.3g}, {x.max():.3g}])")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0")
    return x, y.astype(np.int64)


@dataclass
class ImageArrays:
    """A split as uint8 images (N, C, H, W) in 0..255: 4x smaller than a
    :class:`Dataset`; the trainer keeps these on the device."""

    x: np.ndarray
    y: np.ndarray
    name: str
    num_classes: int

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to_dataset(self) -> Dataset:
        _guard_memory(self.x.size * 4, self.name)
        return Dataset(self.x.astype(np.float32) / 255.0, self.y.astype(np.int64), self.name, self.num_classes)


def _guard_memory(nbytes: int, what: str) -> None:
    limit = float(os.environ.get("CERTLIB_MAX_LOAD_GIB", "16"))
    if nbytes > limit * 2 ** 30:
        raise DataError(f"{what}: {nbytes / 2 ** 30:.1f} GiB as float32 is more than CERTLIB_MAX_LOAD_GIB="
                        f"{limit:g}; certify a subset (--limit) or raise the limit")
