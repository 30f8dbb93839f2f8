"""``certlib train`` and ``certlib export``: the LiResNet side of the command
(registered on the app of :mod:`certlib.cli_common`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from certlib.cli_common import DATA_HELP, METHOD_HELP, UsageError, _eps, _method, app, err_console


@app.command()
def train(
    preset: str = typer.Option("digits", help="Model + recipe preset: digits, cifar10, cifar10-l18w256, "
                                              "cifar100, cifar100-l18w256, tinyimagenet, imagenet, "
                                              "imagenet-eps1 (the published run each reproduces: README)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP.replace("(test split)", "(default: the preset's)")),
    width: Optional[int] = typer.Option(None, help="Backbone width (0: the preset's)."),
    depth: Optional[int] = typer.Option(None, help="Residual blocks (0: the preset's)."),
    dense_dim: Optional[int] = typer.Option(None, help="Neck dense width (0: the preset's)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default runs/PRESET)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs."),
    batch_size: Optional[int] = typer.Option(None, help="GLOBAL batch size (split across torchrun ranks)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay."),
    warmup_epochs: Optional[int] = typer.Option(None, help="Linear warm-up epochs before the cosine decay."),
    min_lr_ratio: Optional[float] = typer.Option(None, help="Cosine decays to this fraction of --lr."),
    grad_clip: Optional[float] = typer.Option(None, help="Gradient-norm clip (0: off)."),
    loss: Optional[str] = typer.Option(None, help="emma | margin | trades | ce (default: the preset's)."),
    eps: Optional[str] = typer.Option(None, help="Target (test) l2 eps, e.g. 36/255; training ramps "
                                                 "eps-start*eps -> eps-end*eps over the first half."),
    eps_start: Optional[float] = typer.Option(None, help="Training eps at epoch 0, as a fraction of --eps."),
    eps_end: Optional[float] = typer.Option(None, help="Training eps from mid-run on, as a fraction of --eps."),
    extra_eps: Optional[str] = typer.Option(None, help="More test radii, comma-separated (e.g. 1.0); "
                                                       "'' for none."),
    trades_lambda: Optional[float] = typer.Option(None, help="lambda of the trades loss."),
    power_iters: Optional[int] = typer.Option(None, help="Power iterations per training step."),
    eval_power_iters: Optional[int] = typer.Option(None, help="Extra power iterations for the "
                                                              "training-time VRA estimate."),
    augment: Optional[str] = typer.Option(None, help="none | flip | crop-flip | resize-crop-flip."),
    crop_pad: Optional[int] = typer.Option(None, help="Zero padding of the random crop (crop-flip)."),
    resize: Optional[int] = typer.Option(None, help="resize-crop-flip: shorter side before the crop."),
    workers: Optional[int] = typer.Option(None, help="Loader processes per rank for folder data "
                                                     "(-1: auto, 0: in-process)."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (0: torch's default)."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA; paper presets: fp32) | fp32 | tf32 | bf16 | fp64; power "
                                                       "iteration and margins always run in float32."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="channels_last memory format (default: on for CUDA)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the network."),
    save_every: Optional[int] = typer.Option(None, help="Also checkpoint every N steps (0: epoch ends only)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                          help="Continue from OUT/checkpoints when there is one."),
    eval_every: Optional[int] = typer.Option(None, help="Epochs between test evaluations (0: auto)."),
    eval_limit: Optional[int] = typer.Option(None, help="Test samples for the training-time estimate (0: all)."),
    log_every: Optional[int] = typer.Option(None, help="Also log a step record every N steps (0: off)."),
    plot: Optional[bool] = typer.Option(None, "--plot/--no-plot", help="Write curves.png."),
    verify: Optional[bool] = typer.Option(None, "--verify/--no-verify",
                                          help="Sound VRA of the exported model at the end."),
    verify_method: Annotated[Optional[str], typer.Option(help=METHOD_HELP)] = None,
    verify_limit: Optional[int] = typer.Option(None, help="Test samples certified at the end (0: all)."),
) -> None:
    """Train a LiResNet (EMMA loss by default); writes checkpoint.safetensors, model.onnx, metrics.jsonl,
    curves.png and the sound VRA.  Data parallel: torchrun --nproc_per_node=N -m certlib.cli train ..."""
    args = dict(locals())  # every TrainConfig field but preset, as given (None: the preset's value)
    args.pop("preset")
    from certlib.data import DataError
    from certlib.train import preset_config, train as run_train

    try:
        if eps is not None:
            args["eps"] = _eps(eps)
        if extra_eps is not None:
            args["extra_eps"] = [_eps(e) for e in extra_eps.split(",") if e.strip()]
        if out is not None:
            args["out"] = str(out)
        if verify_method is not None:
            _method(verify_method, False)
        cfg = preset_config(preset, **args)
        cfg.validate()
        summary = run_train(cfg)
    except (ValueError, DataError) as e:
        raise UsageError(str(e)) from None
    if "checkpoint" not in summary:  # a torchrun rank other than 0
        return
    err_console.print(f"wrote {summary['checkpoint']} and {summary['onnx']} ({summary['train_seconds']} s)")
    if "sound_vra" in summary:
        err_console.print(f"sound VRA at eps={cfg.eps:.4g}: [bold]{100 * summary['sound_vra']:.2f}%[/] "
                          f"(clean {100 * summary['clean_accuracy']:.2f}%, L_body {summary['lipschitz_body']:.6g})")
    print(json.dumps(summary))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="certlib safetensors checkpoint."),
    out: Path = typer.Option(..., help="Output .onnx path."),
    opset: int = typer.Option(18, help="ONNX opset (>= 13)."),
) -> None:
    """Export a LiResNet checkpoint to ONNX (plain ops, fused kernels, dynamic batch)."""
    from certlib.onnx.export import export_onnx
    from certlib.train.checkpoint import load_model

    model, _ = load_model(checkpoint)
    export_onnx(model, out, opset=opset)
    err_console.print(f"wrote {out}")
