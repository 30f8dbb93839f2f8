"""Training logs: ``metrics.jsonl`` (one JSON object per line), the loss/VRA
curve PNG and the rich progress bars (stderr).

Record kinds (field ``"kind"``): ``"epoch"`` (every epoch: loss, train
accuracy, lr, eps, images/s; plus the test evaluation when one ran:
clean_accuracy, vra_estimate, lipschitz_estimate), ``"step"`` (every
``log_every`` steps) and ``"final"`` (the sound VRA from the exported model).
Every record carries ``"step"`` (optimizer steps done); a resumed run drops
the records written after its checkpoint, so the log reads as one run.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        keep = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if rec.get("kind") != "final" and int(rec.get("step", 0)) <= resume_step:
                    keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> None:
    """Loss (left) and clean accuracy / VRA estimate / sound VRA (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r for r in records if r.get("kind") == "epoch"]
    ev = [r for r in ep if "clean_accuracy" in r]
    fin = [r for r in records if r.get("kind") == "final"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot([r["epoch"] for r in ep], [r["loss"] for r in ep], label="train loss")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.set_yscale("log")
    a1.grid(alpha=0.3)
    a1.legend()
    if ev:
        x = [r["epoch"] for r in ev]
        a2.plot(x, [100 * r["clean_accuracy"] for r in ev], label="clean accuracy (test)")
        a2.plot(x, [100 * r["vra_estimate"] for r in ev], label="VRA, power-iteration estimate (test)")
    for r in fin:
        if r.get("sound_vra") is not None:
            a2.scatter([r["epoch"]], [100 * r["sound_vra"]], color="black", zorder=3,
                       label=f"sound VRA {100 * r['sound_vra']:.1f}%")
    a2.set_xlabel("epoch")
    a2.set_ylabel("%")
    a2.set_ylim(0, 100)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_progress(console: Console, disable: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.fields[what]}[/]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=disable, transient=False)
