"""What one shard holds, written once: the parts of a sample, how they are encoded, the per-sample
integrity check, and the DALI index (.idx) that lists where each part lies in the tar.

Written by `tools/sharding/tarwriter.py`; checked by `tools/sharding/verify.py` (every detail) and
`integrity.py` (`train --verify-shards`); indices rebuilt and patched by `index_patches.py`.

A sample keyed `<key>` is four tar members, in this order (README "Shard format"):
    <key>.jpg    baseline RGB JPEG
    <key>.cls    class index, ASCII decimal (what webdataset/timm readers expect)
    <key>.lbl    the same index as int32 little-endian (DALI hands it to the device without Python)
    <key>.json   metadata, with `jpg_sha256`: the hash of the .jpg bytes, so a JPEG whose bytes
                 changed but still decode is traced to its sample

The DALI index is the text DALI's `wds2idx` writes (version v1.2): a header `v1.2 <samples>`, then
one line per sample, for each of its members in tar order `<ext> <data offset> <size> <name>`.
"""
from __future__ import annotations

import hashlib
import json
import struct
import tarfile
from pathlib import Path
from typing import Iterable

SAMPLE_PARTS = ("jpg", "cls", "lbl", "json")    # tar member extensions of one sample, in tar order
DALI_INDEX_VERSION = "v1.2"

Row = list[str]          # one index line, split: ext offset size name, ext offset size name, ...


# --------------------------------------------------------------------------------------------
# Sample parts and their integrity
# --------------------------------------------------------------------------------------------
def jpg_sha256(jpeg: bytes) -> str:
    return hashlib.sha256(jpeg).hexdigest()


def encode_sample(jpeg: bytes, label: int, meta: dict) -> list[tuple[str, bytes]]:
    """(ext, bytes) of each part of a sample, in SAMPLE_PARTS order; the .json is `meta` plus the
    JPEG's jpg_sha256, keys sorted (so equal input gives equal bytes)."""
    meta = {**meta, "jpg_sha256": jpg_sha256(jpeg)}
    return [
        ("jpg", jpeg),
        ("cls", str(label).encode()),
        ("lbl", struct.pack("<i", label)),
        ("json", json.dumps(meta, sort_keys=True).encode()),
    ]


def sample_labels(parts: dict[str, bytes]) -> tuple[int, bool]:
    """(the .cls label, whether the .lbl holds the same). Raises KeyError for a missing part,
    ValueError or struct.error for one that does not parse."""
    label = int(parts["cls"])
    return label, struct.unpack("<i", parts["lbl"])[0] == label


def recorded_jpg_sha256(parts: dict[str, bytes]):
    """The jpg_sha256 the sample's .json carries, None where it records none (not a JSON object,
    or no such key). Raises KeyError without a .json, ValueError when it does not parse."""
    meta = json.loads(parts["json"])
    return meta.get("jpg_sha256") if isinstance(meta, dict) else None


def sample_intact(parts: dict[str, bytes]) -> bool:
    """Whether a sample is as make_shards wrote it: .lbl and .cls agree and the .jpg bytes match the
    jpg_sha256 in its .json. Strict: a part missing, unreadable or without the hash counts as
    changed. (`verify` reports the same checks one by one, see there.)"""
    try:
        _, labels_agree = sample_labels(parts)
        digest = recorded_jpg_sha256(parts)
        return labels_agree and digest is not None and jpg_sha256(parts["jpg"]) == digest
    except (KeyError, ValueError, TypeError, struct.error):
        return False


# --------------------------------------------------------------------------------------------
# The DALI index
# --------------------------------------------------------------------------------------------
def index_part(ext: str, offset: int, size: int, name: str) -> Row:
    """The fields one tar member adds to its sample's index row."""
    return [ext, str(offset), str(size), name]


def row_key(row: Row) -> str:
    """The sample key of an index row (member names are `<key>.<ext>`)."""
    return row[3].split(".", 1)[0]


def row_fits(row: Row, size: int) -> bool:
    """Whether every part of the sample lies within the first `size` bytes of the tar."""
    return all(int(row[i + 1]) + int(row[i + 2]) <= size for i in range(0, len(row), 4))


def rows_from_members(members: Iterable[tarfile.TarInfo]) -> list[Row]:
    """Index rows from a tar's file members in tar order (what wds2idx does): consecutive members
    with the same key are one sample. Only headers are used: offsets and sizes, no data."""
    rows: list[Row] = []
    for member in members:
        key, _, ext = member.name.partition(".")
        part = index_part(ext, member.offset_data, member.size, member.name)
        if rows and row_key(rows[-1]) == key:
            rows[-1] += part
        else:
            rows.append(part)
    return rows


def index_header(samples: int) -> str:
    return f"{DALI_INDEX_VERSION} {samples}"


def index_text(header: str, rows: list[Row]) -> str:
    """The .idx file's text: the header line, then one line per row."""
    return "\n".join([header] + [" ".join(row) for row in rows]) + "\n"


def read_index(path: Path) -> tuple[str, list[Row]]:
    """(header line, rows) of a DALI index file."""
    header, *lines = Path(path).read_text().splitlines()
    return header, [line.split() for line in lines if line.strip()]
