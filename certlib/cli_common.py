"""What the ``certlib`` commands share: the typer app, the stderr console,
the options several commands take (defined once) and the parsers that turn
their text into values or a UsageError (exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from certlib.errors import UsageError

err_console = Console(stderr=True)
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Deterministic, sound l2 robustness certification (LiResNet / GloRo).\n\n"
                       "Every certified claim rests on proven Lipschitz upper bounds, never on estimates.")

METHOD_HELP = ("Lipschitz verifier: exact (SVD / FFT blocks + rigorous margin), power (power iteration "
               "proven by a Cholesky certificate), sdp (cvxpy, re-proven; a dense ReLU/MaxMin/GroupSort "
               "body is also bounded as a whole by the multi-layer LipSDP).")
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
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Write one self-contained HTML report here.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu | cuda | auto (cuda when available, else cpu): where the "
                                             "forward passes (float32 fast forward, proofs/fast_forward.md) and "
                                             "the exact method's FFT blocks and Cholesky proofs (float64) run.")]
SemanticsOpt = Annotated[str, typer.Option(help=(
    "What the claim is about: exact (default; the model's function in exact real arithmetic) | float32 | "
    "bfloat16 | float16: the model EXECUTED in that precision (weights, input and activations stored in it; any "
    "summation order, FMA or not, GEMM/direct convolution, no TF32/Winograd/FFT) predicts the same class at "
    "every point of the ball; the execution-error bound over the ball is subtracted from each margin "
    "(proofs/float_semantics.md)."))]
AccumulateOpt = Annotated[str, typer.Option(help=(
    "With --semantics bfloat16/float16: float32 (dot products accumulated in float32, as cuBLAS and oneDNN do) "
    "| storage (the worst case: accumulated in the 16-bit format itself)."))]


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


def _rate_progress(unit: str = "img"):
    """A progress bar with done/total, images per second and ETA (stderr)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s")

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
                    transient=True)


def _device(device: str) -> str:
    """``--device``: cpu | cuda | auto -> the device to use (UsageError when cuda is missing)."""
    from certlib.verify import resolve_device

    return resolve_device(device)


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


