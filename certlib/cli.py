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
from certlib.cli_common import (DeviceOpt, EpsOpt, EstimateOnlyOpt, InputShapeOpt, JsonOpt, LimitOpt,  # noqa: F401
                                MethodOpt, ModelArg, ReportOpt, DataOpt, UsageError, _data, _eps, _method, _progress,
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
                          # (and, by verify_graph's default, its float64 logits)
                          fold_inputs=proof is None, device=device)
    print_report(rep, err_console)
    if json_out:
        write_json(rep, json_out)
    if rep.result is not None:
        if tsv:
            write_tsv(rep, ds.y, tsv)
        if plot:
            write_plot(rep, plot)
        if report:
            from certlib.report import write_html

            write_html(rep, ds.y, report)
    elif tsv or plot or report:
        err_console.print("[yellow]--tsv/--plot/--report need sound certification; skipped with --estimate-only[/]")
    if proof:
        from certlib.certificate import write_certificate

        c = write_certificate(proof, model, rep, ds, data, input_shape=_shape(input_shape))
        err_console.print(f"wrote certificate {proof} (check it with: certlib check {model} {proof})")
        if c["summary"]["certified"] < rep.result.certified.sum():
            err_console.print(f"[yellow]the certificate states {c['summary']['certified']} certified samples: "
                              "the others clear eps by less than 1024 rounding-error bounds[/]")


@app.command()
def check(
    model: ModelArg,
    cert: Path = typer.Argument(..., help="Certificate written by `certlib verify --proof`."),
    data: Optional[str] = typer.Option(None, help="Data spec (default: the certificate's); its first n "
                                                  "samples must hash to the certificate's data sha256."),
    bounds_only: bool = typer.Option(False, "--bounds-only", help="Check only the model, the operator bounds, "
                                     "the composition and K (for the certificate's input shape); no sample, "
                                     "radius or summary claim is checked."),
) -> None:
    """Independently re-check a certificate (proofs/checker.py; exit 0 valid, 4 invalid, 2 no data)."""
    import time

    from certlib.errors import ProofCheckError
    from certlib.proofs.checker import CheckFailed
    from certlib.proofs.checker import check as run_check

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
def audit(model: ModelArg, data: DataOpt = "digits", method: MethodOpt = "exact", limit: LimitOpt = None,
          claim: Optional[float] = typer.Option(None, help="The claimed Lipschitz constant of the logits."),
          eps: list[str] = typer.Option([], help="Radius for the sound VRA (repeatable)."),
          steps: int = typer.Option(50, help="Gradient-ascent steps of the empirical search."),
          input_shape: InputShapeOpt = None, json_out: JsonOpt = None,
          plot: Optional[Path] = typer.Option(None, help="PNG: proven vs empirical vs claim, VRA vs radius.")):
    """Is MODEL's claimed Lipschitz constant true?  Proven bound (whole, per stage), empirical pair, verdict
    (claim proven / refuted by a pair: exit 4 / not proven, with the gap), sound VRA at each --eps."""
    from certlib.audit import audit_file

    radii, m, ds = [_eps(e) for e in eps], _method(method, False), _data(data, limit)
    with _progress() as p:
        p.add_task("auditing")
        rep = audit_file(model, ds, claim, radii, m, steps, _shape(input_shape))
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
