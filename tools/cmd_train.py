"""`alexnet-fast train`: check what the user asked for (flags, paths, the shard set, the devices)
before any worker starts, so a mistake is one line and exit 2; then run model.train.run_training.

    alexnet-fast train --data shards/imagenet --out runs/paper                  # every visible GPU
    alexnet-fast train --data shards/imagenet --out runs/cpu --device cpu --nproc 2 --batch-size 32
"""
from __future__ import annotations

import click

from alexnet_fast.model.config import DEFAULT_RECIPE, ConfigError, TrainConfig, recipe_values, resolve_config
from alexnet_fast.tools.common import (CONTEXT, UserError, check_device, check_global_batch, check_out_dir,
                                       open_shards, run_failures_as_one_line, world_size)
from alexnet_fast.tools.flags import config_options, flag_name


def config_from_flags(config_file: str | None, flags: dict) -> TrainConfig:
    """recipe < --config FILE < flags; a value no run can use is a usage error naming its flag."""
    try:
        return resolve_config(flags.get("recipe") or DEFAULT_RECIPE.value, config_file, flags)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint=flag_name(e.field)) from None


def check_devices(cfg: TrainConfig) -> None:
    device = check_device(cfg.device, cfg.gpus)
    if device == "cpu" and cfg.grad_compression == "bf16":
        raise click.BadParameter("bf16 compression needs NCCL (a GPU run); gloo has no bf16 all-reduce hook",
                                 param_hint="--grad-compression")
    check_global_batch(cfg.batch_size, world_size(device, cfg.gpus, cfg.nproc))


def train(cfg: TrainConfig) -> dict:
    """Run training per `cfg` and turn its outcome into an exit: 0 when it completed, reached
    --max-steps or was stopped by a signal with a checkpoint written; 1 (one line) when it failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from alexnet_fast.model.train import run_training

    try:
        with run_failures_as_one_line("training", f"; continue from the last checkpoint with --resume --out {cfg.out}"):
            return run_training(cfg)
    except SignalException as e:
        # The launcher passed the signal on to the workers, which wrote RUN/last.pt and exited.
        click.echo(f"stopped by signal {e.sigval.name}; continue with --resume --out {cfg.out}", err=True)
        return {"outcome": "stopped"}


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
    open_shards(cfg.data)
    check_out_dir(cfg.out, "--out")
    check_devices(cfg)
    train(cfg)


