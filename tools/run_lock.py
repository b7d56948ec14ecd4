"""One writer per directory: `train` holds its run directory, `make_shards` its OUT, for the whole
job, so a second job started on the same directory (a double-submitted batch job, a requeue while
the old job still runs, a second terminal) is refused before it touches anything there.

The lock is a POSIX record lock (fcntl F_SETLK, Python's fcntl.lockf) on DIR/.alexnet-fast.lock:

* the kernel drops it when the holder exits in any way, SIGKILL and the out-of-memory killer
  included, so a crashed job never leaves a stale lock and `--resume` can start at once;
* it is the lock POSIX defines and shared file systems carry between nodes: NFS (v4 in the
  protocol, v3 through lockd), Lustre and GPFS. BSD flock() is not used: NFS clients other than
  Linux >= 2.6.12 keep it local to one node. On Lustre both kinds are cluster-wide only when the
  client mounts with `-o flock` (the default in recent releases); `-o localflock` makes them
  node-local, so two jobs on two nodes would not see each other's lock there. A file system
  that refuses locks outright (ENOLCK, ENOSYS, EOPNOTSUPP: Lustre with `-o noflock`, NFS without
  a lock service) gets a warning and the job runs unguarded. When a whole client node dies
  (rather than the process), the server frees its locks when the client's lease runs out (NFSv4:
  90 s by default), not at once.

The holder writes who it is (command, host, pid, start time) into the lock file, so the refusal
names it; on release it empties the file, so a free lock names nobody. The file itself stays: a
lock file removed while another process has it open would let two processes lock two different
files of the same name.

POSIX locks belong to a process, and closing ANY descriptor of the file in that process drops
them: the holder must not open the lock file anywhere else (nothing in this project does). They
are not inherited by child processes: the command process holds the lock for the workers it
launches, and under an outer torchrun only rank 0's process takes it.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

LOCK_NAME = ".alexnet-fast.lock"
# errnos of a file system that cannot lock at all (as opposed to "someone else holds it")
_NO_LOCKING = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}
_HELD = {errno.EACCES, errno.EAGAIN}
_HOLDER_WAIT_S = 1.0   # a new holder writes its name right after locking: wait this long to read it


class LockError(Exception):
    """The directory cannot be locked for this job (`reason`: the system's word, e.g. "Permission
    denied"); the message is one line for the user."""

    def __init__(self, directory: Path, reason: str):
        self.directory, self.reason = directory, reason
        super().__init__(f"cannot lock {str(directory)!r}: {reason}")


class DirectoryInUse(LockError):
    """Another live process holds the directory."""

    def __init__(self, directory: Path, holder: "Holder | None"):
        self.directory, self.holder = directory, holder
        who = holder.describe() if holder else "another process (it has not written its name yet)"
        Exception.__init__(self, f"{str(directory)!r} is in use by {who}")
        self.reason = "in use"


@dataclass(frozen=True)
class Holder:
    command: str
    host: str
    pid: int
    started: str      # local time with its UTC offset, to the second

    @classmethod
    def this_process(cls, command: str) -> "Holder":
        return cls(command, socket.gethostname(), os.getpid(),
                   datetime.datetime.now().astimezone().isoformat(timespec="seconds"))

    def describe(self) -> str:
        return f"{self.command} (pid {self.pid} on host {self.host}, started {self.started})"


@contextlib.contextmanager
def hold_directory(directory: str | Path, command: str,
                   warn: Callable[[str], None] = lambda message: None) -> Iterator[Holder | None]:
    """Hold `directory` (created if missing) exclusively for the body of the `with`; yields this
    process's Holder, or None on a file system without locks (after `warn`). Raises
    DirectoryInUse while another process holds it, LockError when the lock file cannot be
    opened (an unwritable directory); in both cases nothing in `directory` has changed."""
    directory = Path(directory)
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise LockError(directory, e.strerror or str(e)) from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _HELD:
                raise DirectoryInUse(directory, _read_holder(fd)) from None
            if e.errno not in _NO_LOCKING:
                raise LockError(directory, e.strerror or str(e)) from None
            warn(f"the file system of {str(directory)!r} does not support locks ({e.strerror}): running without "
                 "the guard against a second job writing there at the same time")
            yield None
            return
        holder = Holder.this_process(command)
        _write(fd, (json.dumps(asdict(holder)) + "\n").encode())
        try:
            yield holder
        finally:
            with contextlib.suppress(OSError):     # must not hide the body's own error
                _write(fd, b"")    # a free lock names nobody; the close below releases the lock
    finally:
        os.close(fd)


def _write(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    if data:
        os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(fd: int) -> Holder | None:
    """The holder's record; None if it has not written one within _HOLDER_WAIT_S (it locks first,
    then writes) or the file holds something else."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while True:
        raw = os.pread(fd, 4096, 0)
        if raw.strip():
            try:
                return Holder(**json.loads(raw))
            except (ValueError, TypeError):
                return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
