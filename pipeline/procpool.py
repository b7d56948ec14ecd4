"""The one way this project starts a pool of CPU worker processes (make_shards, verify, stats)."""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import signal
import sys

PR_SET_PDEATHSIG = 1        # from <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this worker the moment its parent dies.

    A parent killed with SIGKILL (or crashing) cannot tell its pool to stop. Its workers would go
    on with their current chunk, then print a BrokenPipeError traceback each when they try to hand
    the result back, on the terminal the user is looking at. Workers here only compute and return
    values (the parent does every write), so dying at once loses nothing. A no-op off Linux or if
    prctl cannot be reached."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    # The parent may have died between fork() and prctl(): then nothing would ever signal us.
    if os.getppid() != parent_pid:
        os._exit(0)


def _init_worker(parent_pid: int) -> None:
    # A forked worker inherits its parent's Python signal handlers. If the parent had replaced
    # SIGTERM's (the trainer's stop flag does, and a host program may), Pool.terminate() could not
    # end the worker and the pool's exit would hang forever. Workers die on SIGTERM as usual.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _die_with_parent(parent_pid)


def fork_pool(processes: int) -> multiprocessing.pool.Pool:
    """A fork-started Pool (workers need only what the parent already imported) whose workers have
    the default SIGTERM/SIGINT behaviour and, on Linux, die with the parent.

    Create it from the thread that will keep it (the main thread here): the kernel's parent-death
    signal fires when the *thread* that forked the worker exits, not only the process."""
    return multiprocessing.get_context("fork").Pool(processes, initializer=_init_worker, initargs=(os.getpid(),))
