"""One WebDataset shard in memory: the tar bytes and its DALI index, byte-identical for equal input.

Tar members carry fixed metadata (mtime 0, uid/gid 0, empty user/group names, mode 0644,
USTAR format), so the bytes depend only on the samples. The index is the text DALI's `wds2idx`
(v1.2) writes: a header `v1.2 <samples>` and per sample one line of
`<ext> <data offset> <size> <member name>` for each of its files, in tar order.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass

DALI_INDEX_VERSION = "v1.2"
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
        # jpg_sha256: lets `verify` name the sample whose JPEG bytes changed even when they still decode
        meta = {"wnid": self.wnid, "source": self.source, "w": self.w, "h": self.h,
                "orig_w": self.orig_w, "orig_h": self.orig_h, "jpg_sha256": hashlib.sha256(self.jpeg).hexdigest()}
        return [
            ("jpg", self.jpeg),
            ("cls", str(self.label).encode()),
            ("lbl", struct.pack("<i", self.label)),
            ("json", json.dumps(meta, sort_keys=True).encode()),
        ]


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
    lines = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            parts = []
            for ext, data in sample.components():
                info = _tarinfo(f"{sample.key}.{ext}", len(data))
                data_offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
                tar.addfile(info, io.BytesIO(data))
                parts.append(f"{ext} {data_offset} {len(data)} {info.name}")
            lines.append(" ".join(parts))
    tar_bytes = buf.getvalue()
    index = f"{DALI_INDEX_VERSION} {len(samples)}\n" + "".join(line + "\n" for line in lines)
    return ShardBytes(tar_bytes, index.encode(), hashlib.sha256(tar_bytes).hexdigest(), len(samples))
