"""``train(config)``: EMMA training of a LiResNet, then ONNX export and a sound
evaluation through the same road as ``certlib verify``."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from certlib.data import load as load_data
from certlib.train import losses
from certlib.train.checkpoint import save_model
from certlib.train.config import TrainConfig, eps_at, lr_at

console = Console(stderr=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate_estimate(model, x: torch.Tensor, y: torch.Tensor, eps: float, batch: int = 512) -> dict:
    """Clean accuracy and the training-time ESTIMATED VRA (power iteration: not sound)."""
    model.eval()
    L = model.lipschitz_estimate(n_iter=0 if False else 5)
    K = L * model.pairwise_head_norms()
    correct = cert = 0
    for i in range(0, len(x), batch):
        f = model(x[i:i + batch])
        yb = y[i:i + batch]
        pred = f.argmax(1)
        fy = f.gather(1, pred[:, None])
        Ky = K[pred]
        mask = torch.ones_like(f, dtype=torch.bool).scatter_(1, pred[:, None], False)
        ok = torch.where(mask, fy - f > eps * Ky, torch.ones_like(mask)).all(1)
        correct += int((pred == yb).sum())
        cert += int(((pred == yb) & ok).sum())
    model.train()
    n = max(len(x), 1)
    return {"clean_accuracy": correct / n, "vra_estimate": cert / n, "lipschitz_estimate": float(L)}


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Train, save ``checkpoint.safetensors`` + ``model.onnx`` + ``metrics.jsonl``
    under ``cfg.out``; returns a summary dict (with the sound VRA when
    ``cfg.verify``)."""
    from certlib.models.liresnet import build
    from certlib.onnx_export import export_onnx

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    dev = _device(cfg.device)
    train_set = load_data(cfg.data, "train")
    test_set = load_data(cfg.data, "test")
    model = build(cfg.preset).to(dev)
    if tuple(train_set.x.shape[1:]) != (model.config.in_channels, model.config.input_size,
                                          model.config.input_size):
        raise ValueError(f"data {cfg.data} has samples of shape {train_set.x.shape[1:]}, "
                         f"preset {cfg.preset} expects {model.config.in_channels}x"
                         f"{model.config.input_size}x{model.config.input_size}")
    xtr = torch.from_numpy(train_set.x).to(dev)
    ytr = torch.from_numpy(train_set.y).to(dev)
    xte = torch.from_numpy(test_set.x).to(dev)
    yte = torch.from_numpy(test_set.y).to(dev)
    loss_fn = losses.get(cfg.loss, cfg.trades_lambda)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(xtr)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    step = 0
    t0 = time.perf_counter()
    progress = Progress(TextColumn("[bold]train[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet,
                        transient=False)
    with progress:
        task = progress.add_task("", total=cfg.epochs)
        for epoch in range(cfg.epochs):
            eps = eps_at(cfg, epoch)
            perm = torch.randperm(n, generator=gen).to(dev)
            tot, cnt = 0.0, 0
            for s in range(steps_per_epoch):
                idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                for gparam in opt.param_groups:
                    gparam["lr"] = lr_at(cfg, step, steps_per_epoch)
                logits = model(xtr[idx])
                if cfg.loss == "ce":
                    K = torch.zeros(logits.shape[1], logits.shape[1], device=dev)
                else:
                    L = model.lipschitz_estimate(n_iter=cfg.power_iters)
                    K = L * model.pairwise_head_norms()
                loss = loss_fn(logits, ytr[idx], K, eps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip and cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                tot += float(loss) * len(idx)
                cnt += len(idx)
                step += 1
            rec = {"epoch": epoch + 1, "loss": tot / cnt, "lr": opt.param_groups[0]["lr"], "eps": eps,
                   "seconds": round(time.perf_counter() - t0, 2)}
            if (epoch + 1) % max(1, cfg.epochs // 10) == 0 or epoch + 1 == cfg.epochs:
                rec.update(evaluate_estimate(model, xte, yte, cfg.eps))
                progress.update(task, description=f"loss {rec['loss']:.3f} acc {rec['clean_accuracy']:.3f} "
                                                  f"vra~ {rec['vra_estimate']:.3f}")
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            progress.advance(task)
    model.eval()
    model_cpu = model.to("cpu")
    save_model(model_cpu, out / "checkpoint.safetensors", cfg.to_dict())
    export_onnx(model_cpu, out / "model.onnx")
    summary = {"out": str(out), "train_seconds": round(time.perf_counter() - t0, 2), "epochs": cfg.epochs,
               "checkpoint": str(out / "checkpoint.safetensors"), "onnx": str(out / "model.onnx")}
    if cfg.verify:
        from certlib.verify import verify_file

        rep = verify_file(out / "model.onnx", test_set, cfg.eps, "exact")
        summary.update({"sound_vra": rep.result.vra, "clean_accuracy": rep.result.clean_accuracy,
                        "lipschitz_body": rep.analysis.body.value, "eps": cfg.eps})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
