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
larger than ``CERTLIB_MAX_LOAD_GIB`` (default 16) GiB; the trainer and ``certlib verify``
(:mod:`certlib.data.stream`) stream
such splits through :func:`open_folder` instead.
"""


from __future__ import annotations

import os

from certlib.data.arrays import _cifar, _digits, _npz
from certlib.data.base import (DIGITS_SEED, DIGITS_TEST_SIZE, DataError, Dataset, ImageArrays, _guard_memory,  # noqa: F401
                               parse_spec)
from certlib.data.folders import IMG_EXTENSIONS, ImageFolder, center_crop, open_folder, resize_shorter, to_chw  # noqa: F401

__all__ = ["Dataset", "DataError", "load", "parse_spec", "DIGITS_TEST_SIZE", "DIGITS_SEED", "ImageArrays",
           "ImageFolder", "open_folder", "load_images", "IMG_EXTENSIONS"]


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
