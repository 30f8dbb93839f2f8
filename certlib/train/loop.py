"""``train(config)``: EMMA training of a LiResNet on one process or many
(torchrun), with resumable checkpoints; then ONNX export and a SOUND
evaluation through the same road as ``certlib verify``.

Outputs under ``config.out``: ``checkpoint.safetensors`` (final weights),
``model.onnx``, ``metrics.jsonl``, ``curves.png``, ``verify.json`` (the sound
report at eps), ``summary.json``, and ``checkpoints/`` (resumable state).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from certlib.data import DataError, load, load_images, open_folder, parse_spec
from certlib.train import checkpoint, distributed
from certlib.train.config import ConfigError, TrainConfig, build_config, eps_at, eval_interval, lr_at
from certlib.train.metrics import MetricsLog, make_progress, plot_curves
from certlib.train.sources import FolderSource, MemorySource
from certlib.train.step import TrainStep, evaluate, param_dtype, resolve_precision

console = Console(stderr=True)

#: Fields that shape the trajectory: a resumed run must agree on all of them.
TRAJECTORY_FIELDS = ("preset", "width", "depth", "dense_dim", "data", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                     "min_lr_ratio", "grad_clip", "loss", "eps", "eps_start", "eps_end", "trades_lambda",
                     "power_iters", "augment", "crop_pad", "resize", "seed")


def _sources(cfg: TrainConfig, model_cfg, device, info):
    kind, _ = parse_spec(cfg.data)
    shape = (model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)
    common = dict(batch_size=cfg.batch_size, info=info, device=device, seed=cfg.seed)
    if kind in ("imagenet", "imagefolder"):
        tr = FolderSource(open_folder(cfg.data, "train"), size=model_cfg.input_size, train=True,
                          augment=cfg.augment, crop_pad=cfg.crop_pad, resize=cfg.resize, workers=cfg.workers,
                          **common)
        te = FolderSource(open_folder(cfg.data, "test"), size=model_cfg.input_size, train=False,
                          resize=cfg.resize, workers=cfg.workers, **common)
        ncls = tr.folder.num_classes
    else:
        if kind in ("digits", "npz"):
            a, b = load(cfg.data, "train"), load(cfg.data, "test")
        else:  # cifar, tinyimagenet: uint8 on the device
            a, b = load_images(cfg.data, "train"), load_images(cfg.data, "test")
        tr = MemorySource(a.x, a.y, augment=cfg.augment, crop_pad=cfg.crop_pad, **common)
        te = MemorySource(b.x, b.y, **common)
        ncls = max(a.num_classes, int(a.y.max(initial=0)) + 1)
    for name, src in (("train", tr), ("test", te)):
        if tuple(src.sample_shape) != shape:
            raise DataError(f"data {cfg.data} ({name}) has samples of shape {tuple(src.sample_shape)}, preset "
                            f"{cfg.preset} expects {'x'.join(map(str, shape))}")
    if ncls > model_cfg.num_classes:
        raise DataError(f"data {cfg.data} has {ncls} classes, preset {cfg.preset} has {model_cfg.num_classes}")
    return tr, te


def _final_test_set(cfg: TrainConfig):
    kind, _ = parse_spec(cfg.data)
    if kind in ("imagenet", "imagefolder", "tinyimagenet"):
        return open_folder(cfg.data, "test").subset(cfg.verify_limit or None).to_arrays().to_dataset()
    return load(cfg.data, "test").take(cfg.verify_limit or None)


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Train; returns a summary dict (with the sound VRA when ``cfg.verify``).

    Run under ``torchrun`` for data parallelism (``batch_size`` is the global
    batch).  Raises ConfigError / DataError (usage errors) before training."""
    cfg.validate()
    info, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, quiet, info, device)
    finally:
        distributed.cleanup(info)


def _train(cfg: TrainConfig, quiet: bool, info, device) -> dict:
    from certlib.models.liresnet import LiResNet

    if cfg.batch_size % info.world:
        raise ConfigError(f"batch_size {cfg.batch_size} (global) must be divisible by the {info.world} ranks")
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    main = info.is_main
    show = main and not quiet
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    precision = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = LiResNet(build_config(cfg)).to(device=device, dtype=param_dtype(precision))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_src, test_src = _sources(cfg, model.config, device, info)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))

    S = train_src.steps_per_epoch
    epoch0, s0, step = 0, 0, 0
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # loss_sum, correct, cert, count (this epoch)
    ckpt = checkpoint.latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        st = checkpoint.load_train_state(ckpt, model, opt, device)
        old = st.get("config", {})
        diff = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in TRAJECTORY_FIELDS
                if old.get(k) != getattr(cfg, k)]
        if diff:
            raise ConfigError(f"--resume: {ckpt} was made with another config ({'; '.join(diff)}); "
                              "use the same flags, or another --out")
        epoch0, s0, step = int(st["epoch"]), int(st["step_in_epoch"]), int(st["step"])
        acc.copy_(torch.tensor(st["acc"], dtype=torch.float64) if main else torch.zeros(4, dtype=torch.float64))
        checkpoint.set_rng_state(st["rng"])
        if show:
            console.print(f"resuming from {ckpt} (epoch {epoch0 + 1}, step {step})")
    elif main:
        if cfg.resume and show:
            console.print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
        checkpoint.clear_checkpoints(out)
    distributed.barrier(info)

    net = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if cfg.compile:
        net = torch.compile(net)
    stepper = TrainStep(model, net, opt, loss=cfg.loss, trades_lambda=cfg.trades_lambda,
                        power_iters=cfg.power_iters, grad_clip=cfg.grad_clip, test_eps=cfg.eps, device=device,
                        precision=precision, info=info, channels_last=channels_last)
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if ckpt is not None else None, enabled=main)
    eps_list = [cfg.eps, *cfg.extra_eps]
    every = eval_interval(cfg)
    eval_batch = max(1, 2 * cfg.batch_size // info.world)

    def save(epoch: int, in_epoch: int) -> None:
        total = acc.clone()
        distributed.all_reduce_sum(total, info)
        if main:
            checkpoint.save_train_state(out, model, opt, {"epoch": epoch, "step_in_epoch": in_epoch, "step": step,
                                                          "acc": total.tolist()}, cfg.to_dict())

    t0 = time.perf_counter()
    progress = make_progress(console, disable=not show)
    with progress:
        ep_task = progress.add_task("", total=cfg.epochs, completed=epoch0, what="epochs")
        st_task = progress.add_task("", total=S, what="steps ")
        for epoch in range(epoch0, cfg.epochs):
            eps = eps_at(cfg, epoch)
            first = s0 if epoch == epoch0 else 0
            if first == 0:
                acc.zero_()
            progress.reset(st_task, total=S, completed=first)
            te, seen = time.perf_counter(), 0
            for s, (x, y, n_global) in enumerate(train_src.epoch(epoch, first), start=first):
                acc += stepper(x, y, n_global, eps, lr_at(cfg, step, S))
                step += 1
                seen += n_global
                progress.advance(st_task)
                if cfg.log_every and step % cfg.log_every == 0:
                    a = acc.tolist()
                    log.write({"kind": "step", "step": step, "epoch": epoch + (s + 1) / S,
                               "loss": a[0] / max(a[3], 1), "lr": lr_at(cfg, step - 1, S), "eps": eps})
                if cfg.save_every and step % cfg.save_every == 0 and s + 1 < S:
                    save(epoch, s + 1)
            total = acc.clone()
            distributed.all_reduce_sum(total, info)
            loss_sum, correct, cert, cnt = total.tolist()
            rec = {"kind": "epoch", "epoch": epoch + 1, "step": step, "loss": loss_sum / max(cnt, 1),
                   "train_accuracy": correct / max(cnt, 1), "lr": lr_at(cfg, step - 1, S), "eps": eps,
                   "images_per_s": round(seen / max(time.perf_counter() - te, 1e-9), 1),
                   "seconds": round(time.perf_counter() - t0, 2)}
            if cfg.loss != "ce":
                rec["train_vra_estimate"] = cert / max(cnt, 1)
            if (epoch + 1) % every == 0 or epoch + 1 == cfg.epochs:
                rec.update(evaluate(model, test_src.eval_batches(eval_batch, cfg.eval_limit), eps_list,
                                    eval_power_iters=cfg.eval_power_iters, device=device, precision=precision,
                                    info=info, channels_last=channels_last))
                desc = (f"loss {rec['loss']:.3f}  acc {rec['clean_accuracy']:.3f}  "
                        f"vra~ {rec['vra_estimate']:.3f}  L~ {rec['lipschitz_estimate']:.3g}")
                progress.update(ep_task, description=desc)
                if show and not console.is_terminal:
                    console.print(f"epoch {epoch + 1}/{cfg.epochs}: {desc}")
            log.write(rec)
            save(epoch + 1, 0)
            progress.advance(ep_task)
    train_seconds = round(time.perf_counter() - t0, 2)
    distributed.barrier(info)
    if not main:
        return {"rank": info.rank, "train_seconds": train_seconds}
    return _finish(cfg, model, out, log, step, train_seconds, show)


def _finish(cfg: TrainConfig, model, out: Path, log: MetricsLog, step: int, train_seconds: float,
            show: bool) -> dict:
    from certlib.onnx.export import export_onnx

    model.eval()
    model = model.to("cpu").to(memory_format=torch.contiguous_format).float()
    checkpoint.save_model(model, out / "checkpoint.safetensors", cfg.to_dict(), extra={"step": step})
    export_onnx(model, out / "model.onnx")
    summary = {"out": str(out), "train_seconds": train_seconds, "epochs": cfg.epochs, "steps": step,
               "checkpoint": str(out / "checkpoint.safetensors"), "onnx": str(out / "model.onnx"),
               "metrics": str(out / "metrics.jsonl")}
    if cfg.verify:
        from certlib.onnx.importer import load as load_onnx
        from certlib.report import write_json
        from certlib.verify import file_sha256, verify_graph

        if show:
            console.print(f"sound evaluation of {out / 'model.onnx'} ({cfg.verify_method} bounds) ...")
        test_set = _final_test_set(cfg)
        _, g = load_onnx(out / "model.onnx")
        sha = file_sha256(out / "model.onnx")
        vra_at = {}
        for k, e in enumerate([cfg.eps, *cfg.extra_eps]):
            rep = verify_graph(g, test_set, e, cfg.verify_method, model_name=str(out / "model.onnx"), sha256=sha)
            vra_at[f"{e:.6g}"] = rep.result.vra
            if k == 0:
                write_json(rep, out / "verify.json")
                summary.update({"sound_vra": rep.result.vra, "clean_accuracy": rep.result.clean_accuracy,
                                "lipschitz_body": float(rep.analysis.body.value), "eps": cfg.eps,
                                "verified_samples": rep.result.n, "verify_json": str(out / "verify.json")})
        summary["sound_vra_at"] = vra_at
        log.write({"kind": "final", "epoch": cfg.epochs, "step": step, "sound_vra": summary["sound_vra"],
                   "sound_vra_at": vra_at, "clean_accuracy": summary["clean_accuracy"],
                   "lipschitz_body": summary["lipschitz_body"]})
    if cfg.plot:
        try:
            plot_curves(log.records(), out / "curves.png", f"{cfg.preset} on {cfg.data} ({cfg.loss})")
            summary["curves"] = str(out / "curves.png")
        except Exception as e:  # a plot never fails a finished run
            console.print(f"[yellow]could not draw curves.png: {e}[/]")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
