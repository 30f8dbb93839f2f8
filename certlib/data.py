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
  ``tinyimagenet:DIR`` the official Tiny-ImageNet-200 folder (``train/<wnid>/images``,
                      ``val/images`` + ``val/val_annotations.txt``); the test split
                      is ``val``.  64x64 RGB.
  ``imagenet:DIR``    ``DIR/train/<wnid>/*.JPEG`` and ``DIR/val/<wnid>/*.JPEG`` (val
                      sorted into class folders, as torchvision expects); loaded
                      with the evaluation transform: shorter side resized to 256
                      (bilinear), centre crop 224.
  ``imagefolder:DIR`` ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``test``);
                      a folder of class folders alone is its test split.  Images
                      keep their size, which must be the same for all.

Folder datasets are decoded with Pillow (no torchvision needed).  Labels are
the index of the class folder name in the sorted list of the TRAIN split's
class folders (torchvision's ImageFolder convention), for both splits.
:func:`load` materialises a split in memory as float32; it refuses splits
larger than ``CERTLIB_MAX_LOAD_GIB`` (default 16) GiB; the trainer streams
such splits through :func:`open_folder` instead.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "DataError", "load", "parse_spec", "DIGITS_TEST_SIZE", "DIGITS_SEED", "ImageArrays",
           "ImageFolder", "open_folder", "load_images", "IMG_EXTENSIONS"]

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


def load(spec: str, split: str = "test") -> Dataset:
    """Load a dataset split ("train" or "test") from a ``--data`` spec."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    kind, arg = parse_spec(spec)
    if kind == "digits":
        return _digits(split)
    if kind == "npz":
        return _npz(os.path.expanduser(arg), split)
    return load_images(spec, split).to_dataset()


# ----------------------------------------------------------------------------
# uint8 image arrays and image folders (Pillow; nothing here needs torchvision)
# ----------------------------------------------------------------------------

#: File name endings read as images (torchvision's list), case-insensitive.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


class ImageFolder:
    """A lazily decoded split of an image-folder dataset: ``samples`` is a list
    of ``(path, label)``; :meth:`read` decodes one image as RGB uint8 (C, H, W)
    with an optional transform applied to the Pillow image first.

    ``eval_resize``/``eval_crop`` (ImageNet: 256 / 224) give the evaluation
    transform used by :func:`load`; 0 keeps images as they are.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], name: str,
                 eval_resize: int = 0, eval_crop: int = 0):
        self.samples = samples
        self.classes = classes
        self.name = name
        self.eval_resize = eval_resize
        self.eval_crop = eval_crop

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.fromiter((lab for _, lab in self.samples), dtype=np.int64, count=len(self.samples))

    def open(self, i: int):
        """The Pillow image of sample ``i``, converted to RGB."""
        from PIL import Image

        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:
            raise DataError(f"cannot decode image {path}: {e}") from None

    def read_eval(self, i: int) -> np.ndarray:
        """Sample ``i`` with the evaluation transform, uint8 (3, H, W)."""
        im = self.open(i)
        if self.eval_resize:
            im = resize_shorter(im, self.eval_resize)
        if self.eval_crop:
            im = center_crop(im, self.eval_crop)
        return to_chw(im)

    def subset(self, limit: int | None) -> "ImageFolder":
        """At most ``limit`` samples spread evenly over the (class-sorted) list,
        so every class is represented; deterministic."""
        if not limit or limit >= len(self):
            return self
        idx = np.linspace(0, len(self) - 1, int(limit)).round().astype(np.int64)
        return ImageFolder([self.samples[i] for i in idx], self.classes, f"{self.name}[{limit}]",
                           self.eval_resize, self.eval_crop)

    def to_arrays(self, threads: int | None = None) -> ImageArrays:
        """Decode every sample (evaluation transform) into uint8 arrays, in
        parallel threads (Pillow releases the GIL while decoding)."""
        from concurrent.futures import ThreadPoolExecutor

        if not len(self):
            raise DataError(f"{self.name}: no images")
        first = self.read_eval(0)
        _guard_memory(len(self) * first.size * 4, self.name)
        x = np.empty((len(self), *first.shape), dtype=np.uint8)
        x[0] = first

        def one(i: int) -> None:
            a = self.read_eval(i)
            if a.shape != first.shape:
                raise DataError(f"{self.samples[i][0]}: image of shape {a.shape[1:]} but the first one is "
                                f"{first.shape[1:]}; imagefolder images must all have one size (resize them "
                                "first, or use imagenet:DIR for the resize-256/crop-224 transform)")
            x[i] = a

        with ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 1)) as ex:
            list(ex.map(one, range(1, len(self))))
        return ImageArrays(x, self.labels, self.name, self.num_classes)


def resize_shorter(im, size: int):
    """Resize a Pillow image so its shorter side is ``size`` (bilinear, as
    torchvision's Resize(int))."""
    from PIL import Image

    w, h = im.size
    if min(w, h) == size:
        return im
    if w <= h:
        nw, nh = size, max(1, int(size * h / w))
    else:
        nw, nh = max(1, int(size * w / h)), size
    return im.resize((nw, nh), Image.BILINEAR)


def center_crop(im, size: int):
    w, h = im.size
    if w < size or h < size:
        raise DataError(f"image of size {w}x{h} is smaller than the crop {size}")
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def to_chw(im) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS


def _class_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_classes(d: Path, classes: list[str], where: str, sub: str = "") -> list[tuple[str, int]]:
    index = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for c in _class_dirs(d):
        if c not in index:
            raise DataError(f"{where}: class folder {c!r} in {d} is not a class of the train split")
        cdir = d / c / sub if sub and (d / c / sub).is_dir() else d / c
        files = sorted(p for p in cdir.rglob("*") if _is_image(p))
        samples.extend((str(p), index[c]) for p in files)
    if not samples:
        raise DataError(f"{where}: no images ({', '.join(IMG_EXTENSIONS)}) found under {d}")
    return samples


def _split_dir(root: Path, split: str) -> Path | None:
    names = ("train",) if split == "train" else ("val", "test")
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _imagefolder(kind: str, root: str, split: str) -> ImageFolder:
    d = Path(root)
    if not d.is_dir():
        raise DataError(f"{kind} directory not found: {root}")
    sd = _split_dir(d, split)
    train_dir = d / "train" if (d / "train").is_dir() else None
    if sd is None:
        has_splits = train_dir is not None or _split_dir(d, "test") is not None
        if split == "test" and not has_splits and _class_dirs(d):
            sd = d  # a plain folder of class folders: its test split
        else:
            want = "train/" if split == "train" else "val/ (or test/)"
            raise DataError(f"{kind}: {d} has no {want} folder of class folders (expected "
                            f"{d}/train/<class>/*.png and {d}/val/<class>/*.png)")
    classes = _class_dirs(train_dir if train_dir is not None else sd)
    if not classes:
        raise DataError(f"{kind}: {train_dir or sd} holds no class folders")
    if kind == "imagenet":
        loose = [p for p in sd.iterdir() if _is_image(p)][:1]
        if loose:
            raise DataError(f"imagenet: {sd} holds images directly ({loose[0].name}); sort the validation "
                            "images into class folders first (the usual valprep script)")
    samples = _scan_classes(sd, classes, kind)
    resize, crop = (256, 224) if kind == "imagenet" else (0, 0)
    return ImageFolder(samples, classes, f"{kind}/{split}", resize, crop)


def _tinyimagenet(root: str, split: str) -> ImageFolder:
    d = Path(root)
    if not d.is_dir():
        raise DataError(f"tinyimagenet directory not found: {root}")
    if (d / "tiny-imagenet-200").is_dir():
        d = d / "tiny-imagenet-200"
    if not (d / "train").is_dir():
        raise DataError(f"tinyimagenet: {d} lacks train/ (expected the official tiny-imagenet-200 folder)")
    wnids_file = d / "wnids.txt"
    if wnids_file.is_file():
        classes = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
    else:
        classes = _class_dirs(d / "train")
    if not classes:
        raise DataError(f"tinyimagenet: no classes found in {d}")
    if split == "train":
        return ImageFolder(_scan_classes(d / "train", classes, "tinyimagenet", "images"), classes,
                           "tinyimagenet/train")
    val = d / "val"
    ann = val / "val_annotations.txt"
    if ann.is_file():
        index = {c: i for i, c in enumerate(classes)}
        samples = []
        for ln, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split("\t")
            if not line.strip():
                continue
            if len(parts) < 2 or parts[1] not in index:
                raise DataError(f"tinyimagenet: {ann}:{ln}: expected 'file<TAB>wnid...' with a known wnid")
            p = val / "images" / parts[0]
            if not p.is_file():
                raise DataError(f"tinyimagenet: {p} (listed in {ann.name}) is missing")
            samples.append((str(p), index[parts[1]]))
        if not samples:
            raise DataError(f"tinyimagenet: {ann} lists no images")
        return ImageFolder(samples, classes, "tinyimagenet/test")
    if val.is_dir() and _class_dirs(val):
        return ImageFolder(_scan_classes(val, classes, "tinyimagenet", "images"), classes, "tinyimagenet/test")
    raise DataError(f"tinyimagenet: {d} lacks val/val_annotations.txt (or val/<wnid>/ folders)")


def open_folder(spec: str, split: str = "test") -> ImageFolder:
    """The lazily decoded split of a folder spec (tinyimagenet, imagenet,
    imagefolder): file list and labels only, nothing decoded yet."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    kind, arg = parse_spec(spec)
    if kind == "tinyimagenet":
        return _tinyimagenet(os.path.expanduser(arg), split)
    if kind in ("imagenet", "imagefolder"):
        return _imagefolder(kind, os.path.expanduser(arg), split)
    raise DataError(f"{spec!r} is not an image-folder spec (tinyimagenet:, imagenet:, imagefolder:)")


def load_images(spec: str, split: str = "test") -> ImageArrays:
    """A split as uint8 images (CIFAR batches or a folder spec decoded with
    the evaluation transform); raises DataError for digits/npz (float data)."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    kind, arg = parse_spec(spec)
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, os.path.expanduser(arg), split)
    if kind in ("tinyimagenet", "imagenet", "imagefolder"):
        return open_folder(spec, split).to_arrays()
    raise DataError(f"{spec!r} holds float arrays, not uint8 images; use load()")
