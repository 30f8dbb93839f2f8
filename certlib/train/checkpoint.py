"""Checkpoints: safetensors weights (power-iteration buffers included) with the
architecture and training config in the metadata; written atomically
(write to a temporary file in the same folder, then rename).

Resumable training state lives in ``OUT/checkpoints/step-NNNNNNNNN/``:
``model.safetensors`` (weights + power-iteration vectors, loadable by
:func:`load_model`) and ``train_state.pt`` (AdamW state, epoch, step, step
within the epoch, metric accumulators, RNG states, the config).  A checkpoint
folder is written under a temporary name, flushed to disk, then renamed: a
run killed at any instant leaves either the previous complete checkpoint or
the new one, never a half-written one.  ``OUT/checkpoints/LATEST`` names the
newest (the newest complete folder is used if LATEST is missing).""" 

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from certlib.errors import UsageError


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in metadata.items()})
    _fsync(tmp)
    os.replace(tmp, path)


def save_model(model, path: str | Path, train_config: dict | None = None, extra: dict | None = None) -> None:
    meta = {"format": "certlib-liresnet-1", "model_config": model.config.to_dict()}
    if train_config is not None:
        meta["train_config"] = train_config
    if extra:
        meta.update(extra)
    atomic_save_safetensors(model.state_dict(), path, meta)


def load_model(path: str | Path):
    """Rebuild the LiResNet stored in a certlib safetensors checkpoint."""
    from certlib.models.liresnet import LiResNet, LiResNetConfig

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UsageError(f"{path}: not a safetensors checkpoint ({e})") from None
    if "model_config" not in meta:
        raise UsageError(f"{path}: no certlib model config in the checkpoint metadata")
    try:
        cfg = LiResNetConfig.from_dict(json.loads(meta["model_config"]))
        model = LiResNet(cfg)
        model.load_state_dict(state)
    except Exception as e:
        raise UsageError(f"{path}: cannot rebuild the model ({e})") from None
    model.eval()
    return model, {k: json.loads(v) for k, v in meta.items()}


# ---------------------------------------------------------------- train state

STATE_FORMAT = "certlib-train-state-1"


def _ckpt_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except Exception:  # another number of GPUs: nothing in training draws from them
            pass


def save_train_state(out: str | Path, model, optimizer, state: dict, train_config: dict) -> Path:
    """Write a complete resumable checkpoint for ``state["step"]`` and point
    LATEST at it; older checkpoint folders are removed afterwards."""
    root = _ckpt_root(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(state['step']):09d}"
    final = root / name
    if final.is_dir():
        return final
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp / "model.safetensors", train_config,
               extra={"step": int(state["step"]), "epoch": int(state["epoch"])})
    blob = {"format": STATE_FORMAT, "optimizer": optimizer.state_dict(), "rng": rng_state(),
            "config": train_config, **state}
    torch.save(blob, tmp / "train_state.pt")
    _fsync(tmp / "train_state.pt")
    os.replace(tmp, final)
    latest_tmp = root / "LATEST.tmp"
    latest_tmp.write_text(name + "\n")
    _fsync(latest_tmp)
    os.replace(latest_tmp, root / "LATEST")
    for old in root.iterdir():
        if old.name != name and (old.name.startswith("step-") or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out``, or None."""
    root = _ckpt_root(out)
    if not root.is_dir():
        return None
    latest = root / "LATEST"
    if latest.is_file():
        d = root / latest.read_text().strip()
        if (d / "train_state.pt").is_file() and (d / "model.safetensors").is_file():
            return d
    done = sorted(d for d in root.glob("step-*") if (d / "train_state.pt").is_file()
                  and (d / "model.safetensors").is_file())
    return done[-1] if done else None


def clear_checkpoints(out: str | Path) -> None:
    shutil.rmtree(_ckpt_root(out), ignore_errors=True)


def load_train_state(ckpt: Path, model, optimizer, device) -> dict:
    """Load weights + power vectors into ``model`` and the AdamW state into
    ``optimizer``; returns the rest of the saved state (epoch, step, ...)."""
    try:
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
        blob = torch.load(ckpt / "train_state.pt", map_location=device, weights_only=False)
    except Exception as e:
        raise UsageError(f"{ckpt}: unreadable checkpoint ({e}); delete it to start over") from None
    if blob.get("format") != STATE_FORMAT:
        raise UsageError(f"{ckpt}: not a certlib training state ({blob.get('format')!r})")
    with torch.no_grad():
        own = model.state_dict()
        missing = sorted(set(own) - set(weights))
        if missing:
            raise UsageError(f"{ckpt}: checkpoint lacks {missing[:5]} (another architecture?)")
        for k, v in own.items():
            if v.shape != weights[k].shape:
                raise UsageError(f"{ckpt}: {k} has shape {tuple(weights[k].shape)}, the model {tuple(v.shape)}")
            v.copy_(weights[k])
    optimizer.load_state_dict(blob.pop("optimizer"))
    return blob


__all__ = ["save_model", "load_model", "atomic_save_safetensors", "save_train_state", "load_train_state",
           "latest_checkpoint", "clear_checkpoints", "rng_state", "set_rng_state", "torch"]
