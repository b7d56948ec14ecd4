"""What every command shares: the one-line error types, the device check, and turning a failed
run (a user error in this process, or a rank that failed under the launcher) into one line.

The CLI entry point (tools/cli.py) and every `cmd_*` module import from here; nothing here imports
a command, so there is no cycle between the entry point and its subcommands.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class UserError(click.ClickException):
    """A mistake in what the user asked for (a path, a flag, missing labels): one line, exit 2."""

    exit_code = 2


def check_device(device: str, gpus: int = 0) -> str:
    """A command's --device (auto|cuda|cpu) and --gpus checked against what torch sees; returns the
    device to use, "cuda" or "cpu". Under torchrun --gpus is the launcher's business, not checked."""
    import torch

    from alexnet_fast.model.distributed import resolve_device, under_launcher

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible (use --device cpu)")
    resolved = resolve_device(device)
    if resolved == "cuda" and gpus > torch.cuda.device_count() and not under_launcher():
        raise UserError(f"--gpus {gpus}: only {torch.cuda.device_count()} GPU(s) visible")
    return resolved


def world_size(device: str, gpus: int, nproc: int) -> int:
    """How many ranks a command's run will have: the outer torchrun's, or the ones it launches."""
    from alexnet_fast.model import distributed as D

    return int(os.environ["WORLD_SIZE"]) if D.under_launcher() else D.local_world_size(device, gpus, nproc)


def check_global_batch(batch_size: int, ranks: int) -> None:
    """--batch-size is the GLOBAL batch in every command: it must split evenly over the ranks."""
    if batch_size % ranks:
        raise click.BadParameter(f"{batch_size} is the GLOBAL batch and must divide evenly over {ranks} ranks",
                                 param_hint="--batch-size")


def check_out_dir(path: str, hint: str) -> None:
    """A run/output directory that names an existing file would fail later with a traceback."""
    if Path(path).exists() and not Path(path).is_dir():
        raise click.BadParameter(f"{path!r} is a file, not a directory", param_hint=hint)


def open_shards(data: str, split: str = "train"):
    """The shard set at `data`, which must have `split` samples; a UserError otherwise."""
    from alexnet_fast.pipeline.shardset import ShardSet, ShardSetError

    try:
        shards = ShardSet.open(data)
    except ShardSetError as e:
        raise UserError(str(e)) from None
    if not shards.has_split(split):
        raise UserError(f"shard set {data!r} has no {split} samples" + (" to evaluate" if split == "val" else ""))
    return shards


class RunFailure(click.ClickException):
    """A run that failed once it had started (exit 1): its progress bars (this process's or its
    workers', on the same stderr) may have left a line unfinished, so the error starts a new one."""

    after_progress = True


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


@contextlib.contextmanager
def run_failures_as_one_line(what: str, hint: str = "") -> Iterator[None]:
    """Around a run (`run_training`, `run_evaluation`): every way it can fail for a reason the user
    can act on ends as one line, exit 1 — a user error raised in this process, a rank that failed
    under our launcher (ChildFailedError), or a signal that stopped the launcher."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from alexnet_fast.model.errors import user_errors

    try:
        yield
    except user_errors() as e:
        if is_rank_zero():
            raise RunFailure(str(e)) from None
        sys.exit(1)
    except ChildFailedError as e:
        raise worker_failure(e, what, hint) from None


def worker_failure(error, what: str, hint: str = "") -> RunFailure:
    """One line for the launcher's ChildFailedError. A worker that raised a user error wrote it
    (model.distributed.exit_failed: "rank N: ..."); one killed by a signal (the out-of-memory
    killer's SIGKILL, a scheduler) wrote nothing, so the signal is named here."""
    if not error.failures:
        return RunFailure(f"a {what} worker failed{hint}")
    from alexnet_fast.model.distributed import LOST_CONTACT

    # The cause is a rank killed by a signal, else a rank that failed first-hand (a corrupt sample,
    # a failed write); the others may have failed after it, having lost contact with it
    # (model.distributed.lost_contact): name the cause, not a consequence.
    def first_hand(failure) -> bool:
        return not (isinstance(failure.message, str) and LOST_CONTACT in failure.message)

    killed = {r: f for r, f in error.failures.items() if f.exitcode is not None and f.exitcode < 0}
    causes = {r: f for r, f in error.failures.items() if first_hand(f)}
    rank, failure = min((killed or causes or error.failures).items())
    if failure.exitcode is not None and failure.exitcode < 0:
        name = failure.signal_name()
        cause = f"was killed by {name}" + (" (the out-of-memory killer sends that)" if name == "SIGKILL" else "")
    elif isinstance(failure.message, str) and failure.message.startswith("rank "):   # D.exit_failed's
        return RunFailure(failure.message)
    else:
        cause = f"failed (exit code {failure.exitcode}); its error is printed above"
    return RunFailure(f"the {what} worker of rank {rank} {cause}{hint}")
