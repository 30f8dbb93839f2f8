"""Reports: rich tables (stderr), JSON, TSV (one row per sample), the
certified-accuracy-vs-radius curve and (:mod:`certlib.report.html`) one
self-contained HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from certlib.verify import VerifyReport

TSV_COLUMNS = ("idx", "label", "pred", "correct", "certified", "radius")


def layers_table(layers, title: str = "per-layer Lipschitz bounds") -> Table:
    t = Table(title=title, title_justify="left")
    for col, kw in (("name", {}), ("op", {}), ("bound", {"justify": "right"}),
                    ("method", {}), ("seconds", {"justify": "right"})):
        t.add_column(col, **kw)
    for lb in layers:
        t.add_row(lb.name, lb.op, f"{lb.bound:.9g}", lb.method, f"{lb.seconds:.3f}")
    return t


def print_report(rep: VerifyReport, console: Console | None = None, show_layers: bool = True) -> None:
    console = console or Console(stderr=True)
    a = rep.analysis
    if show_layers:
        console.print(layers_table(a.layers))
    t = Table(title="certification", title_justify="left", show_header=False)
    t.add_column("k")
    t.add_column("v")
    t.add_row("model", f"{rep.model}  (sha256 {rep.sha256[:12]})")
    t.add_row("data", f"{rep.data}  (sha256 {rep.data_sha256[:12]})")
    t.add_row("eps (l2)", f"{rep.eps:.9g}")
    t.add_row("body Lipschitz", f"{float(a.body.value):.9g}  ({a.method}, "
              + ("[green]sound bound[/]" if a.sound else "[bold red]ESTIMATE: NOT SOUND[/]") + ")")
    if getattr(a, "body_rule", "product") != "product":
        t.add_row("body bound from", a.body_how())
    if rep.result is not None:
        r = rep.result
        t.add_row("samples", str(r.n))
        t.add_row("clean accuracy", f"{100 * r.clean_accuracy:.2f}%")
        t.add_row("verified robust accuracy", f"[bold]{100 * r.vra:.2f}%[/]")
        if rep.runtime_disagree:
            t.add_row("onnxruntime disagrees (not certified)",
                      f"[bold red]{len(rep.runtime_disagree)} sample(s): {rep.runtime_disagree[:10]}[/]")
    else:
        t.add_row("clean accuracy", f"{100 * (rep.estimated_clean or 0):.2f}%")
        t.add_row("VRA from estimates", f"[bold red]{100 * (rep.estimated_vra or 0):.2f}% (NOT SOUND)[/]")
    t.add_row("seconds", ", ".join(f"{k} {v:.2f}" for k, v in rep.seconds.items()))
    console.print(t)
    sem = getattr(rep, "semantics", None)
    if a.sound and sem is not None and not sem.exact:
        console.print(f"[bold]Claim ({sem.name} semantics)[/]: for each certified sample, every input within l2 "
                      f"distance eps gets the same prediction from the model EXECUTED IN {sem.name.upper()}: "
                      f"{sem.describe()} (proofs/float_semantics.md).")
    elif a.sound:
        console.print("[dim]Claim: for each certified sample, every input within l2 distance eps gets the same "
                      "prediction from the model's function in exact arithmetic (see proofs/).[/]")


def write_json(rep: VerifyReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(rep.as_json(), indent=2) + "\n")


TSV_HEADER = "\t".join(TSV_COLUMNS) + "\n"


def tsv_rows(idx, labels, r) -> str:
    """TSV rows (:data:`TSV_COLUMNS` order) of the samples ``idx`` of the result ``r``."""
    return "".join(f"{int(i)}\t{int(lab)}\t{int(p)}\t{int(c)}\t{int(ce)}\t{float(rad):.9g}\n"
                   for i, lab, p, c, ce, rad in zip(idx, labels, r.pred, r.correct, r.certified, r.radius))


def tsv_text(rep: VerifyReport, labels: np.ndarray) -> str:
    return TSV_HEADER + tsv_rows(range(rep.result.n), labels, rep.result)


def write_tsv(rep: VerifyReport, labels: np.ndarray, path: str | Path) -> None:
    Path(path).write_text(tsv_text(rep, labels))


def write_html(rep: VerifyReport, labels: np.ndarray, path: str | Path, attack: dict | None = None) -> None:
    from certlib.report.html import html_report

    Path(path).write_text(html_report(rep, labels, attack=attack), encoding="utf-8")


def certified_curve(radius: np.ndarray, correct: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Certified accuracy at each radius in grid (correct and radius > r; at
    r = 0 this is clean accuracy)."""
    return np.array([float(np.mean(correct & ((radius > r) | (r == 0)))) for r in grid])


def write_plot(rep: VerifyReport, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = rep.result
    top = max(float(np.max(r.radius, initial=0.0)), rep.eps * 2, 1e-6)
    grid = np.linspace(0, top, 200)
    acc = certified_curve(r.radius, r.correct, grid)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(grid, 100 * acc)
    ax.axvline(rep.eps, color="gray", ls="--", lw=1)
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(f"{Path(rep.model).name}: VRA {100 * r.vra:.1f}% at eps={rep.eps:.4g}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
