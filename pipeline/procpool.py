"""The one way this project starts a pool of CPU worker processes (make_shards, verify, stats)."""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import signal


def _default_signals() -> None:
    # A forked worker inherits its parent's Python signal handlers. If the parent had replaced
    # SIGTERM's (the trainer's stop flag does, and a host program may), Pool.terminate() could not
    # end the worker and the pool's exit would hang forever. Workers die on SIGTERM as usual.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fork_pool(processes: int) -> multiprocessing.pool.Pool:
    """A fork-started Pool (workers need only what the parent already imported) whose workers have
    the default SIGTERM/SIGINT behaviour."""
    return multiprocessing.get_context("fork").Pool(processes, initializer=_default_signals)
