"""fork_pool workers die quietly with their parent (SIGKILL leaves no orphans, no tracebacks)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# A parent that starts a fork_pool, says its workers' pids, then keeps them busy until killed.
PARENT = """
import sys, time
from alexnet_fast.pipeline.procpool import fork_pool
pool = fork_pool(2)
print(" ".join(str(p.pid) for p in pool._pool), flush=True)
for _ in pool.imap(time.sleep, [0.02] * 100000):
    pass
"""


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_workers_of_a_sigkilled_parent_exit_at_once_without_a_traceback():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        time.sleep(0.5)                 # the workers are busy handing results back
        parent.send_signal(signal.SIGKILL)
        # The workers hold the parent's stderr open: reading it to the end waits for all of them.
        _, stderr = parent.communicate(timeout=20)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "a pool worker outlived its killed parent"
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_pool_results_and_worker_signals_are_unchanged():
    """The initializer keeps the workers usable: results in order, SIGTERM back to its default."""
    from alexnet_fast.pipeline.procpool import fork_pool

    previous = signal.signal(signal.SIGTERM, lambda *a: None)   # as the trainer's stop flag does
    try:
        with fork_pool(2) as pool:
            assert pool.map(abs, range(-5, 0)) == [5, 4, 3, 2, 1]
            handlers = pool.map(signal.getsignal, [signal.SIGTERM] * 2)
            assert pool.apply(os.getppid) == os.getpid()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert handlers == [signal.SIG_DFL] * 2


# A stopped pool whose result queue's lock a dead worker still holds: a worker killed while it was
# sending a result. Run in a process of its own, so that a hang fails this test, not the suite.
STUCK = """
import multiprocessing, time
from alexnet_fast.pipeline.procpool import TERMINATE_WAIT_S, fork_pool
pool = fork_pool(2)
assert pool.map(abs, [-1, -2]) == [1, 2]
holder = multiprocessing.get_context("fork").Process(target=pool._outqueue._wlock.acquire)
holder.start(); holder.join()               # took the lock and exited holding it
workers = list(pool._pool)
started = time.monotonic()
pool.terminate()
print(round(time.monotonic() - started, 1), TERMINATE_WAIT_S, sum(w.is_alive() for w in workers), flush=True)
"""


def test_a_pool_stops_even_when_a_dead_worker_holds_its_result_lock():
    """multiprocessing's own terminate waits forever here (its task handler cannot send its last
    message); fork_pool's gives up after TERMINATE_WAIT_S and kills the workers."""
    proc = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    took, wait, alive = proc.stdout.split()
    assert float(took) >= float(wait) - 0.5 and int(alive) == 0, proc.stdout
