"""``certlib verify`` on a stream: image folders (decoded batch by batch) and
any data under ``torchrun`` (each rank certifies its share; rank 0 reports).

See :mod:`certlib.verify_stream`.  Ranks other than 0 print nothing but errors."""

from __future__ import annotations

import os

from certlib.cli_common import UsageError, _rate_progress, _shape, err_console


def under_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def wants_stream(spec: str) -> bool:
    """Folder specs stream; so does everything under torchrun."""
    from certlib.data import DataError, parse_spec

    try:
        kind, _ = parse_spec(spec)
    except DataError as e:
        raise UsageError(str(e)) from None
    return kind in ("imagenet", "imagefolder", "tinyimagenet") or under_torchrun()


def run(model, eps: float, method: str, spec: str, limit, batch_size: int, input_shape, estimate_only: bool,
        json_out, tsv, plot, proof, report, device: str, workers: int):
    """Certify, print the report (rank 0) and write the files asked for; returns the report (or None)."""
    from certlib.data import DataError
    from certlib.data.stream import open_stream
    from certlib.onnx.importer import load
    from certlib.train.distributed import DistInfo, cleanup, setup
    from certlib.verify import file_sha256
    from certlib.verify_stream import verify_stream

    if limit is not None and limit < 1:
        raise UsageError("--limit must be >= 1")
    if workers < 0:
        raise UsageError("--workers must be >= 0")
    info = DistInfo()
    if under_torchrun():
        from certlib.train.config import ConfigError

        try:
            info, dev = setup(device)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        device = str(dev)
    try:
        try:
            stream = open_stream(spec, limit, workers)
        except DataError as e:
            raise UsageError(str(e)) from None
        _, g = load(model, _shape(input_shape))
        show = info.is_main
        with _rate_progress() as p:
            task = p.add_task("bounds", total=None, visible=show)
            mine = len(range(info.rank, len(stream), info.world))

            def on_bounds(name):
                p.update(task, description=f"bounds: {name}")

            def on_batch(done, total):
                p.update(task, description=f"certifying {stream.name}" + (
                    f" (rank 0 of {info.world}; ETA of this share)" if info.enabled else ""),
                    completed=done, total=total)

            p.update(task, total=mine)
            try:
                rep, data = verify_stream(g, stream, eps, method, model_name=str(model), sha256=file_sha256(model),
                                          batch_size=batch_size, estimate_only=estimate_only,
                                          fold_inputs=proof is None, device=device, info=info,
                                          tsv=None if estimate_only else tsv,
                                          keep_margins=bool(proof or report), on_bounds=on_bounds,
                                          on_batch=on_batch)
            except DataError as e:
                raise UsageError(str(e)) from None
        if rep is None:
            return None
        write_outputs(rep, data, model, spec, input_shape, json_out, None, plot, proof, report,
                      skipped_tsv=bool(tsv and estimate_only))
        return rep
    finally:
        cleanup(info)


def write_outputs(rep, data, model, spec, input_shape, json_out, tsv, plot, proof, report,
                  skipped_tsv: bool = False) -> None:
    """Print the report and write the files asked for (``tsv`` here: not yet written)."""
    from certlib.report import print_report, write_json, write_plot, write_tsv

    print_report(rep, err_console)
    if json_out:
        write_json(rep, json_out)
    if rep.result is not None:
        if tsv:
            write_tsv(rep, data.y, tsv)
        if plot:
            write_plot(rep, plot)
        if report:
            from certlib.report import write_html

            write_html(rep, data.y, report)
    elif tsv or plot or report or skipped_tsv:
        err_console.print("[yellow]--tsv/--plot/--report need sound certification; skipped with --estimate-only[/]")
    if proof:
        from certlib.certificate import write_certificate

        c = write_certificate(proof, model, rep, data, spec, input_shape=_shape(input_shape))
        err_console.print(f"wrote certificate {proof} (check it with: certlib check {model} {proof})")
        if c["summary"]["certified"] < rep.result.certified.sum():
            err_console.print(f"[yellow]the certificate states {c['summary']['certified']} certified samples: "
                              "the others clear eps by less than 1024 rounding-error bounds[/]")
