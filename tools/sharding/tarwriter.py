"""One WebDataset shard in memory: the tar bytes and its DALI index, byte-identical for equal input.

Tar members carry fixed metadata (mtime 0, uid/gid 0, empty user/group names, mode 0644,
USTAR format), so the bytes depend only on the samples. What the members hold and the index
format (the text DALI's `wds2idx` writes, v1.2) are `alexnet_fast.pipeline.shard_format`'s.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass

from alexnet_fast.pipeline.shard_format import encode_sample, index_header, index_part, index_text

FIXED_MTIME = 0


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


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, FIXED_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_shard(samples: list[Sample]) -> ShardBytes:
    buf = io.BytesIO()
    rows = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            row = []
            for ext, data in sample.components():
                info = _tarinfo(f"{sample.key}.{ext}", len(data))
                data_offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
                tar.addfile(info, io.BytesIO(data))
                row += index_part(ext, data_offset, len(data), info.name)
            rows.append(row)
    tar_bytes = buf.getvalue()
    index = index_text(index_header(len(samples)), rows)
    return ShardBytes(tar_bytes, index.encode(), hashlib.sha256(tar_bytes).hexdigest(), len(samples))
