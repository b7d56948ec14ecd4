"""Helpers of the reliability suite: real processes, real signals, real limits, on tiny data.

Failures here are made the way they happen on a cluster, never by mocks: SIGKILL and SIGTERM sent
to real processes, a file-size limit (RLIMIT_FSIZE) under which the kernel fails writes with EFBIG
as a full disk fails them with ENOSPC, permission bits enforced by the kernel, and files damaged
on disk. Data comes from the project's own generator and make_shards, kept small so the whole
directory stays within about three minutes on a 2-core CPU machine.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAKE_SHARDS = [sys.executable, str(REPO / "tools" / "make_shards")]
ALEXNET_FAST = [sys.executable, "-m", "alexnet_fast.tools.cli"]
KILLPOINT = [sys.executable, str(Path(__file__).with_name("killpoint.py"))]
QUIET = dict(progress=False, log=lambda msg: None)

# Linux capability numbers (<linux/capability.h>) and prctl's PR_CAPBSET_DROP.
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def env(**extra: str) -> dict[str, str]:
    # the same thread count in every run keeps float reductions in the same order
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", **extra}


def limits(file_size: int | None = None, drop_root_file_access: bool = False):
    """A preexec_fn for subprocess: a file-size limit (writes past it fail with EFBIG, like a full
    disk; SIGXFSZ ignored so the write returns the error instead of killing the process), and/or,
    when running as root, dropping the capabilities that let root read files whose permission bits
    say no (so a chmod 000 file is as unreadable to the child as it is to any other user)."""
    def apply() -> None:
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        if drop_root_file_access and os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
                libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)   # best effort: the test probes the outcome
    return apply


def run(cmd: list[str], *, timeout: float = 120, preexec=None, extra_env: dict[str, str] | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**(extra_env or {})),
                          preexec_fn=preexec, **kwargs)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too) by relative path: equal dicts = byte-identical trees."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    """The single line a user mistake may print; fails on a traceback or on more lines."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    return lines[0]


def damage_jpeg(tar: Path, index: Path, row: int = 1) -> str:
    """Overwrite the start of the JPEG of sample `row` of a shard (its index line says where): the
    bytes no longer decode, the tar stays well-formed. Returns the sample's key."""
    fields = index.read_text().splitlines()[1 + row].split()
    offset, key = int(fields[fields.index("jpg") + 1]), fields[3].split(".")[0]
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(b"not a jpeg" * 20)
    return key
