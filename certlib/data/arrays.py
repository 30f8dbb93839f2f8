"""Array datasets: scikit-learn's embedded digits, ``npz:PATH`` and the CIFAR
python-pickle batches.  Nothing here downloads anything."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from certlib.data.base import DIGITS_SEED, DIGITS_TEST_SIZE, DataError, Dataset, ImageArrays, _check


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


def _cifar(kind: str, root: str, split: str) -> "ImageArrays":
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
    return ImageArrays(np.concatenate(xs), np.concatenate(ys), f"{kind}/{split}", ncls)
