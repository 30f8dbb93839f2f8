"""The ``certlib`` command.  Tables and progress go to stderr; stdout stays
parseable (JSON summaries only when asked).  Exit codes: 0 done, 2 usage
error, 3 model not supported, 4 proof check failed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.console import Console

from certlib import __version__
from certlib.errors import CertlibError, ProofCheckError as ProofFailure, UsageError

err_console = Console(stderr=True)
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Deterministic, sound l2 robustness certification (LiResNet / GloRo).\n\n"
                       "Every certified claim rests on proven Lipschitz upper bounds, never on estimates.")

METHOD_HELP = ("Lipschitz verifier: exact (SVD / FFT blocks + rigorous margin), power (power iteration "
               "proven by a Cholesky certificate), sdp (cvxpy, re-proven).")
DATA_HELP = ("digits | npz:PATH | cifar10:DIR | cifar100:DIR | tinyimagenet:DIR | imagenet:DIR | "
             "imagefolder:DIR (test split).")

# the options several commands share, defined once
ModelArg = Annotated[Path, typer.Argument(help="ONNX model (one input N,C,H,W in [0,1], one logits output).")]
DataOpt = Annotated[str, typer.Option(help=DATA_HELP)]
EpsOpt = Annotated[str, typer.Option(help="l2 radius; fractions such as 36/255 are accepted.")]
MethodOpt = Annotated[str, typer.Option(help=METHOD_HELP)]
LimitOpt = Annotated[Optional[int], typer.Option(help="Use only the first N samples.")]
InputShapeOpt = Annotated[Optional[str], typer.Option(help="C,H,W when the model's input shape is dynamic.")]
EstimateOnlyOpt = Annotated[bool, typer.Option("--estimate-only", help=(
    "Use raw power-iteration ESTIMATES (what published code does); reported with \"sound\": false. "
    "Never a certificate."))]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu | cuda | auto (cuda when available): where the float32 "
                                             "fast forward runs (proofs/fast_forward.md).")]


def _shape(text: Optional[str]):
    if not text:
        return None
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape must look like 3,32,32, got {text!r}") from None
    if not dims or min(dims) <= 0:
        raise UsageError(f"--input-shape dimensions must be positive, got {text!r}")
    return dims


def _progress():
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                    console=err_console, transient=True)


def _eps(text: str) -> float:
    from certlib.certify import parse_eps

    try:
        return parse_eps(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _data(spec: str, limit: Optional[int]):
    from certlib.data import DataError, load

    if limit is not None and limit < 1:
        raise UsageError("--limit must be >= 1")
    try:
        return load(spec, "test").take(limit)
    except DataError as e:
        raise UsageError(str(e)) from None


def _method(method: str, estimate_only: bool) -> str:
    from certlib.ir.compose import METHODS

    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


@app.command()
def verify(
    model: ModelArg,
    eps: EpsOpt,
    data: DataOpt = "digits",
    method: MethodOpt = "exact",
    limit: LimitOpt = None,
    batch_size: int = typer.Option(256, help="Samples per forward batch."),
    input_shape: InputShapeOpt = None,
    estimate_only: EstimateOnlyOpt = False,
    json_out: JsonOpt = None,
    tsv: Optional[Path] = typer.Option(None, help="Write one row per sample: idx label pred correct certified radius."),
    plot: Optional[Path] = typer.Option(None, help="Write a certified-accuracy-vs-radius PNG."),
    proof: Optional[Path] = typer.Option(None, "--proof", help="Write a certificate (JSON) that "
                                         "`certlib check` re-verifies independently (proofs/certificate.md)."),
    device: DeviceOpt = "auto",
) -> None:
    """Certify MODEL on a dataset at radius EPS and print the report."""
    from certlib.report import print_report, write_json, write_plot, write_tsv
    from certlib.verify import verify_file

    e = _eps(eps)
    m = _method(method, estimate_only)
    ds = _data(data, limit)
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    with _progress() as p:
        task = p.add_task("importing model")

        def prog(stage, what):
            p.update(task, description=f"{stage}: {what}")

        rep = verify_file(model, ds, e, m, input_shape=_shape(input_shape), batch_size=batch_size,
                          estimate_only=estimate_only, progress=prog,
                          # certificates bound input normalisation on its own (as the checker does)
                          fold_inputs=proof is None, device=device)
    print_report(rep, err_console)
    if json_out:
        write_json(rep, json_out)
    if rep.result is not None:
        if tsv:
            write_tsv(rep, ds.y, tsv)
        if plot:
            write_plot(rep, plot)
    elif tsv or plot:
        err_console.print("[yellow]--tsv/--plot need sound certification; skipped with --estimate-only[/]")
    if proof:
        from certlib.certificate import write_certificate

        write_certificate(proof, model, rep, ds, data, input_shape=_shape(input_shape))
        err_console.print(f"wrote certificate {proof} (check it with: certlib check {model} {proof})")


@app.command()
def check(
    model: ModelArg,
    cert: Path = typer.Argument(..., help="Certificate written by `certlib verify --proof`."),
    data: Optional[str] = typer.Option(None, help="Data spec (default: the certificate's); its first n "
                                                  "samples must hash to the certificate's data sha256."),
) -> None:
    """Independently re-check a certificate (proofs/checker.py; exit 0 valid, 4 invalid)."""
    import time

    from certlib.errors import ProofCheckError
    from certlib.proofs.checker import CheckFailed
    from certlib.proofs.checker import check as run_check

    try:
        c, blob = json.loads(Path(cert).read_text()), Path(model).read_bytes()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {model} / {cert}: {e}") from None
    d = c.get("data") if isinstance(c, dict) and isinstance(c.get("data"), dict) else {}
    if not (data or d.get("spec")) or not isinstance(d.get("n"), int):
        raise ProofCheckError("certificate INVALID: data: no data spec and size to re-check the samples with")
    ds = _data(data or d["spec"], d["n"])
    t = time.perf_counter()
    try:
        res = run_check(blob, c, ds.x, ds.y)
    except CheckFailed as e:
        raise ProofCheckError(f"certificate INVALID: {e}") from None
    err_console.print(f"[green]certificate valid[/]: {res['operators']} operator bounds proven, body "
                      f"{res['body']:.9g}, {res['certified']}/{res['samples_checked']} certified samples "
                      f"re-checked ({time.perf_counter() - t:.2f} s)")
    print(json.dumps(res))


@app.command()
def bounds(
    model: ModelArg,
    method: MethodOpt = "exact",
    input_shape: InputShapeOpt = None,
    estimate_only: EstimateOnlyOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Per-layer Lipschitz bounds and the body bound (no data needed)."""
    from certlib.ir.compose import analyze
    from certlib.onnx.importer import load
    from certlib.report import layers_table
    from certlib.verify import file_sha256

    m = _method(method, estimate_only)
    with _progress() as p:
        task = p.add_task("importing model")
        _, g = load(model, _shape(input_shape))
        a = analyze(g, m, estimate_only=estimate_only,
                    progress=lambda name: p.update(task, description=f"bounding {name}"))
    err_console.print(layers_table(a.layers))
    tag = "sound bound" if a.sound else "ESTIMATE, NOT SOUND"
    err_console.print(f"body Lipschitz: [bold]{float(a.body.value):.9g}[/] ({a.method}, {tag}); "
                      f"max K_ij: {float(a.K.max()):.9g}; {a.seconds:.2f} s")
    if json_out:
        Path(json_out).write_text(json.dumps({
            "model": str(model), "sha256": file_sha256(model),
            "lipschitz": {"body": float(a.body.value), "method": a.method, "sound": a.sound},
            "layers": [lb.as_dict() for lb in a.layers], "certlib_version": __version__}, indent=2) + "\n")


@app.command()
def train(
    preset: str = typer.Option("digits", help="Model + recipe preset: digits, cifar10, cifar10-l18w256, "
                                              "cifar100, cifar100-l18w256, tinyimagenet, imagenet."),
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
    loss: Optional[str] = typer.Option(None, help="emma | margin | trades | ce."),
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
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA) | fp32 | tf32 | bf16 | fp64; power "
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
def attack(
    model: ModelArg,
    eps: EpsOpt,
    data: DataOpt = "digits",
    method: MethodOpt = "exact",
    limit: LimitOpt = None,
    steps: int = typer.Option(50, help="PGD steps per restart."),
    restarts: int = typer.Option(3, help="PGD restarts (the first starts at the clean point)."),
    input_shape: InputShapeOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Falsify certificates: PGD-l2 inside eps on every certified sample, and an
    empirical (lower) bound on the logits' Lipschitz constant.  A sound
    certificate has zero violations."""
    import numpy as np

    from certlib.attack import empirical_lipschitz, pgd_l2
    from certlib.onnx.importer import load
    from certlib.verify import verify_graph

    e = _eps(eps)
    m = _method(method, False)
    ds = _data(data, limit)
    if steps < 1 or restarts < 1:
        raise UsageError("--steps and --restarts must be >= 1")
    with _progress() as p:
        task = p.add_task("importing model")
        _, g = load(model, _shape(input_shape))
        p.update(task, description="certifying")
        rep = verify_graph(g, ds, e, m)
        r = rep.result
        cert = np.flatnonzero(r.certified)
        p.update(task, description=f"PGD-l2 on {cert.size} certified samples")
        flipped = np.zeros(0, dtype=bool)
        if cert.size:
            flipped, _ = pgd_l2(g, ds.x[cert], r.pred[cert], e, steps=steps, restarts=restarts)
        p.update(task, description="empirical Lipschitz search")
        lower = empirical_lipschitz(g, ds.x[: min(len(ds), 64)], steps=steps)
    upper = float(rep.analysis.body.value) * float(np.linalg.svd(rep.analysis.head_weight, compute_uv=False)[0])
    violations = [int(i) for i in cert[flipped]]
    out = {"model": str(model), "eps": e, "n": r.n, "certified": int(cert.size), "attacked": int(cert.size),
           "violations": violations, "empirical_lipschitz_lower": lower,
           "certified_lipschitz_upper": upper, "lower_over_upper": lower / upper if upper > 0 else None}
    colour = "green" if not violations else "bold red"
    err_console.print(f"certified {cert.size}/{r.n} at eps={e:.6g}; PGD-l2 ({restarts}x{steps} steps) found "
                      f"[{colour}]{len(violations)} violation(s)[/]")
    err_console.print(f"empirical Lipschitz lower bound {lower:.6g} / certified upper bound {upper:.6g} "
                      f"= {out['lower_over_upper']:.4f}")
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=2) + "\n")
    if violations:
        raise ProofFailure(f"{len(violations)} certified sample(s) broken by the attack: {violations[:10]}")


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


def main() -> None:
    """Entry point: run the app, turning known errors into messages + exit codes."""
    try:
        app(standalone_mode=False)
    except CertlibError as e:
        err_console.print("[bold red]error:[/]", escape(str(e)), highlight=False)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors and anything unexpected
        show = getattr(e, "show", None)
        code = getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):  # click/typer usage errors (exit 2)
            show()
            sys.exit(code)
        if os.environ.get("CERTLIB_DEBUG"):
            raise
        err_console.print("[bold red]internal error:[/]", escape(f"{type(e).__name__}: {e}"),
                          "\n(set CERTLIB_DEBUG=1 for a traceback; please report this)", highlight=False)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
