"""Small file helpers shared by the shard writer, the manifest and the resume state."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that at every instant `path` is either absent/old or complete.

    A kill -9 mid-write leaves only `path.tmp`, which the next run deletes. A failed write (a full
    disk, a file-size limit) removes `path.tmp` and raises OSError naming `path`.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
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
