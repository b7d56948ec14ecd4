"""`alexnet-fast demo`: the whole product on a built-in sample: write a procedural raw ImageNet
tree, shard it with make_shards, train AlexNet (one-weird-trick variant) through the DALI loader,
evaluate best.pt, print train images/s and val top-1/top-5.

    alexnet-fast demo [--out DIR] [--device cpu|cuda] [--loader dali|baseline]

Everything is kept in --out (default ./demo, git-ignored in the repository); the demo ends with
the commands to try next on it (verify, eval, profile, plot).
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import click

from alexnet_fast.model.config import resolve_config
from alexnet_fast.model.evaluate import EvalConfig
from alexnet_fast.model.runtime import DEVICES
from alexnet_fast.pipeline.loader_spec import LOADER_KINDS
from alexnet_fast.tools.cmd_eval import evaluate_checkpoint
from alexnet_fast.tools.cmd_train import train
from alexnet_fast.tools.common import CONTEXT, UserError, check_device, check_out_dir


@dataclass(frozen=True)
class DemoSize:
    classes: int
    train_per_class: int
    val_per_class: int
    epochs: int
    batch_size: int
    lr: float


# Sized for a 2-core CPU (20-31 training img/s for alexnet-owt at 227x227, fp32): 10 classes of
# procedural images, a few minutes of training, well under the 10-minute budget end to end.
# The lr is small because He init without a normalization layer feeds the output layer large
# features (squared norm ~57,000 per image in training mode on this sample), and its step grows
# with them: at 0.01 the loss rose above log(10) and val top-1 fell back to chance; from ~0.0003 the
# loss oscillates; 0.00025 falls steadily (benchmarks/RESULTS.md, "The demo's recipe"). The GPU
# demo's lr follows the same reasoning (100 classes: the output layer's curvature at the start is
# 10x smaller), not measured. 4 epochs: at 6 the same recipe reached the same 100% (val top-1
# 50 -> 82 -> 97 -> 100 -> 100 -> 100%); at 4 it goes 50 -> 97 -> 100 -> 100% on 1 and 2 threads
# in two-thirds of the time (benchmarks/RESULTS.md, "The demo's recipe").
DEMO_CPU = DemoSize(classes=10, train_per_class=48, val_per_class=10, epochs=4, batch_size=32, lr=0.00025)
DEMO_GPU = DemoSize(classes=100, train_per_class=260, val_per_class=50, epochs=16, batch_size=256, lr=0.0025)


DEFAULT_OUT = "demo"    # in the repository that is /demo in .gitignore


@click.command("demo", context_settings=CONTEXT)
@click.option("--out", "out_dir", default=DEFAULT_OUT, show_default=True,
              help="where the sample, shards and run are written and kept; a rerun with the same --out continues there")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--loader", type=click.Choice(LOADER_KINDS), default="dali", show_default=True)
def demo_command(out_dir: str, device: str, loader: str) -> None:
    """Write the built-in procedural sample as a raw ImageNet tree, shard it, train AlexNet
    (one-weird-trick variant) on it, evaluate, and print images/sec and accuracy. Everything is
    kept in --out, and the last lines are the commands to try next on it."""
    device = check_device(device)
    check_out_dir(out_dir, "--out")
    result = run_demo(Path(out_dir), device, loader)
    if result["outcome"] != "stopped":
        click.echo("next, on what the demo wrote (copy and paste):")
        for line in next_commands(out_dir, device):
            click.echo(f"  {line}")


def next_commands(out_dir: str, device: str) -> list[str]:
    """The commands a newcomer tries next on the demo's outputs, exactly as they are to be typed."""
    root = Path(out_dir)
    shards, run, best, profile, curves = (shlex.quote(str(root / name)) for name in
                                          ("shards", "run", "run/best.pt", "profile.json", "curves.png"))
    return [f"alexnet-fast verify {shards}",
            f"alexnet-fast eval --data {shards} --checkpoint {best} --device {device}",
            f"alexnet-fast profile --data {shards} --device {device} --json {profile}",
            f"alexnet-fast plot {run} --out {curves}"]


def run_demo(root: Path, device: str, loader: str, size: DemoSize | None = None) -> dict:
    from alexnet_fast.model.checkpoint import has_checkpoint
    from alexnet_fast.tools.sample_data import SampleSpec, write_raw_imagenet
    from alexnet_fast.tools.sharding.driver import ShardOptions, default_workers, make_shards
    from alexnet_fast.tools.sharding.errors import ShardingError

    size = size or (DEMO_GPU if device == "cuda" else DEMO_CPU)
    started = time.perf_counter()
    raw, shards_dir, run_dir = root / "raw", root / "shards", root / "run"
    click.echo(f"[1/4] writing the procedural sample: {size.classes} classes, "
               f"{size.train_per_class} train + {size.val_per_class} val images each -> {raw}")
    if not raw.exists():
        write_raw_imagenet(raw, SampleSpec(classes=size.classes, train_per_class=size.train_per_class,
                                           val_per_class=size.val_per_class, odd_files=False))
    click.echo(f"[2/4] sharding -> {shards_dir}")
    try:    # e.g. another demo with the same --out is sharding there now (its lock refuses this one)
        report = make_shards(raw, shards_dir, ShardOptions(per_shard=200), workers=default_workers(),
                             progress=True, log=lambda msg: click.echo(f"      {msg}"))
    except ShardingError as e:
        raise UserError(str(e)) from None
    click.echo(f"      {report.summary()}")
    gpus = _demo_gpus(size.batch_size) if device == "cuda" else 0
    cfg = resolve_config("fast", None, dict(
        data=str(shards_dir), out=str(run_dir), arch="alexnet-owt", init="kaiming", epochs=size.epochs,
        batch_size=size.batch_size, lr=size.lr, scale_lr=False, warmup_epochs=1.0, gpus=gpus,
        device=device, loader=loader, log_every=5, resume=has_checkpoint(run_dir)))
    click.echo(f"[3/4] training alexnet-owt for {cfg.epochs} epochs on "
               + (f"{gpus} GPU(s)" if device == "cuda" else "the CPU"))
    train_started = time.perf_counter()
    result = train(cfg)
    train_seconds = time.perf_counter() - train_started
    if result.get("outcome") == "stopped":
        click.echo(f"demo stopped; rerun `alexnet-fast demo --out {root}` to continue where it stopped")
        return {"val": None, "img_per_s": 0.0, "outcome": "stopped"}
    click.echo("[4/4] evaluating best.pt on the val split")
    val = evaluate_checkpoint(EvalConfig(data=str(shards_dir), checkpoint=str(run_dir / "best.pt"), batch_size=64,
                                         device=device, loader=loader, workers=cfg.workers, gpus=gpus))
    throughput = _mean_train_throughput(run_dir / "metrics.jsonl")
    _keep_only_the_best_weights(run_dir)
    chance = 1.0 / size.classes
    click.echo(f"demo: {throughput:.1f} train img/s on {device}; val top-1 {val.top1:.1%} "
               f"(chance {chance:.0%}), top-5 {val.top5:.1%} over {val.images} images; "
               f"training {train_seconds:.0f} s, total {time.perf_counter() - started:.0f} s; "
               f"curves in {run_dir / 'curves.png'}")
    return {"val": val.as_dict(), "img_per_s": throughput, "outcome": result.get("outcome")}


def _keep_only_the_best_weights(run_dir: Path) -> None:
    """A finished demo is evaluated and never resumed: of its checkpoints only best.pt (the weights,
    ~228 MB for alexnet-owt) is worth its disk; last.pt and last.prev.pt (~456 MB each, half of it
    optimizer state) exist to resume a run and go."""
    from alexnet_fast.model.checkpoint import LAST, PREVIOUS

    freed = 0
    for name in (LAST, PREVIOUS):
        path = run_dir / name
        if path.exists():
            freed += path.stat().st_size
            path.unlink()
    if freed:
        click.echo(f"      kept {run_dir / 'best.pt'} (weights for eval and export); removed last.pt and "
                   f"last.prev.pt ({freed / 1e6:.0f} MB of resume state: the demo is finished)")


def _demo_gpus(global_batch: int) -> int:
    """The most visible GPUs the demo's fixed global batch divides evenly over (a power of two:
    6 visible GPUs -> 4), since the user cannot change the demo's batch size."""
    import torch

    visible = max(1, torch.cuda.device_count())
    return max(g for g in (1, 2, 4, 8, 16, 32, 64) if g <= visible and global_batch % g == 0)


def _mean_train_throughput(metrics: Path) -> float:
    """Mean img/s over the epoch records (each is an epoch's images / its training seconds)."""
    rates = [r["img_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "val_top1" in r]
    return sum(rates) / len(rates) if rates else 0.0
