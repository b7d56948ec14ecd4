"""Small file helpers shared by the shard writer, the manifest and the resume state."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that at every instant `path` is either absent/old or complete.

    A kill -9 mid-write leaves only `path.tmp`, which the next run deletes.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
