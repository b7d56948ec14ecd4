"""How long do the GPUs idle between two epochs? The real trainer, a few short epochs, the stall by part.

    python benchmarks/epoch_boundary.py [--data SHARDS] [--epochs 5] [--batch-size 16] [--json FILE]

Runs `alexnet-fast train` (alexnet-owt, --device cpu, one process, the DALI loader; without --data
on a procedural shard set written to a temp dir first) for a few short epochs, then reads the
`boundary_s` / `boundary_<part>_s` fields the trainer writes into each epoch's record of
metrics.jsonl (model/boundary.py), and `checkpoint_write_s` / `checkpoint_wait_s` (how long the
background checkpoint writes took, and how much of that the loop waited for): the wall time from one epoch's last step to the next epoch's
first step, split into eval, checkpoint, plot, pipeline (the next epoch's loader positioned and its
first batch in hand) and other. Reports each part's median over the boundaries and the
non-overlapped stall without the eval forward passes (`boundary_s - boundary_eval_s`), the figure
issue 15 targets (<= 0.25 s). The epochs are kept short on purpose: what is measured is the work
between them, which does not depend on the epoch's length.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click


def write_sample(root: Path, classes: int, train_per_class: int, val_per_class: int) -> Path:
    from alexnet_fast.tools.sample_data import SampleSpec, write_raw_imagenet
    from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

    raw = write_raw_imagenet(root / "raw", SampleSpec(classes=classes, train_per_class=train_per_class,
                                                      val_per_class=val_per_class, odd_files=False))
    make_shards(raw.root, root / "shards", ShardOptions(per_shard=64), workers=os.cpu_count() or 1, progress=False,
                log=lambda msg: None)
    return root / "shards"


def boundaries(metrics: Path) -> list[dict]:
    epochs = [r for r in map(json.loads, metrics.read_text().splitlines()) if "boundary_s" in r]
    return [{k: v for k, v in r.items() if k.startswith(("boundary", "checkpoint_"))} for r in epochs]


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a shard set (default: a procedural one, 8 classes x 32 train + 8 val images)")
@click.option("--epochs", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--extra", multiple=True, help="another flag for `alexnet-fast train` (repeat), e.g. --extra=--eval-every=2")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(data: Path | None, epochs: int, batch_size: int, extra: tuple[str, ...], json_path: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="epoch-boundary-") as tmp:
        tmp = Path(tmp)
        data = data or write_sample(tmp, classes=8, train_per_class=32, val_per_class=8)
        run = tmp / "run"
        command = [sys.executable, "-m", "alexnet_fast.tools.cli", "train", "--data", str(data), "--out", str(run),
                   "--device", "cpu", "--arch", "alexnet-owt", "--init", "kaiming", "--epochs", str(epochs),
                   "--batch-size", str(batch_size), "--log-every", "1000", *extra]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise click.ClickException(f"training failed: {done.stderr.strip().splitlines()[-1:]}")
        found = boundaries(run / "metrics.jsonl")
    if not found:
        raise click.ClickException("no epoch record carries boundary fields: is this trainer older than them?")
    keys = sorted({k for b in found for k in b})
    medians = {k: statistics.median(b.get(k, 0.0) for b in found) for k in keys}
    stall = [b["boundary_s"] - b.get("boundary_eval_s", 0.0) for b in found]
    written = sum(b.get("checkpoint_write_s", 0.0) for b in found)
    overlapped = 1.0 - sum(b.get("checkpoint_wait_s", 0.0) for b in found) / written if written else None
    report = {"boundaries": found, "median": medians, "stall_without_eval_s": statistics.median(stall),
              "stall_without_eval_runs_s": stall, "checkpoint_write_overlapped": overlapped, "epochs": epochs, "batch_size": batch_size, "extra": list(extra),
              "load_average": os.getloadavg(), "wall_s": time.perf_counter() - started}
    width = max(map(len, keys))
    for key in keys:
        click.echo(f"{key:<{width}}  median {medians[key]:7.3f} s   runs " + " ".join(f"{b.get(key, 0):.3f}" for b in found))
    click.echo(f"stall without the eval passes: median {report['stall_without_eval_s']:.3f} s over {len(found)} "
               f"boundaries (load average {report['load_average'][0]:.1f})")
    if overlapped is not None:
        click.echo(f"checkpoint writing overlapped with training: {overlapped:.1%} of {written:.2f} s")
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
