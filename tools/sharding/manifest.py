"""manifest.json (schema in alexnet_fast.pipeline.shardset) and the job fingerprint.

The fingerprint hashes everything that determines the output bytes (RAW, the file list, the
options, the conversion recipe `convert.CONVERTER`; not the worker count), so a rerun can tell its
own half-finished work from a different job's.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from alexnet_fast.pipeline.shardset import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME
from alexnet_fast.tools.sharding.convert import CONVERTER
from alexnet_fast.tools.sharding.files import atomic_write_bytes
from alexnet_fast.tools.sharding.layout import Discovery, Rejection


@dataclass(frozen=True)
class ShardRecord:
    tar: str
    index: str
    samples: int
    bytes: int
    sha256: str
    index_sha256: str  # lets a rerun trust a finished .idx without rebuilding it


def job_fingerprint(discovery: Discovery, args: dict) -> str:
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode())
    digest.update(CONVERTER.encode())  # new primitives, new pixels: never resumed into an older run's shards
    digest.update("\n".join(discovery.classes).encode())
    for split, items in (("train", discovery.train), ("val", discovery.val)):
        for item in items:
            digest.update(f"{split}\t{item.source}\t{item.wnid}\t{item.size}\n".encode())
    return digest.hexdigest()


def build_manifest(
    discovery: Discovery,
    args: dict,
    fingerprint: str,
    shards: dict[str, list[ShardRecord]],
    rejected: list[Rejection],
) -> dict:
    splits = {}
    for split, records in shards.items():
        splits[split] = {
            "samples": sum(r.samples for r in records),
            "shards": [{k: v for k, v in asdict(r).items() if k != "index_sha256"} for r in records],
        }
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created_by": {
            "tool": "make_shards",
            "args": args,
            "converter": CONVERTER,
            "layouts": {"train": discovery.train_layout.value, "val": discovery.val_layout.value},
            "val_labels": discovery.val_labels,
            "fingerprint": fingerprint,
        },
        "image": {"size": args["size"], "keep_aspect": args["keep_aspect"], "quality": args["quality"]},
        "classes": discovery.classes,
        "splits": splits,
        "rejected": [r.as_dict() for r in sorted(rejected, key=lambda r: (r.split, r.path))],
        "notes": discovery.notes,
    }


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
