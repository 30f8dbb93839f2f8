"""Checkpoints: safetensors weights (power-iteration buffers included) with the
architecture and training config in the metadata; written atomically
(write to a temporary file in the same folder, then rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from certlib.errors import UsageError


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in metadata.items()})
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


__all__ = ["save_model", "load_model", "atomic_save_safetensors", "torch"]
