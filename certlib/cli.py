"""The ``certlib`` command.  Tables and progress go to stderr; stdout stays
parseable (JSON summaries only when asked).  Exit codes: 0 done, 2 usage
error, 3 model not supported, 4 proof check failed.

Shared options live in :mod:`certlib.cli_common`; ``train`` and ``export`` in
:mod:`certlib.cli_train`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from certlib._version import __version__
from certlib.cli_common import (AccumulateOpt, SemanticsOpt, DeviceOpt, EpsOpt, EstimateOnlyOpt, InputShapeOpt, JsonOpt, LimitOpt,  # noqa: F401
                                MethodOpt, ModelArg, ReportOpt, DataOpt, UsageError, _data, _device, _eps, _method, _progress,
                                _shape, app, err_console)
from certlib.errors import CertlibError, ProofCheckError as ProofFailure


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
    report: ReportOpt = None,
    device: DeviceOpt = "auto",
    workers: int = typer.Option(2, help="Image-decoding worker processes for streamed folders (0: decode in "
                                        "the main process)."),
    semantics: SemanticsOpt = "exact",
    accumulate: AccumulateOpt = "float32",
) -> None:
    """Certify MODEL on a dataset at radius EPS and print the report.

    Image folders (imagenet:, imagefolder:, tinyimagenet:) are streamed: decoded batch by batch in --workers
    processes, never held in memory, with a progress bar (images/s, ETA); the TSV is written as batches finish.
    Under torchrun (`torchrun --nproc_per_node N -m certlib verify ...`) each rank certifies every N-th sample
    and rank 0 writes the one report, TSV and certificate.

    With --semantics float32|bfloat16|float16 the claim is for the model executed in that precision, over the
    whole ball (in-memory data only)."""
    from certlib import cli_stream
    from certlib.verify import verify_file

    e = _eps(eps)
    m = _method(method, estimate_only)
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    dev = _device(device)
    if cli_stream.wants_stream(data):
        if semantics != "exact":
            raise UsageError("--semantics float32/bfloat16/float16 runs on in-memory data; a streamed folder "
                             "(imagenet:, imagefolder:, tinyimagenet:) is certified under exact semantics only")
        cli_stream.run(model, e, m, data, limit, batch_size, input_shape, estimate_only, json_out, tsv, plot, proof,
                       report, dev, workers)
        return
    ds = _data(data, limit)
    with _progress() as p:
        task = p.add_task("importing model")

        def prog(stage, what):
            p.update(task, description=f"{stage}: {what}")

        rep = verify_file(model, ds, e, m, input_shape=_shape(input_shape), batch_size=batch_size,
                          estimate_only=estimate_only, progress=prog,
                          # certificates bound input normalisation on its own (as the checker does)
                          # (and, by verify_graph's default, its float64 logits)
                          fold_inputs=proof is None, device=dev, semantics=semantics,
                          accumulate=accumulate)
    cli_stream.write_outputs(rep, ds, model, data, input_shape, json_out, tsv, plot, proof, report)


@app.command()
def check(
    model: ModelArg,
    cert: Path = typer.Argument(..., help="Certificate written by `certlib verify --proof`."),
    data: Optional[str] = typer.Option(None, help="Data spec (default: the certificate's); its first n "
                                                  "samples must hash to the certificate's data sha256."),
    bounds_only: bool = typer.Option(False, "--bounds-only", help="Check only the model, the operator bounds, "
                                     "the composition and K (for the certificate's input shape); no sample, "
                                     "radius or summary claim is checked."),
    device: DeviceOpt = "auto",
) -> None:
    """Independently re-check a certificate (proofs/checker.py; exit 0 valid, 4 invalid, 2 no data).  The checker
    runs on the CPU in numpy float64 whatever --device says (its trust base); --device is only validated."""
    import time

    from certlib.errors import ProofCheckError
    from certlib.proofs.checker import CheckFailed
    from certlib.proofs.checker import check as run_check

    _device(device)  # validated; the independent checker's trust base is numpy/LAPACK on the CPU
    try:
        c, blob = json.loads(Path(cert).read_text()), Path(model).read_bytes()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {model} / {cert}: {e}") from None
    d = c.get("data") if isinstance(c, dict) and isinstance(c.get("data"), dict) else {}
    if bounds_only and data:
        raise UsageError("--bounds-only checks no data: drop --data (or --bounds-only to check the samples)")
    ds = None
    if not bounds_only:
        if not (data or d.get("spec")):
            raise UsageError("no data to check the samples with: the certificate names no data spec, so pass "
                             "--data SPEC (or --bounds-only to check only the model, bounds and K)")
        if not isinstance(d.get("n"), int) or isinstance(d.get("n"), bool) or d["n"] < 0:
            raise ProofCheckError("certificate INVALID: data: n is not a sample count")
        ds = _data(data or d["spec"], d["n"] or None)
    t = time.perf_counter()
    try:
        res = run_check(blob, c, *((ds.x, ds.y) if ds is not None else ()), bounds_only=bounds_only)
    except CheckFailed as e:
        raise ProofCheckError(f"certificate INVALID: {e}") from None
    if bounds_only:
        err_console.print(f"[yellow]bounds only[/]: {res['operators']} operator bounds proven, body "
                          f"{res['body']:.9g}, K checked, for input shape {res['input_shape']}; no sample, "
                          f"radius or summary claim was checked ({time.perf_counter() - t:.2f} s)")
    else:
        err_console.print(f"[green]certificate valid[/]: {res['operators']} operator bounds proven, body "
                          f"{res['body']:.9g}, {res['certified']}/{res['samples_checked']} certified samples "
                          f"and every radius, margin and summary figure re-checked "
                          f"({time.perf_counter() - t:.2f} s)")
    print(json.dumps(res))


@app.command()
def bounds(
    model: ModelArg,
    method: MethodOpt = "exact",
    input_shape: InputShapeOpt = None,
    estimate_only: EstimateOnlyOpt = False,
    json_out: JsonOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Per-layer Lipschitz bounds and the body bound (no data needed).  With --device cuda the exact method's
    convolution frequency blocks, Grams and Cholesky proofs run there in float64 (proofs/device_bounds.md)."""
    from certlib.ir.compose import analyze
    from certlib.onnx.importer import load
    from certlib.report import layers_table
    from certlib.verify import file_sha256

    from certlib.verifiers.svd import on_device

    m = _method(method, estimate_only)
    dev = _device(device)
    with _progress() as p, on_device(dev):
        task = p.add_task("importing model")
        _, g = load(model, _shape(input_shape))
        a = analyze(g, m, estimate_only=estimate_only,
                    progress=lambda name: p.update(task, description=f"bounding {name}"))
    err_console.print(layers_table(a.layers))
    tag = "sound bound" if a.sound else "ESTIMATE, NOT SOUND"
    err_console.print(f"body Lipschitz: [bold]{float(a.body.value):.9g}[/] ({a.method}, {tag}); "
                      f"max K_ij: {float(a.K.max()):.9g}; {a.seconds:.2f} s")
    if a.body_rule != "product":
        err_console.print(f"body bound: {a.body_how()}")
    if json_out:
        Path(json_out).write_text(json.dumps({
            "model": str(model), "sha256": file_sha256(model),
            "lipschitz": {"body": float(a.body.value), "method": a.method, "sound": a.sound,
                          "rule": a.body_rule},
            "layers": [lb.as_dict() for lb in a.layers], "certlib_version": __version__}, indent=2) + "\n")


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
    device: DeviceOpt = "auto",
    semantics: SemanticsOpt = "exact",
    accumulate: AccumulateOpt = "float32",
) -> None:
    """Falsify certificates: PGD-l2 inside eps on every certified sample, and an
    empirical (lower) bound on the logits' Lipschitz constant.  A sound
    certificate has zero violations.  With --semantics float32|bfloat16|float16 the
    certificates are issued under that semantics and every PGD iterate is run
    with the model converted to that precision (torch)."""
    import numpy as np

    from certlib.attack import empirical_lipschitz, pgd_l2, pgd_l2_executed
    from certlib.ir.semantics import get as get_semantics
    from certlib.onnx.importer import load
    from certlib.verify import verify_graph

    e = _eps(eps)
    m = _method(method, False)
    dev = _device(device)
    ds = _data(data, limit)
    if steps < 1 or restarts < 1:
        raise UsageError("--steps and --restarts must be >= 1")
    sem = get_semantics(semantics, accumulate)
    with _progress() as p:
        task = p.add_task("importing model")
        _, g = load(model, _shape(input_shape))
        p.update(task, description=f"certifying ({sem.name} semantics)")
        rep = verify_graph(g, ds, e, m, device=dev, semantics=sem)  # (the attack itself runs on the CPU)
        r = rep.result
        cert = np.flatnonzero(r.certified)
        run_in = "float64" if sem.exact else f"the model executed in {sem.name}"
        p.update(task, description=f"PGD-l2 on {cert.size} certified samples ({run_in})")
        flipped = np.zeros(0, dtype=bool)
        if cert.size and sem.exact:
            flipped, _ = pgd_l2(g, ds.x[cert], r.pred[cert], e, steps=steps, restarts=restarts)
        elif cert.size:
            flipped, _ = pgd_l2_executed(g, ds.x[cert], r.pred[cert], e, sem.name, steps=steps, restarts=restarts)
        p.update(task, description="empirical Lipschitz search")
        lower = empirical_lipschitz(g, ds.x[: min(len(ds), 64)], steps=steps)
    upper = float(rep.analysis.body.value) * float(np.linalg.svd(rep.analysis.head_weight, compute_uv=False)[0])
    violations = [int(i) for i in cert[flipped]]
    out = {"model": str(model), "eps": e, "semantics": sem.name, "executed_in": run_in, "n": r.n,
           "certified": int(cert.size), "attacked": int(cert.size),
           "violations": violations, "empirical_lipschitz_lower": lower,
           "certified_lipschitz_upper": upper, "lower_over_upper": lower / upper if upper > 0 else None}
    colour = "green" if not violations else "bold red"
    err_console.print(f"certified {cert.size}/{r.n} at eps={e:.6g} under {sem.name} semantics; PGD-l2 "
                      f"({restarts}x{steps} steps, {run_in}) found "
                      f"[{colour}]{len(violations)} violation(s)[/]")
    err_console.print(f"empirical Lipschitz lower bound {lower:.6g} / certified upper bound {upper:.6g} "
                      f"= {out['lower_over_upper']:.4f}")
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=2) + "\n")
    if violations:
        raise ProofFailure(f"{len(violations)} certified sample(s) broken by the attack: {violations[:10]}")


@app.command()
def audit(model: ModelArg, data: DataOpt = "digits", method: MethodOpt = "exact", limit: LimitOpt = None,
          claim: Optional[float] = typer.Option(None, help="The claimed Lipschitz constant of the logits."),
          eps: list[str] = typer.Option([], help="Radius for the sound VRA (repeatable)."),
          steps: int = typer.Option(50, help="Gradient-ascent steps of the empirical search."),
          input_shape: InputShapeOpt = None, json_out: JsonOpt = None,
          plot: Optional[Path] = typer.Option(None, help="PNG: proven vs empirical vs claim, VRA vs radius."),
          semantics: SemanticsOpt = "exact", accumulate: AccumulateOpt = "float32"):
    """Is MODEL's claimed Lipschitz constant true?  Proven bound (whole, per stage), empirical pair, verdict
    (claim proven / refuted by a pair: exit 4 / not proven, with the gap), sound VRA at each --eps."""
    from certlib.audit import audit_file

    radii, m, ds = [_eps(e) for e in eps], _method(method, False), _data(data, limit)
    with _progress() as p:
        p.add_task("auditing")
        rep = audit_file(model, ds, claim, radii, m, steps, _shape(input_shape), semantics=semantics,
                         accumulate=accumulate)
    rep.finish(err_console, json_out, plot)   # raises ProofCheckError (exit 4) when refuted


# registers ``train`` and ``export`` after the certification commands (their
# order in --help)
from certlib import cli_train  # noqa: E402,F401


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
