"""The one way this project starts a pool of CPU worker processes (make_shards, verify, stats)."""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1        # from <linux/prctl.h>
TERMINATE_WAIT_S = 5.0      # a pool's terminate takes well under a second when nothing is stuck


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


class _Pool(multiprocessing.pool.Pool):
    """A Pool whose terminate() (also its `with` exit) always returns.

    Pool.terminate SIGTERMs the workers, then waits for its task-handler thread, which must first
    send a last message on the result queue. A worker ended while it was sending a result (the pool
    stopped by an error or Ctrl-C while results still flowed) dies holding that queue's lock, which
    no one then releases: the wait never ended (seen once in make_shards under the suite's two
    workers, 2026-12-03; tests/test_procpool.py makes it happen on purpose). So the usual terminate
    runs on a helper thread; if it is not done in TERMINATE_WAIT_S, the workers are SIGKILLed and
    the caller goes on, leaving the stuck helper threads (daemons) behind."""

    def terminate(self) -> None:
        ending = threading.Thread(target=super().terminate, name="pool-terminate", daemon=True)
        ending.start()
        ending.join(TERMINATE_WAIT_S)
        if ending.is_alive():
            workers = [worker for worker in list(self._pool) if worker.exitcode is None]
            for worker in workers:
                worker.kill()
            for worker in workers:
                worker.join(TERMINATE_WAIT_S)


def fork_pool(processes: int) -> multiprocessing.pool.Pool:
    """A fork-started Pool (workers need only what the parent already imported) whose workers have
    the default SIGTERM/SIGINT behaviour and, on Linux, die with the parent.

    Create it from the thread that will keep it (the main thread here): the kernel's parent-death
    signal fires when the *thread* that forked the worker exits, not only the process."""
    return _Pool(processes, initializer=_init_worker, initargs=(os.getpid(),),
                 context=multiprocessing.get_context("fork"))
