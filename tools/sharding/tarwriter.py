"""One WebDataset shard in memory: the tar bytes and its DALI index, byte-identical for equal input.

Tar members carry fixed metadata (mtime 0, uid/gid 0, empty user/group names, mode 0644,
USTAR format), so the bytes depend only on the samples. The 512-byte headers are formed here
(`_ustar_header`) rather than by `tarfile`, whose per-member Python costs about as much CPU as
encoding the JPEG; they are the bytes `tarfile` (CPython 3.11) writes for the same members, which
tests/test_make_shards_determinism.py checks, and no longer depend on the Python version. What the
members hold and the index
format (the text DALI's `wds2idx` writes, v1.2) are `alexnet_fast.pipeline.shard_format`'s.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from alexnet_fast.pipeline.shard_format import encode_sample, index_header, index_part, index_text

FIXED_MTIME = 0
BLOCK = 512
RECORD = 20 * BLOCK      # tar's blocking factor: the archive is padded to a whole record
_MODE, _ID, _EMPTY8 = b"0000644\0", b"0000000\0", b"\0" * 8


@dataclass(frozen=True)
class Sample:
    key: int  # decimal sample number: unique in the split, no dots (WebDataset groups by it)
    label: int
    wnid: str
    source: str
    jpeg: bytes
    w: int
    h: int
    orig_w: int
    orig_h: int

    def components(self) -> list[tuple[str, bytes]]:
        meta = {"wnid": self.wnid, "source": self.source, "w": self.w, "h": self.h,
                "orig_w": self.orig_w, "orig_h": self.orig_h}
        return encode_sample(self.jpeg, self.label, meta)


@dataclass(frozen=True)
class ShardBytes:
    tar: bytes
    index: bytes
    sha256: str
    samples: int


def _ustar_header(name: str, size: int) -> bytes:
    """A regular file's USTAR header with this module's fixed metadata (mode 0644, uid/gid 0, mtime 0,
    empty uname/gname, no device numbers)."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    header = bytearray(b"".join([
        encoded.ljust(100, b"\0"), _MODE, _ID, _ID, b"%011o\0" % size, b"%011o\0" % FIXED_MTIME,
        b"        ", b"0", b"\0" * 100, b"ustar\x0000", b"\0" * 64, _EMPTY8, _EMPTY8, b"\0" * 155,
    ]).ljust(BLOCK, b"\0"))
    header[148:155] = b"%06o\0" % sum(header)      # checksum over the header with its field as spaces
    return bytes(header)


def build_shard(samples: list[Sample]) -> ShardBytes:
    parts: list[bytes] = []
    offset = 0
    rows = []
    for sample in samples:
        row = []
        for ext, data in sample.components():
            name = f"{sample.key}.{ext}"
            parts.append(_ustar_header(name, len(data)))
            row += index_part(ext, offset + BLOCK, len(data), name)
            parts.append(data)
            padding = -len(data) % BLOCK
            if padding:
                parts.append(b"\0" * padding)
            offset += BLOCK + len(data) + padding
        rows.append(row)
    end = offset + 2 * BLOCK
    parts.append(b"\0" * (2 * BLOCK + (-end % RECORD)))
    tar_bytes = b"".join(parts)
    index = index_text(index_header(len(samples)), rows)
    return ShardBytes(tar_bytes, index.encode(), hashlib.sha256(tar_bytes).hexdigest(), len(samples))
