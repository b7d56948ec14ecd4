"""`alexnet-fast eval`: top-1/top-5 of a checkpoint over the whole val split, every image once,
over the same ranks as training (model.evaluate.run_evaluation).

    alexnet-fast eval --data shards/imagenet --checkpoint runs/paper/best.pt --ten-crop --json
"""
from __future__ import annotations

import json
from dataclasses import replace

import click

from alexnet_fast.model.evaluate import EvalConfig, EvalResult
from alexnet_fast.tools.common import (CONTEXT, UserError, check_device, check_global_batch, is_rank_zero,
                                       open_shards, run_failures_as_one_line, world_size)
from alexnet_fast.tools.flags import config_options


@click.command("eval", context_settings=CONTEXT)
@click.option("--data", required=True, help="shard set directory (its val split is evaluated)")
@click.option("--checkpoint", required=True, help="a checkpoint file, or a run directory (its last good checkpoint)")
@click.option("--json", "as_json", is_flag=True, help='print {"top1": .., "top5": .., "images": ..}')
@config_options(EvalConfig, exclude=("data", "checkpoint"))
def eval_command(as_json: bool, **values) -> None:
    """Top-1/top-5 accuracy of a checkpoint over the whole val split, every image exactly once.

    Runs on every visible GPU (one process each, --gpus N for fewer) or --device cpu --nproc N
    processes, or as the ranks of an outer torchrun; each process scores its own part of the val
    split and the counts are summed. --batch-size is the GLOBAL batch, as in train. Only rank 0 prints.
    """
    cfg = EvalConfig(**values)
    result = evaluate_checkpoint(cfg)
    if result is None:      # a rank other than 0 of an outer torchrun: rank 0 prints
        return
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        click.echo(f"top-1 {result.top1:.2%}  top-5 {result.top5:.2%}  ({result.images} images"
                   f"{', ten-crop' if cfg.ten_crop else ''})")


def check_eval(cfg: EvalConfig) -> str:
    """What `eval` needs before any worker starts: a shard set with a val split, the devices asked
    for, a readable checkpoint trained on the shard set's classes (model/identity.py). Returns the
    checkpoint file (a run directory resolved to its newest good one, so every rank loads the same
    file)."""
    from alexnet_fast.model import checkpoint as ckpt
    from alexnet_fast.model.identity import eval_mismatch

    shards = open_shards(cfg.data, "val")
    device = check_device(cfg.device, cfg.gpus)
    check_global_batch(cfg.batch_size, world_size(device, cfg.gpus, cfg.nproc))

    def warn(message: str) -> None:     # a damaged last.pt, last.prev.pt used: one plain line, from rank 0
        if is_rank_zero():
            click.echo(f"alexnet-fast eval: warning: {message}", err=True)

    try:    # what the checkpoint is, not its weights (mapped, not read): each rank loads those
        state, path = ckpt.load_checkpoint(cfg.checkpoint, warn, mmap=True)
    except ckpt.CheckpointError as e:
        raise UserError(str(e)) from None
    problem = eval_mismatch(state, shards)      # labels are class indices: the same wnids, in the same order
    if problem:
        raise UserError(f"{problem}: {path} cannot be scored on it")
    return str(path)


def evaluate_checkpoint(cfg: EvalConfig) -> EvalResult | None:
    """Run `cfg` and return the accuracy over the whole val split; None on ranks other than 0 of an
    outer torchrun. A damaged val shard or a failed worker: one line, exit 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from alexnet_fast.model.evaluate import run_evaluation

    cfg = replace(cfg, checkpoint=check_eval(cfg))
    try:
        with run_failures_as_one_line("eval"):
            run = run_evaluation(cfg)
    except SignalException as e:
        raise click.ClickException(f"stopped by signal {e.sigval.name}") from None
    if not is_rank_zero():
        return None
    if run.skipped:
        click.echo(f"alexnet-fast eval: warning: skipped {run.skipped} corrupt val image(s); top-1/top-5 are "
                   f"over the other {run.result.images}", err=True)
    return run.result
