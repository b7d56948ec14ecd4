"""RUN/metrics.jsonl (and TensorBoard event files when tensorboard is installed): what a run logs,
written by rank 0 only, trimmed on resume so no step is logged twice; and RUN/curves.png, its
loss, accuracy and throughput curves (`write_curves`, also `alexnet-fast plot RUN [RUN ...]` to
compare runs).

metrics.jsonl holds one JSON object per line: per log interval {"step", "epoch", "loss", "lr",
"img_per_s"}, per epoch the same plus "val_top1", "val_top5", "val_images" (when there is a val
split), "skipped_samples" (when samples were skipped) and, in the epoch at whose end the background
shard hash check finished, "shard_check" (model/shard_check.py). An epoch record's "loss" and
"img_per_s" cover the whole epoch, a resumed one too (its sums are in the checkpoint: model/loop.py
EpochTally)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class RunLog:
    """RUN/metrics.jsonl (+ TensorBoard when installed), written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resumed_at_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        if not enabled:
            return
        if resumed_at_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # A killed run may have logged steps after its last checkpoint; they are re-run now,
            # so drop them rather than log them twice.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _record_step(line) <= resumed_at_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:     # tensorboard is optional
            self.tensorboard = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:
        return sys.maxsize      # a line cut short by a kill: drop it


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(log-interval records, epoch-end records) of RUN/metrics.jsonl; a line cut short by a kill
    is left out. Epoch-end records are the ones written after an epoch (they carry its val
    accuracy; without a val split, every record of a step that ends an epoch)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    epochs = [r for r in records if "val_top1" in r]
    steps = [r for r in records if "val_top1" not in r]
    if not epochs:      # no val split: the last record of each epoch stands for it
        last: dict[int, dict] = {}
        for r in records:
            last[r["epoch"]] = r
        epochs = list(last.values())
    return steps, epochs


def write_curves(runs: list[Path], path: Path) -> None:
    """A PNG of train loss and img/s per step and val top-1/top-5 per epoch, one line per run
    (labelled by its directory name). Written to a temp file and renamed: a kill never leaves half
    a PNG.

    A bare Figure, not pyplot: a run redraws from a background thread, and pyplot's registry of
    open figures is process state no thread should share. Fixed margins, not tight_layout: that
    drew the figure once more to measure it, a third of the ~0.3 CPU-s a redraw cost (2026-12-03)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6), dpi=100)
    fig.subplots_adjust(left=0.055, right=0.99, bottom=0.14, top=0.92, wspace=0.28)
    loss_ax, acc_ax, speed_ax = fig.subplots(1, 3)
    for run in runs:
        steps, epochs = read_metrics(run)
        label = Path(run).name
        line, = loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=label, lw=1)
        speed_ax.plot([r["step"] for r in steps], [r["img_per_s"] for r in steps], color=line.get_color(), lw=1)
        with_val = [r for r in epochs if "val_top1" in r]
        if with_val:
            x = [r["epoch"] + 1 for r in with_val]
            acc_ax.plot(x, [100 * r["val_top1"] for r in with_val], "o-", color=line.get_color(), label=f"{label} top-1")
            acc_ax.plot(x, [100 * r["val_top5"] for r in with_val], "s--", color=line.get_color(), alpha=0.6,
                        label=f"{label} top-5")
    loss_ax.set(xlabel="step", ylabel="train loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="val accuracy (%)", title="validation", ylim=(0, 100))
    speed_ax.set(xlabel="step", ylabel="images / s (all ranks)", title="throughput")
    for ax in (loss_ax, acc_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
