"""Data specs for training: CIFAR pickles, image folders (Pillow), Tiny-ImageNet,
ImageNet layout; clear DataErrors; the streaming and in-memory batch sources."""

import pickle
import subprocess
import sys
import json

import numpy as np
import pytest
import torch
from PIL import Image

from certlib.data import DataError, load, load_images, open_folder
from certlib.train.augment import crop_flip, crop_flip_params, epoch_permutation
from certlib.train.distributed import DistInfo
from certlib.train.sources import FolderSource, MemorySource, step_indices


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _rand_img(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """imagefolder:DIR with 2 classes, 32x32 PNGs: 6 train + 2 val per class."""
    root = tmp_path_factory.mktemp("imf")
    rng = np.random.default_rng(0)
    imgs = {}
    for split, n in (("train", 6), ("val", 2)):
        for c in ("cat", "ant"):
            for i in range(n):
                a = _rand_img(rng, 32, 32)
                _png(root / split / c / f"{i}.png", a)
                imgs[(split, c, i)] = a
    return root, imgs


def test_imagefolder_load_labels_and_pixels(folder):
    root, imgs = folder
    ds = load(f"imagefolder:{root}", "test")
    assert ds.x.shape == (4, 3, 32, 32) and ds.x.dtype == np.float32 and ds.num_classes == 2
    assert list(ds.y) == [0, 0, 1, 1]  # sorted class names: ant=0, cat=1
    np.testing.assert_array_equal(ds.x[2], imgs[("val", "cat", 0)].transpose(2, 0, 1) / np.float32(255))
    tr = load_images(f"imagefolder:{root}", "train")
    assert tr.x.dtype == np.uint8 and len(tr) == 12


def test_folder_errors(tmp_path, folder):
    with pytest.raises(DataError, match="not found"):
        load(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train/"):
        load(f"imagefolder:{tmp_path / 'empty'}", "train")
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad"
    _png(bad / "train" / "a" / "0.png", _rand_img(rng, 32, 32))
    _png(bad / "val" / "b" / "0.png", _rand_img(rng, 32, 32))
    with pytest.raises(DataError, match="not a class of the train split"):
        load(f"imagefolder:{bad}")
    mixed = tmp_path / "mixed"
    _png(mixed / "val" / "a" / "0.png", _rand_img(rng, 32, 32))
    _png(mixed / "val" / "a" / "1.png", _rand_img(rng, 20, 32))
    with pytest.raises(DataError, match="one size"):
        load(f"imagefolder:{mixed}")
    broken = tmp_path / "broken"
    (broken / "val" / "a").mkdir(parents=True)
    (broken / "val" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode"):
        load(f"imagefolder:{broken}")
    flat = tmp_path / "flat"  # a folder of class folders alone is a test split
    _png(flat / "x" / "0.png", _rand_img(rng, 8, 8))
    assert load(f"imagefolder:{flat}").x.shape == (1, 3, 8, 8)
    inet = tmp_path / "inet"
    _png(inet / "train" / "n01" / "0.png", _rand_img(rng, 8, 8))
    _png(inet / "val" / "0.png", _rand_img(rng, 8, 8))
    with pytest.raises(DataError, match="class folders"):
        load(f"imagenet:{inet}")


def test_imagenet_eval_transform_and_streaming(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (("train", 3), ("val", 2)):
        for c in ("n02", "n01"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.JPEG", _rand_img(rng, 260 + 10 * i, 300))
    ds = load(f"imagenet:{tmp_path}", "test")
    assert ds.x.shape == (4, 3, 224, 224) and list(ds.y) == [0, 0, 1, 1]
    info, dev = DistInfo(), torch.device("cpu")
    te = FolderSource(open_folder(f"imagenet:{tmp_path}", "test"), size=224, train=False, batch_size=4,
                      info=info, device=dev, resize=256, workers=0)
    x, y = next(te.eval_batches(4))
    np.testing.assert_array_equal(x.numpy(), ds.x)  # the same centre crop as load()
    tr = FolderSource(open_folder(f"imagenet:{tmp_path}", "train"), size=224, train=True, batch_size=4,
                      info=info, device=dev, augment="resize-crop-flip", resize=256, workers=0, seed=3)
    a = [b[0] for b in tr.epoch(0)]
    assert [t.shape[0] for t in a] == [4, 2] and a[0].shape[1:] == (3, 224, 224)
    tr.workers = 2  # worker processes draw the same per-sample crops
    b = [b[0] for b in tr.epoch(0)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = [b[0] for b in tr.epoch(1)]
    assert not torch.equal(a[0], c[0])
    assert torch.equal(next(tr.epoch(0, start_step=1))[0], a[1])  # resume mid-epoch


def _tiny(root, rng):
    wnids = ["n0b", "n0a", "n0c"]
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        for i in range(2):
            p = root / "train" / w / "images" / f"{w}_{i}.JPEG"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_rand_img(rng, 64, 64)).save(p, format="JPEG")
    lines = []
    for i, w in enumerate(["n0c", "n0a"]):
        p = root / "val" / "images" / f"val_{i}.JPEG"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rand_img(rng, 64, 64)).save(p, format="JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tinyimagenet_layout(tmp_path):
    _tiny(tmp_path / "tiny-imagenet-200", np.random.default_rng(4))
    tr, te = load(f"tinyimagenet:{tmp_path}", "train"), load(f"tinyimagenet:{tmp_path}", "test")
    assert tr.x.shape == (6, 3, 64, 64) and te.num_classes == 3
    assert list(tr.y) == [0, 0, 1, 1, 2, 2] and list(te.y) == [2, 0]
    (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn9zz\n")
    with pytest.raises(DataError, match="known wnid"):
        load(f"tinyimagenet:{tmp_path}", "test")


def _cifar_dir(root, n=4):
    rng = np.random.default_rng(5)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n))}, f)
    return root


def test_cifar_batches_and_errors(tmp_path):
    d = _cifar_dir(tmp_path / "c10" / "cifar-10-batches-py")
    a = load_images(f"cifar10:{tmp_path / 'c10'}", "train")
    assert a.x.shape == (20, 3, 32, 32) and a.x.dtype == np.uint8
    np.testing.assert_array_equal(load(f"cifar10:{d}", "train").x, a.x / np.float32(255))
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load(f"cifar10:{d}", "train")
    (d / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        load(f"cifar10:{d}", "test")


def test_memory_source_shards_and_augments():
    n, B = 37, 8
    x = np.arange(n * 3 * 4 * 4, dtype=np.float32).reshape(n, 3, 4, 4) / (n * 48)
    y = np.arange(n)
    dev = torch.device("cpu")
    full = MemorySource(x, y, batch_size=B, info=DistInfo(), device=dev, seed=7, augment="crop-flip", crop_pad=2)
    ranks = [MemorySource(x, y, batch_size=B, info=DistInfo(r, 3), device=dev, seed=7, augment="crop-flip",
                          crop_pad=2) for r in range(3)]
    one = list(full.epoch(1))
    per = [list(s.epoch(1)) for s in ranks]
    assert full.steps_per_epoch == 5 and [b[2] for b in one] == [8, 8, 8, 8, 5]
    for s, (xb, yb, ng) in enumerate(one):
        for r in range(3):  # rank r holds positions r::3 of the global batch, augmented identically
            assert torch.equal(per[r][s][1], yb[r::3]) and torch.equal(per[r][s][0], xb[r::3])
            assert per[r][s][2] == ng
    assert sorted(torch.cat([b[1] for b in one]).tolist()) == list(range(n))
    assert torch.equal(torch.cat([b[1] for b in one]), epoch_permutation(n, 7, 1))
    assert torch.equal(step_indices(n, B, 7, 1, 2), one[2][1])


def test_crop_flip_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 5, 7, generator=g)
    p = crop_flip_params(6, 3, True, 0, 0, 0)
    out = crop_flip(x, p, 3)
    for i in range(6):
        pad = torch.nn.functional.pad(x[i], (3, 3, 3, 3))
        ref = pad[:, p[i, 0]:p[i, 0] + 5, p[i, 1]:p[i, 1] + 7]
        if p[i, 2]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_cli_trains_on_an_image_folder(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "certlib.cli", "train", "--preset", "cifar10", "--width", "8",
                        "--depth", "1", "--dense-dim", "16", "--data", f"imagefolder:{root}", "--epochs", "2",
                        "--batch-size", "4", "--augment", "crop-flip", "--threads", "1", "--workers", "0",
                        "--out", str(out), "--warmup-epochs", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["verified_samples"] == 4 and 0 <= s["sound_vra"] <= s["clean_accuracy"] <= 1
    assert (out / "curves.png").stat().st_size > 1000 and (out / "verify.json").is_file()
    r = subprocess.run([sys.executable, "-m", "certlib.cli", "train", "--data", f"imagefolder:{root}",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "expects 1x8x8" in r.stderr and "Traceback" not in r.stderr
