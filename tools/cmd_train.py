"""`alexnet-fast train`: check what the user asked for (flags, paths, the shard set, the devices)
before any worker starts, so a mistake is one line and exit 2; then run model.train.run_training.

    alexnet-fast train --data shards/imagenet --out runs/paper                  # every visible GPU
    alexnet-fast train --data shards/imagenet --out runs/cpu --device cpu --nproc 2 --batch-size 32
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import click

from alexnet_fast.model.parallel import Parallel, data_share
from alexnet_fast.model.config import DEFAULT_RECIPE, ConfigError, TrainConfig, recipe_values, resolve_config
from alexnet_fast.tools.common import (CONTEXT, UserError, check_device, check_global_batch, check_out_dir,
                                       is_rank_zero, open_shards, run_failures_as_one_line, world_size)
from alexnet_fast.tools.flags import config_options, flag_name
from alexnet_fast.tools.run_lock import DirectoryInUse, LockError, hold_directory


def config_from_flags(config_file: str | None, flags: dict) -> TrainConfig:
    """recipe < --config FILE < flags; a value no run can use is a usage error naming its flag."""
    try:
        return resolve_config(flags.get("recipe") or DEFAULT_RECIPE.value, config_file, flags)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint=flag_name(e.field)) from None


def check_devices(cfg: TrainConfig) -> int:
    """The devices and the global batch; returns the number of ranks the run will have."""
    device = check_device(cfg.device, cfg.gpus)
    if device == "cpu" and cfg.grad_compression == "bf16":
        raise click.BadParameter("bf16 compression needs NCCL (a GPU run); gloo has no bf16 all-reduce hook",
                                 param_hint="--grad-compression")
    ranks = world_size(device, cfg.gpus, cfg.nproc)
    if cfg.parallel == Parallel.COLUMNS.value and ranks % 2:
        raise click.BadParameter(f"columns runs 2 ranks per replica: give an even number of ranks, not {ranks}",
                                 param_hint="--parallel")
    check_global_batch(cfg.batch_size, data_share(cfg.parallel, 0, ranks)[1])   # columns: per replica
    return ranks


def check_run(cfg: TrainConfig, shards, ranks: int) -> None:
    """What the run needs of its data and of the run it continues, checked before RUN is created
    or anything in it touched, so a refusal is one line, exit 2, and RUN stays as it was."""
    check_data_fits(cfg, shards, ranks)
    if cfg.resume:
        check_resume(cfg, shards)


def check_data_fits(cfg: TrainConfig, shards, ranks: int) -> None:
    """A RUN outside the shard set, a full batch per epoch, a class count that covers the labels."""
    from alexnet_fast.model.identity import num_classes_mismatch
    from alexnet_fast.pipeline.epoch_plan import train_batches

    data, out = Path(cfg.data).resolve(), Path(cfg.out).resolve()
    if out == data or data in out.parents:
        raise UserError(f"--out {cfg.out} is {'the shard set' if out == data else 'inside the shard set'} --data "
                        f"{cfg.data}: a run's checkpoints and logs go outside it")
    samples = shards.num_samples("train")
    replicas = data_share(cfg.parallel, 0, ranks)[1]     # columns: 2 ranks read one share
    if not train_batches(samples, replicas, cfg.batch_size // replicas):
        over = f" over {replicas} data-parallel ranks" if replicas > 1 else ""
        raise UserError(f"--batch-size {cfg.batch_size} is more than the {samples} train images of --data "
                        f"{cfg.data}{over}: no full batch per epoch; use a smaller one")
    problem = num_classes_mismatch(cfg.num_classes, shards)
    if problem:
        raise UserError(problem)


def check_resume(cfg: TrainConfig, shards) -> None:
    """--resume: the checkpoint it would continue from has the flags' arch and output count, the
    data's classes and (unless --allow-other-data) its shard set (model/identity.py). Reads only
    the checkpoint's metadata (mapped, ~0.03 s)."""
    from alexnet_fast.model import checkpoint as ckpt
    from alexnet_fast.model.identity import resume_refusal

    if not ckpt.has_checkpoint(cfg.out):
        return
    try:
        saved, path = ckpt.load_checkpoint(cfg.out, warn=lambda message: None, mmap=True)
    except ckpt.CheckpointError:
        return      # the run's own resume says so (and what it can fall back on)
    refusal = resume_refusal(saved, path, arch=cfg.arch, num_classes=cfg.num_classes or shards.num_classes,
                             shard_set=shards, allow_other_data=cfg.allow_other_data)
    if refusal:
        raise UserError(f"{refusal}; or train into another --out")


def train(cfg: TrainConfig) -> dict:
    """Run training per `cfg` and turn its outcome into an exit: 0 when it completed, reached
    --max-steps or was stopped by a signal with a checkpoint written; 1 (one line) when it failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from alexnet_fast.model.train import run_training

    try:
        with holding_run_directory(cfg), \
                run_failures_as_one_line("training", f"; continue from the last checkpoint with --resume --out {cfg.out}"):
            return run_training(cfg)
    except SignalException as e:
        # The launcher passed the signal on to the workers, which wrote RUN/last.pt and exited
        # without a word (model/train.py): this is the one line about it, as a one-process run's.
        click.echo(stopped_line(cfg.out, e.sigval.name))
        return {"outcome": "stopped"}


def stopped_line(run_dir: str, signal_name: str) -> str:
    """What a run stopped by `signal_name` left: the step its newest checkpoint holds (read from
    the checkpoint, whatever the workers managed to write before they exited)."""
    from alexnet_fast.model import checkpoint as ckpt

    try:
        saved, path = ckpt.load_checkpoint(run_dir, warn=lambda message: None, mmap=True)
    except ckpt.CheckpointError:
        return f"stopped by {signal_name} before a checkpoint was written"
    return f"stopped by {signal_name}: {path} holds step {saved['step']} (continue with --resume --out {run_dir})"


def holding_run_directory(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """RUN belongs to one run: the process of rank 0 holds RUN's lock (tools/run_lock.py) for the
    whole run, and a second `train` on RUN is refused (one line, exit 2) before it touches
    anything there. That process is this command when it launches the workers itself (they are
    its children and never lock), or rank 0's command under an outer torchrun; the other ranks'
    commands take no lock, so there is one lock per run, not one per rank."""
    if not is_rank_zero():
        return contextlib.nullcontext()
    from alexnet_fast.model.checkpoint import remove_stale_temporaries

    stack = contextlib.ExitStack()
    try:
        stack.enter_context(hold_directory(cfg.out, "train", warn=lambda message: click.echo(
            f"alexnet-fast train: warning: {message}", err=True)))
    except DirectoryInUse as e:
        what_to_do = (f"wait for it to end, or stop it (kill {e.holder.pid} on {e.holder.host}: it writes a checkpoint)"
                      if e.holder else "wait for it to end, or stop it")
        raise UserError(f"{e}; {what_to_do}, then continue with --resume --out {cfg.out}; "
                        f"or train into another --out") from None
    except LockError as e:
        raise UserError(str(e)) from None
    try:
        remove_stale_temporaries(Path(cfg.out))     # no writer of RUN is alive now: a killed run's temp files
    except BaseException:
        stack.close()
        raise
    return stack


def _recipe_note(name: str, default) -> str:
    """" [paper: 90, fast: 40]" where the recipes differ, " [default: x]" otherwise."""
    if name == "recipe":
        return f" [default: {DEFAULT_RECIPE.value}]"
    per_recipe = recipe_values(name)
    if len(set(map(repr, per_recipe.values()))) > 1:
        return " [" + ", ".join(f"{recipe}: {value}" for recipe, value in per_recipe.items()) + "]"
    return f" [default: {default}]" if default != "" else ""


@click.command("train", context_settings=CONTEXT)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML file with TrainConfig keys (flags given here win over it)")
@config_options(TrainConfig, unset_defaults=True, default_note=_recipe_note)
def train_command(config_file: str | None, **flags) -> None:
    """Train AlexNet on a shard set (DDP over every visible GPU, or --device cpu --nproc N).

    --batch-size is the GLOBAL batch: it is split evenly over all ranks (2 GPUs x 64 = 128).
    Values come from the --recipe preset (paper | bvlc | torchvision | fast; default fast), then
    --config FILE, then the flags; `alexnet-fast recipes NAME` shows a preset with its sources.
    --recipe paper is the 2012 paper exactly: its init sits at loss log(C) for the first steps
    (measured on the demo sample: docs/recipes.md).
    The resolved config is printed and saved to OUT/config.json; metrics go to OUT/metrics.jsonl;
    checkpoints to OUT/last.pt and OUT/best.pt. SIGTERM/SIGINT write a checkpoint and exit 0;
    --resume continues where the run stopped.
    """
    cfg = config_from_flags(config_file, flags)
    if not cfg.data:
        raise click.UsageError("--data SHARDS is required (a directory written by `alexnet-fast shards`)")
    shards = open_shards(cfg.data)
    check_out_dir(cfg.out, "--out")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise click.BadParameter(f"{cfg.init_from!r} is not a checkpoint file (e.g. RUN/best.pt)", param_hint="--init-from")
    check_run(cfg, shards, check_devices(cfg))
    train(cfg)


