"""Does a loader's memory stay flat over many epochs? RSS per epoch and its slope per epoch.

    python benchmarks/loader_memory.py [--data SHARDS] [--loader dali|baseline|both] [--epochs 60] [--json FILE]

Runs the train loader the way the trainer does (`set_epoch(e)`, every batch consumed before the
next is asked for) over many epochs of a small shard set (without --data: a procedural one is
written to a temp dir first), and after each epoch records the resident set size of this process
and of its worker processes (the baseline's DataLoader workers; DALI uses threads). The slope is
a least-squares fit of the main process's RSS against the epoch number over the epochs after
`--warmup-epochs` (allocator arenas, DALI's buffers and caches fill up during the first ones: about
20-30 epochs here), in MiB per epoch. A leak of a pipeline, buffer or index copy per epoch shows up
as a steady positive slope; `flat` is true when the slope is under `--max-slope-mib` (default 0.5
MiB/epoch: one leaked 227x227 fp32 batch of 32 would be 19 MiB/epoch). The baseline's workers are
new processes each epoch (persistent_workers=False), so their RSS, sampled during the epoch, is
reported but cannot accumulate and does not enter `flat`.

`--loader both` measures each loader in its own fresh process so neither inherits the other's heap.
`--json` writes {"loader": {"rss_mib": [...], "slope_mib_per_epoch", "growth_mib", "flat", ...}, ...}.
Linux only (reads /proc).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (DataLoader workers and whatever they start)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def slope_per_epoch(values: list[float]) -> float:
    """Least-squares slope of values against 0, 1, 2, ... (0 for fewer than 2 values)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    cov = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    var = sum((x - mean_x) ** 2 for x in range(n))
    return cov / var


def measure(data: str, loader_kind: str, epochs: int, warmup_epochs: int, batch_size: int, workers: int,
            device: str, max_slope_mib: float) -> dict:
    import torch

    from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader

    spec = LoaderSpec(data=data, split="train", kind=loader_kind, batch_size=batch_size, device=device,
                      workers=workers, borrow_buffers=True)   # as the trainer asks for batches
    loader = make_loader(spec)
    me = os.getpid()
    rss_main, rss_workers, seconds = [], [], []
    checksum = 0.0
    for epoch in range(epochs):
        started = time.perf_counter()
        loader.set_epoch(epoch)
        workers_peak = 0
        for i, (images, labels) in enumerate(loader):
            checksum += float(images[0, 0, 0, 0]) + int(labels[0])    # consume the batch, as a step would
            if i % 4 == 0:
                workers_peak = max(workers_peak, sum(rss_bytes(p) for p in descendants(me)))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        rss_main.append(rss_bytes(me) / 2**20)
        rss_workers.append(workers_peak / 2**20)
        print(f"{loader_kind:>8} epoch {epoch:3d}: RSS {rss_main[-1]:8.1f} MiB"
              + (f"  (+ workers {rss_workers[-1]:7.1f} MiB)" if workers_peak else "")
              + f"  {seconds[-1]:5.2f} s", flush=True)
    measured = rss_main[warmup_epochs:]
    total = [a + b for a, b in zip(rss_main, rss_workers)][warmup_epochs:]
    slope = slope_per_epoch(measured)
    result = {
        "loader": loader_kind, "device": device, "batch_size": batch_size, "workers": workers,
        "epochs": epochs, "warmup_epochs": warmup_epochs, "batches_per_epoch": len(loader),
        "samples_per_epoch": len(loader) * batch_size,
        "rss_mib": [round(v, 2) for v in rss_main], "workers_rss_mib": [round(v, 2) for v in rss_workers],
        "epoch_seconds": [round(v, 3) for v in seconds],
        "slope_mib_per_epoch": slope,
        "total_slope_mib_per_epoch": slope_per_epoch(total),   # main + workers
        "growth_mib": measured[-1] - measured[0] if measured else 0.0,
        "max_slope_mib": max_slope_mib,
        "checksum": checksum,
    }
    result["flat"] = abs(slope) < max_slope_mib
    return result


def small_shard_set(root: Path) -> str:
    """A procedural shard set: 4 classes x 64 train images (256 samples), 8 shards."""
    from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet
    from alexnet_fast.tools.sharding.driver import ShardOptions, default_workers, make_shards

    raw = write_raw_imagenet(root / "raw", SampleSpec(classes=4, train_per_class=64, val_per_class=0,
                                                       odd_files=False, val_layout=ValFormat.NONE))
    make_shards(raw.root, root / "shards", ShardOptions(per_shard=32), workers=default_workers(), progress=False,
                log=lambda msg: None)
    return str(root / "shards")


def report_line(r: dict) -> str:
    verdict = "flat" if r["flat"] else "GROWING"
    return (f"{r['loader']:>8}: RSS slope {r['slope_mib_per_epoch']:+.3f} MiB/epoch "
            f"(workers, new each epoch: {r['total_slope_mib_per_epoch'] - r['slope_mib_per_epoch']:+.3f}), "
            f"{r['growth_mib']:+.1f} MiB over epochs "
            f"{r['warmup_epochs']}-{r['epochs'] - 1}, RSS {r['rss_mib'][r['warmup_epochs']]:.0f} -> "
            f"{r['rss_mib'][-1]:.0f} MiB, {r['samples_per_epoch']} samples/epoch: {verdict} "
            f"(limit {r['max_slope_mib']} MiB/epoch)")


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="shard set directory [default: write a small procedural one to a temp dir]")
@click.option("--loader", "loader_kind", type=click.Choice(["dali", "baseline", "both"]), default="both",
              show_default=True)
@click.option("--epochs", type=click.IntRange(min=3), default=60, show_default=True)
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=20, show_default=True,
              help="first epochs left out of the slope")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="DALI threads / DataLoader workers")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-slope-mib", type=float, default=0.5, show_default=True, help="'flat' below this slope")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the results here")
@click.option("--no-summary", is_flag=True, hidden=True, help="(--loader both runs each loader with it)")
def main(data, loader_kind, epochs, warmup_epochs, batch_size, workers, device, max_slope_mib, json_path, no_summary):
    if warmup_epochs > epochs - 2:
        raise click.BadParameter("leave at least 2 measured epochs", param_hint="--warmup-epochs")
    with tempfile.TemporaryDirectory(prefix="loader-memory-") as tmp:
        if data is None:
            print("writing a small procedural shard set ...", flush=True)
            data = small_shard_set(Path(tmp))
        args = dict(epochs=epochs, warmup_epochs=warmup_epochs, batch_size=batch_size, workers=workers,
                    device=device, max_slope_mib=max_slope_mib)
        if loader_kind != "both":
            results = {loader_kind: measure(data, loader_kind, **args)}
        else:   # each loader in a fresh process: neither inherits the other's heap
            results = {}
            for kind in ("dali", "baseline"):
                out = Path(tmp) / f"{kind}.json"
                cmd = [sys.executable, __file__, "--data", data, "--loader", kind, "--json", str(out), "--no-summary",
                       *[f"--{k.replace('_', '-')}={v}" for k, v in args.items()]]
                subprocess.run(cmd, check=True)
                results.update(json.loads(out.read_text()))
    if not no_summary:
        print()
        for r in results.values():
            print(report_line(r))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
