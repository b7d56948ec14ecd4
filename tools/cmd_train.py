"""`alexnet-fast train`, `alexnet-fast eval` and `alexnet-fast demo`.

The commands check what the user asked for (flags, paths, the shard set) before any worker starts,
so a mistake is one line and exit 2; the training itself lives in alexnet_fast.model.train.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from alexnet_fast.model.config import TrainConfig, config_options, resolve_config
from alexnet_fast.tools.cli import UserError, check_device

if TYPE_CHECKING:   # torch-heavy: imported when a command runs, not when the CLI starts
    from alexnet_fast.model.evaluate import EvalConfig, EvalResult

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _open_shards(data: str):
    from alexnet_fast.pipeline.shardset import ShardSet, ShardSetError

    try:
        shards = ShardSet.open(data)
    except ShardSetError as e:
        raise UserError(str(e)) from None
    if not shards.has_split("train"):
        raise UserError(f"shard set {data!r} has no train samples")
    return shards


def _check_devices(cfg: TrainConfig) -> None:
    from alexnet_fast.model import distributed as D

    device = check_device(cfg.device, cfg.gpus)
    if device == "cpu" and cfg.grad_compression == "bf16":
        raise click.BadParameter("bf16 compression needs NCCL (a GPU run); gloo has no bf16 all-reduce hook",
                                 param_hint="--grad-compression")
    world = (int(os.environ["WORLD_SIZE"]) if D.under_launcher()
             else D.local_world_size(device, cfg.gpus, cfg.nproc))
    if cfg.batch_size % world:
        raise click.BadParameter(
            f"{cfg.batch_size} is the GLOBAL batch and must divide evenly over {world} ranks",
            param_hint="--batch-size")


def _check_out_dir(path: str, hint: str) -> None:
    """A run/output directory that names an existing file would fail later with a traceback."""
    if Path(path).exists() and not Path(path).is_dir():
        raise click.BadParameter(f"{path!r} is a file, not a directory", param_hint=hint)


def train(cfg: TrainConfig) -> dict:
    """Run training per `cfg` and turn its outcome into an exit: 0 when it completed, reached
    --max-steps or was stopped by a signal with a checkpoint written; 1 when it failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from alexnet_fast.model.train import run_training

    try:
        result = run_training(cfg)
    except SignalException as e:
        # The launcher passed the signal on to the workers, which wrote RUN/last.pt and exited.
        click.echo(f"stopped by signal {e.sigval.name}; continue with --resume --out {cfg.out}", err=True)
        return {"outcome": "stopped"}
    except ChildFailedError as e:
        raise worker_failure(e, "training", f"; continue from the last checkpoint with --resume --out {cfg.out}") from None
    if result.get("error"):
        if int(os.environ.get("RANK", 0)) == 0:
            raise click.ClickException(result["error"])
        sys.exit(1)
    return result


def worker_failure(error, what: str, hint: str = "") -> click.ClickException:
    """One line for the launcher's ChildFailedError. A worker that raised has printed its own error;
    one killed by a signal (the out-of-memory killer's SIGKILL, a scheduler) printed nothing, so
    the signal is named here."""
    if not error.failures:
        return click.ClickException(f"a {what} worker failed{hint}")
    rank, failure = min(error.failures.items())
    if failure.exitcode is not None and failure.exitcode < 0:
        name = failure.signal_name()
        cause = f"was killed by {name}" + (" (the out-of-memory killer sends that)" if name == "SIGKILL" else "")
    elif isinstance(failure.message, str) and failure.message.startswith("rank "):   # D.exit_failed's
        return click.ClickException(failure.message)
    else:
        cause = f"failed (exit code {failure.exitcode}); its error is printed above"
    return click.ClickException(f"the {what} worker of rank {rank} {cause}{hint}")


@click.command("train", context_settings=CONTEXT)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML file with TrainConfig keys (flags given here win over it)")
@config_options
def train_command(config_file: str | None, **flags) -> None:
    """Train AlexNet on a shard set (DDP over every visible GPU, or --device cpu --nproc N).

    --batch-size is the GLOBAL batch: it is split evenly over all ranks (2 GPUs x 64 = 128).
    Values come from the --recipe preset (paper | fast), then --config FILE, then the flags.
    The resolved config is printed and saved to OUT/config.json; metrics go to OUT/metrics.jsonl;
    checkpoints to OUT/last.pt and OUT/best.pt. SIGTERM/SIGINT write a checkpoint and exit 0;
    --resume continues where the run stopped.
    """
    cfg = resolve_config(flags.get("recipe") or "paper", config_file, flags)
    if not cfg.data:
        raise click.UsageError("--data SHARDS is required (a directory written by `alexnet-fast shards`)")
    _open_shards(cfg.data)
    _check_out_dir(cfg.out, "--out")
    _check_devices(cfg)
    train(cfg)


@click.command("eval", context_settings=CONTEXT)
@click.option("--data", required=True, help="shard set directory (its val split is evaluated)")
@click.option("--checkpoint", "checkpoint_path", required=True,
              help="a checkpoint file, or a run directory (its last good checkpoint)")
@click.option("--ten-crop", is_flag=True, help="average the softmax of 4 corner + centre crops and their flips")
@click.option("--json", "as_json", is_flag=True, help='print {"top1": .., "top5": .., "images": ..}')
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="images per batch in each process")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--gpus", default=0, show_default=True, type=click.IntRange(min=0),
              help="GPUs (one process each); 0 = every visible GPU")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1), help="CPU mode: processes (gloo)")
@click.option("--loader", type=click.Choice(["dali", "baseline"]), default="dali", show_default=True)
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1),
              help="loader threads/workers per process")
@click.option("--on-corrupt", type=click.Choice(["error", "skip"]), default="error", show_default=True,
              help="a val image that does not decode: stop naming it, or skip it (and say how many)")
def eval_command(data, checkpoint_path, ten_crop, as_json, batch_size, device, gpus, nproc, loader, workers,
                 on_corrupt) -> None:
    """Top-1/top-5 accuracy of a checkpoint over the whole val split, every image exactly once.

    Runs on every visible GPU (one process each, --gpus N for fewer) or --device cpu --nproc N
    processes, or as the ranks of an outer torchrun; each process scores its own part of the val
    split and the counts are summed. Only rank 0 prints.
    """
    from alexnet_fast.model.evaluate import EvalConfig

    cfg = EvalConfig(data=data, checkpoint=checkpoint_path, ten_crop=ten_crop, batch_size=batch_size,
                     device=device, loader=loader, workers=workers, gpus=gpus, nproc=nproc, on_corrupt=on_corrupt)
    result = evaluate_checkpoint(cfg)
    if result is None:      # a rank other than 0 of an outer torchrun: rank 0 prints
        return
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        click.echo(f"top-1 {result.top1:.2%}  top-5 {result.top5:.2%}  ({result.images} images"
                   f"{', ten-crop' if ten_crop else ''})")


def _check_eval(cfg: "EvalConfig") -> str:
    """What `eval` needs before any worker starts: a shard set with a val split, the devices asked
    for, a readable checkpoint with as many classes as the shard set. Returns the checkpoint file
    (a run directory resolved to its newest good one, so every rank loads the same file)."""
    from alexnet_fast.model import checkpoint as ckpt

    shards = _open_shards(cfg.data)
    if not shards.has_split("val"):
        raise UserError(f"shard set {cfg.data!r} has no val samples to evaluate")
    check_device(cfg.device, cfg.gpus)
    def warn(message: str) -> None:     # a damaged last.pt, last.prev.pt used: one plain line, from rank 0
        if int(os.environ.get("RANK", 0)) == 0:
            click.echo(f"alexnet-fast eval: warning: {message}", err=True)

    try:
        state, path = ckpt.load_checkpoint(cfg.checkpoint, warn)
    except ckpt.CheckpointError as e:
        raise UserError(str(e)) from None
    if state["num_classes"] != shards.num_classes:
        raise UserError(f"the checkpoint has {state['num_classes']} classes, the shard set {shards.num_classes}")
    return str(path)


def evaluate_checkpoint(cfg: "EvalConfig") -> "EvalResult | None":
    """Run `cfg` (an alexnet_fast.model.evaluate.EvalConfig) and return the accuracy over the
    whole val split; None on ranks other than 0 of an outer torchrun. A damaged val shard or a
    failed worker: one line, exit 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from alexnet_fast.model.evaluate import run_evaluation

    cfg = replace(cfg, checkpoint=_check_eval(cfg))
    try:
        run = run_evaluation(cfg)
    except SignalException as e:
        raise click.ClickException(f"stopped by signal {e.sigval.name}") from None
    except ChildFailedError as e:
        raise worker_failure(e, "eval") from None
    rank = int(os.environ.get("RANK", 0))
    if run.error:
        if rank == 0:
            raise click.ClickException(run.error)
        sys.exit(1)
    if rank != 0:
        return None
    if run.skipped:
        click.echo(f"alexnet-fast eval: warning: skipped {run.skipped} corrupt val image(s); top-1/top-5 are "
                   f"over the other {run.result.images}", err=True)
    return run.result


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoSize:
    classes: int
    train_per_class: int
    val_per_class: int
    epochs: int
    batch_size: int
    lr: float


# Sized for a 2-core CPU (about 20 training img/s for alexnet-owt at 227x227, fp32): 10 classes of
# procedural images, a few minutes of training, well under the 10-minute budget end to end.
DEMO_CPU = DemoSize(classes=10, train_per_class=48, val_per_class=10, epochs=6, batch_size=32, lr=0.01)
DEMO_GPU = DemoSize(classes=100, train_per_class=260, val_per_class=50, epochs=16, batch_size=256, lr=0.02)


@click.command("demo", context_settings=CONTEXT)
@click.option("--out", "out_dir", default=None, help="keep the sample, shards and run here (default: a temp dir)")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--loader", type=click.Choice(["dali", "baseline"]), default="dali", show_default=True)
def demo_command(out_dir: str | None, device: str, loader: str) -> None:
    """Write the built-in procedural sample as a raw ImageNet tree, shard it, train AlexNet
    (one-weird-trick variant) on it, evaluate, and print images/sec and accuracy."""
    device = check_device(device)
    if out_dir is not None:
        _check_out_dir(out_dir, "--out")
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="alexnet-fast-demo-") as tmp:
            run_demo(Path(tmp), device, loader)
        click.echo("(the sample, shards, checkpoints and curves.png were in a temp dir, now removed: "
                   "keep them with --out DIR)")
    else:
        run_demo(Path(out_dir), device, loader)


def run_demo(root: Path, device: str, loader: str, size: DemoSize | None = None) -> dict:
    from alexnet_fast.model.evaluate import EvalConfig
    from alexnet_fast.tools.sample_data import SampleSpec, write_raw_imagenet
    from alexnet_fast.tools.sharding.driver import ShardOptions, default_workers, make_shards

    size = size or (DEMO_GPU if device == "cuda" else DEMO_CPU)
    started = time.perf_counter()
    raw, shards_dir, run_dir = root / "raw", root / "shards", root / "run"
    click.echo(f"[1/4] writing the procedural sample: {size.classes} classes, "
               f"{size.train_per_class} train + {size.val_per_class} val images each -> {raw}")
    if not raw.exists():
        write_raw_imagenet(raw, SampleSpec(classes=size.classes, train_per_class=size.train_per_class,
                                           val_per_class=size.val_per_class, odd_files=False))
    click.echo(f"[2/4] sharding -> {shards_dir}")
    report = make_shards(raw, shards_dir, ShardOptions(per_shard=200), workers=default_workers(),
                         progress=True, log=lambda msg: click.echo(f"      {msg}"))
    click.echo(f"      {report.summary()}")
    gpus = _demo_gpus(size.batch_size) if device == "cuda" else 0
    cfg = resolve_config("fast", None, dict(
        data=str(shards_dir), out=str(run_dir), arch="alexnet-owt", init="kaiming", epochs=size.epochs,
        batch_size=size.batch_size, lr=size.lr, scale_lr=False, warmup_epochs=1.0, gpus=gpus,
        device=device, loader=loader, workers=2 if device == "cpu" else 4, log_every=5, resume=True))
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
    chance = 1.0 / size.classes
    click.echo(f"demo: {throughput:.1f} train img/s on {device}; val top-1 {val.top1:.1%} "
               f"(chance {chance:.0%}), top-5 {val.top5:.1%} over {val.images} images; "
               f"training {train_seconds:.0f} s, total {time.perf_counter() - started:.0f} s; "
               f"curves in {run_dir / 'curves.png'}")
    return {"val": val.as_dict(), "img_per_s": throughput, "outcome": result.get("outcome")}


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
