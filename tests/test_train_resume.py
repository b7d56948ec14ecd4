"""Real `alexnet-fast train` processes on the shard_set fixture, killed and resumed.

- (SIGKILL mid-epoch and elsewhere, then --resume, equal to an uninterrupted run:
  tests/reliability/test_resume_is_the_same_run.py.)
- SIGTERM to a 2-process (self-launched, gloo) run: a checkpoint is written and it exits 0 within
  seconds.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TRAIN = [sys.executable, "-m", "alexnet_fast.tools.cli", "train"]
SMALL = ["--device", "cpu", "--arch", "alexnet-owt", "--batch-size", "4", "--workers", "1", "--seed", "3",
         "--log-every", "1", "--lr", "0.005"]

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


def _env() -> dict:
    # the same thread count in every run keeps float reductions in the same order
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def _start_two_process_run(shard_set: Path, run: Path, *extra: str) -> subprocess.Popen:
    """A self-launched 2-process (gloo) run of 3 epochs of 8 steps, one thread per rank, output piped."""
    return subprocess.Popen([*TRAIN, "--data", str(shard_set), *SMALL, "--nproc", "2", "--batch-size", "8",
                             "--epochs", "3", "--out", str(run), *extra],
                            env={**_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_writes_a_checkpoint_and_exits_zero(shard_set, tmp_path, wait_for_step):
    """With a GPU run's stop-check interval (10 steps) in epochs of 8: the request is agreed at the
    end of the epoch it came in at the latest (each epoch's end is checked), not 1-2 epochs later."""
    run = tmp_path / "run"
    proc = _start_two_process_run(shard_set, run, "--stop-check-every", "10")
    try:
        wait_for_step(run, 7, [proc], timeout=180)      # near the epoch's end: a stop within a step
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:    # how many seconds a stop takes is benchmarks/stop_latency.py's; this tells a hang
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {time.monotonic() - signalled:.0f} s after SIGTERM: a hang, not a stop")
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"SIGTERM to exit: {time.monotonic() - signalled:.1f} s")
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out
    assert "Traceback" not in err
    saved = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    # stopped inside epoch 0 (no check due in it: at its end, the checkpoint then starts epoch 1)
    # or, signalled late, at the end of epoch 1 (a check at step 10 posts it, epoch 1's end reads it)
    assert saved["step"] in (8, 16) and saved["epoch"] == saved["step"] // 8 and len(saved["rng"]) == 2


def _spawned_workers(parent: int) -> list[int]:
    """PIDs of the launcher's worker processes (multiprocessing spawn children of `parent`)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().split(") ", 1)[1].split()[1] == str(parent) \
                    and b"spawn_main" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return sorted(found)


def test_one_rank_killed_ends_the_run_in_one_line_naming_it(shard_set, tmp_path, wait_for_step):
    """The out-of-memory killer takes one rank of a 2-process run: the launcher stops the other, and
    the command says which rank died of what, and how to continue -- in one line, exit 1."""
    run = tmp_path / "run"
    proc = _start_two_process_run(shard_set, run)
    try:
        wait_for_step(run, 1, [proc], timeout=120)
        workers = _spawned_workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1] if "resource_tracker" not in err.strip().splitlines()[-1] else \
        next(line for line in err.splitlines() if line.startswith("alexnet-fast: error:"))
    assert last.startswith("alexnet-fast: error: the training worker of rank ")
    assert "was killed by SIGKILL" in last and f"--resume --out {run}" in last
