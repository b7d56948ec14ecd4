"""Small file helpers shared by the shard writer, the manifest and the resume state."""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

TMP_SUFFIX = ".tmp"     # a temp file is `<name>.tmp.<host>.<pid>` (`<name>.tmp` before per-writer names)


def temp_path(path: Path) -> Path:
    """This process's temp file for `path`: named after its writer (host, pid), so two processes
    writing the same OUT (which the OUT lock, tools/run_lock.py, normally prevents) never remove
    or rename each other's temp files."""
    return path.with_name(f"{path.name}{TMP_SUFFIX}.{socket.gethostname()}.{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that at every instant `path` is either absent/old or complete.

    A kill -9 mid-write leaves only the temp file (`temp_path`), which the next run deletes. A
    failed write (a full disk, a file-size limit) removes it and raises OSError naming `path`.
    """
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:  # a write error carries no file name: add it
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
