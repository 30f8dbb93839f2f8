"""Datasets behind ``--data SPEC``.  Nothing here downloads anything.

Specs:
  ``digits``          scikit-learn's bundled 8x8 digits (1797 images, 1x8x8,
                      pixel values 0..16 scaled to [0, 1]).  Deterministic
                      split: stratified, ``random_state=0``, 360 test images
                      (20%), the remaining 1437 for training.
  ``npz:PATH``        arrays ``x`` (float, N,C,H,W in [0,1]) and ``y`` (int, N);
                      optional ``x_train``/``y_train`` and ``x_test``/``y_test``.
  ``cifar10:DIR``     the standard python-pickle batches (data_batch_1..5,
  ``cifar100:DIR``    test_batch / train, test), read with numpy.
  ``imagefolder:DIR`` / ``imagenet:DIR`` / ``tinyimagenet:DIR``: need the optional
                      ``vision`` extra (torchvision); see certlib.train.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "DataError", "load", "parse_spec", "DIGITS_TEST_SIZE", "DIGITS_SEED"]

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


def _digits(split: str) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SEED, stratify=y)
    if split == "train":
        return Dataset(xtr, ytr, "digits/train", 10)
    return Dataset(xte, yte, "digits/test", 10)


def _npz(path: str, split: str) -> Dataset:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        with np.load(p, allow_pickle=False) as f:
            keys = set(f.files)
            if f"x_{split}" in keys and f"y_{split}" in keys:
                x, y = f[f"x_{split}"], f[f"y_{split}"]
            elif "x" in keys and "y" in keys:
                x, y = f["x"], f["y"]
            else:
                raise DataError(f"{path}: needs arrays 'x' and 'y' (or x_{split}/y_{split}); "
                                f"found {sorted(keys)}")
    except DataError:
        raise
    except Exception as e:  # malformed archive
        raise DataError(f"cannot read {path} as an .npz archive: {e}") from None
    x, y = _check(x, y, path)
    return Dataset(x, y, f"npz:{p.name}/{split}", int(y.max()) + 1 if y.size else 0)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"cannot read CIFAR batch {path}: {e}") from None


def _cifar(kind: str, root: str, split: str) -> Dataset:
    d = Path(root)
    if not d.is_dir():
        raise DataError(f"{kind} directory not found: {root}")
    # accept both DIR and DIR/cifar-10-batches-py style layouts
    sub = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[kind]
    if (d / sub).is_dir():
        d = d / sub
    if kind == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, ncls = b"labels", 10
    else:
        files = ["train"] if split == "train" else ["test"]
        label_key, ncls = b"fine_labels", 100
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise DataError(f"{kind}: {d} lacks {', '.join(missing)} (expected the python-pickle "
                        "batches of the official archive)")
    xs, ys = [], []
    for f in files:
        b = _unpickle(d / f)
        if b"data" not in b or label_key not in b:
            raise DataError(f"{kind}: {d / f} is not a CIFAR batch (keys {list(b)[:5]})")
        xs.append(np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(b[label_key], dtype=np.int64))
    x = np.concatenate(xs).astype(np.float32) / 255.0
    return Dataset(x, np.concatenate(ys), f"{kind}/{split}", ncls)


def load(spec: str, split: str = "test") -> Dataset:
    """Load a dataset split ("train" or "test") from a ``--data`` spec."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    kind, arg = parse_spec(spec)
    if kind == "digits":
        return _digits(split)
    if kind == "npz":
        return _npz(os.path.expanduser(arg), split)
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, os.path.expanduser(arg), split)
    raise DataError(f"{kind}: folder datasets need the optional extra `pip install certlib[vision]` "
                    "and are loaded by the trainer's streaming loader, not in memory")
