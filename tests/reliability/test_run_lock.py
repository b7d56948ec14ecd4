"""One job per directory (tools/run_lock.py): a second `train` on a run directory that a live run
holds, or a second make_shards on an OUT being written, is refused in one line naming the holder,
and changes nothing there; the first job finishes as if alone. A SIGKILLed holder leaves no stale
lock: `--resume` starts at once. A multi-process run holds one lock (the launching command with
--nproc 2, rank 0's command under an outer torchrun), and its other processes do not trip over it.

Every process is real. To make "while the first one runs" deterministic instead of a race against
a timer, the first job is frozen with SIGSTOP (its whole process group: the launcher and its
workers) while the second one tries, then resumed with SIGCONT; a stopped process still holds its
locks, exactly as a busy one does, and its directory cannot change in the meantime.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults import ALEXNET_FAST, MAKE_SHARDS, QUIET, env, one_error_line, run, tree_bytes

from alexnet_fast.tools.run_lock import LOCK_NAME
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

TRAIN = [*ALEXNET_FAST, "train", "--device", "cpu", "--arch", "alexnet-owt", "--batch-size", "4", "--workers", "1",
         "--seed", "3", "--lr", "0.005", "--log-every", "1"]
SHARD_FLAGS = ["--per-shard", "3", "--no-progress", "--workers", "1"]

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


def _start(cmd: list, logs: Path) -> subprocess.Popen:
    """A job in its own process group (so SIGSTOP/SIGKILL reach its workers too), output to files
    (a frozen job must not be blocked by a full pipe)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        return subprocess.Popen([str(c) for c in cmd], env=env(), stdout=out, stderr=err, start_new_session=True)


def _finish(proc: subprocess.Popen, logs: Path, timeout: float = 300) -> tuple[int, str, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, (logs / "stdout").read_text(), (logs / "stderr").read_text()


def _holder(directory: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """The holder record in `directory`'s lock file, once the job has taken the lock."""
    lock = directory / LOCK_NAME
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the first job ended before it was seen holding its directory"
        with contextlib.suppress(OSError, ValueError):
            return json.loads(lock.read_text())
        time.sleep(0.005)
    raise AssertionError(f"{lock} never named a holder")


@contextlib.contextmanager
def _frozen(proc: subprocess.Popen):
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def _state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` (hidden ones too) with its size and modification time."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _holder_phrase(command: str, pid: int) -> str:
    return f"is in use by {command} (pid {pid} on host {socket.gethostname()}, started "


def test_second_train_on_a_running_run_is_refused_and_the_first_completes(train_set, tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--data", train_set, "--out", run_dir, "--max-steps", "2"]
    first = _start([*TRAIN, *flags], tmp_path / "first")
    try:
        holder = _holder(run_dir, first)
        assert (holder["command"], holder["pid"], holder["host"]) == ("train", first.pid, socket.gethostname())
        with _frozen(first):
            before = _state(run_dir)
            # the same job submitted twice, and a --resume started while the run still lives
            for extra in ([], ["--resume"]):
                second = run([*TRAIN, *map(str, flags), *extra])
                line = one_error_line(second.stderr)
                assert second.returncode == 2 and second.stdout == "", second.stderr
                assert line.startswith(f"alexnet-fast: error: {str(run_dir)!r} {_holder_phrase('train', first.pid)}")
                assert f"kill {first.pid} on {socket.gethostname()}" in line and f"--resume --out {run_dir}" in line
                assert _state(run_dir) == before            # nothing in RUN touched, not even metrics.jsonl
    finally:
        code, out, err = _finish(first, tmp_path / "first")
    assert code == 0, err[-3000:]
    records = _records(run_dir)                             # every line whole: no interleaved writer
    assert [r["step"] for r in records if "val_top1" not in r] == [1, 2]
    assert len([r for r in records if "val_top1" in r]) == 1
    assert out.count("config:") == 1
    assert (run_dir / LOCK_NAME).read_text() == ""          # released: names nobody
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


def test_holder_killed_then_resume_proceeds_at_once(train_set, tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--data", train_set, "--out", run_dir, "--epochs", "50", "--ckpt-every", "1"]
    first = _start([*TRAIN, *flags], tmp_path / "first")
    try:
        deadline = time.monotonic() + 200
        while not (run_dir / "last.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        _finish(first, tmp_path / "first")
    assert first.returncode == -signal.SIGKILL
    # The dead holder's record is still in the file; only the kernel's lock went with it.
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == first.pid
    # what a writer killed in the middle of a checkpoint leaves (a name no live process uses)
    stale = run_dir / "last.pt.tmp.some-host.4194000"
    stale.write_bytes(b"half a checkpoint")

    resumed = run([*TRAIN, *map(str, flags), "--resume", "--max-steps", "2"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'last.pt'}: epoch 0, step 1" in resumed.stdout
    assert not stale.exists()
    assert (run_dir / LOCK_NAME).read_text() == ""


def test_second_make_shards_on_the_same_out_is_refused_and_the_set_is_right(tiny_raw, tmp_path):
    reference = tmp_path / "reference"
    make_shards(tiny_raw.root, reference, ShardOptions(per_shard=3), workers=1, **QUIET)
    out = tmp_path / "out"
    first = _start([*MAKE_SHARDS, tiny_raw.root, out, *SHARD_FLAGS], tmp_path / "first")
    try:
        holder = _holder(out, first)
        assert (holder["command"], holder["pid"]) == ("make_shards", first.pid)
        with _frozen(first):
            before = _state(out)
            second = run([*MAKE_SHARDS, str(tiny_raw.root), str(out), *SHARD_FLAGS])
            line = one_error_line(second.stderr)
            assert second.returncode == 2, second.stderr
            assert line.startswith(f"make_shards: error: OUT {str(out)!r} {_holder_phrase('make_shards', first.pid)}")
            assert _state(out) == before
    finally:
        code, _, err = _finish(first, tmp_path / "first")
    assert code == 0, err[-3000:]
    assert tree_bytes(out) == tree_bytes(reference)         # the set of one run alone (lock file empty in both)


def test_two_process_run_holds_one_lock_and_does_not_trip_over_it(train_set, tmp_path):
    """--nproc 2 (gloo): the launching command holds RUN, its two workers take no lock of their own
    (a worker that tried would be refused by its own launcher's lock and fail the run)."""
    run_dir = tmp_path / "run"
    flags = ["--data", train_set, "--out", run_dir, "--max-steps", "1", "--nproc", "2"]
    first = _start([*TRAIN, *flags], tmp_path / "first")
    try:
        assert _holder(run_dir, first)["pid"] == first.pid      # the launcher, not a rank
        deadline = time.monotonic() + 200
        while not (run_dir / "config.json").exists():           # written by rank 0: the workers are up
            assert first.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.05)
        with _frozen(first):                                    # the launcher and both workers
            second = run([*TRAIN, *map(str, flags)])
            assert second.returncode == 2, second.stderr
            assert _holder_phrase("train", first.pid) in one_error_line(second.stderr)
    finally:
        code, out, err = _finish(first, tmp_path / "first")
    assert code == 0, err[-3000:]
    assert [r["step"] for r in _records(run_dir) if "val_top1" not in r] == [1]
    assert (run_dir / LOCK_NAME).read_text() == ""


def test_under_an_outer_torchrun_only_rank_0_takes_the_lock(train_set, tmp_path):
    """torchrun starts the command once per rank: rank 0's process holds RUN for the run, rank 1's
    takes no lock (if it tried, rank 0's lock would refuse it and fail the run)."""
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "alexnet_fast.tools.cli", *TRAIN[3:]]
    first = _start([*torchrun, "--data", train_set, "--out", run_dir, "--max-steps", "1"], tmp_path / "first")
    try:
        holder = _holder(run_dir, first)
        environ = Path(f"/proc/{holder['pid']}/environ").read_bytes().split(b"\0")
        assert b"RANK=0" in environ and holder["pid"] != first.pid       # rank 0's command, not torchrun
    finally:
        code, _, err = _finish(first, tmp_path / "first")
    assert code == 0, err[-3000:]
    assert [r["step"] for r in _records(run_dir) if "val_top1" not in r] == [1]
    assert (run_dir / LOCK_NAME).read_text() == ""
