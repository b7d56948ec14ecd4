"""The errors a run ends with when the user can act on them: each carries one line for the user.

Commands print them as `alexnet-fast: error: <message>` (exit 1); a rank of a multi-process run ends
with it through `distributed.exit_failed`, so the command prints the same line naming the rank.
"""
from __future__ import annotations


class RunError(Exception):
    """The run cannot go on for a reason the user can act on; the message is one line."""


class TrainingError(RunError):
    """Training cannot go on (a non-finite loss, unusable data, a checkpoint that cannot be written)."""


class EvalError(RunError):
    """The evaluation cannot run (an unusable checkpoint or shard set)."""


def user_errors() -> tuple[type[Exception], ...]:
    """Every exception type that means "tell the user in one line", not "print a traceback":
    the run's own and the data pipeline's (a shard set that cannot be read, a corrupt sample)."""
    from alexnet_fast.pipeline.loader_spec import CorruptSampleError
    from alexnet_fast.pipeline.shardset import ShardSetError

    return (RunError, ShardSetError, CorruptSampleError)
