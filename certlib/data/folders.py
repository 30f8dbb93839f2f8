"""Image folders (imagefolder, imagenet, tinyimagenet): lazily decoded with
Pillow (no torchvision), with the evaluation transform."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from certlib.data.base import DataError, ImageArrays, _guard_memory, parse_spec

#: File name endings read as images (torchvision's list), case-insensitive.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
