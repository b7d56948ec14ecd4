"""What survives a kill: one sidecar per finished shard in OUT/.make_shards/, written after the shard.

Shards are written strictly in order (the main process writes them from an ordered result
stream), so after a kill the finished shards are a prefix of the split. A sidecar records the
shard's record, which input items it consumed and which of those were rejected. A rerun reuses
the longest prefix whose sidecars match the job's fingerprint and whose files still hash to
what the sidecar says, then continues from the next input item: the result is the same bytes
as an uninterrupted run.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from alexnet_fast.tools.sharding.files import TMP_SUFFIX, atomic_write_bytes, sha256_file
from alexnet_fast.tools.sharding.layout import Rejection
from alexnet_fast.tools.sharding.manifest import ShardRecord

STATE_DIR = ".make_shards"


@dataclass(frozen=True)
class FinishedShard:
    record: ShardRecord
    first_item: int  # input items [first_item, end_item) of the split's ordered list
    end_item: int
    rejected: tuple[Rejection, ...]
    moments: tuple[int, ...] | None = None   # statistics moments of its images (plan.Written), if computed


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}"


def save_sidecar(out: Path, fingerprint: str, shard: FinishedShard) -> None:
    state = out / STATE_DIR
    state.mkdir(exist_ok=True)
    body = {
        "fingerprint": fingerprint,
        "record": asdict(shard.record),
        "items": [shard.first_item, shard.end_item],
        "rejected": [r.as_dict() for r in shard.rejected],
        "moments": None if shard.moments is None else list(shard.moments),
    }
    name = Path(shard.record.tar).stem
    atomic_write_bytes(state / f"{name}.json", json.dumps(body).encode())


def _load_sidecar(out: Path, name: str, fingerprint: str) -> FinishedShard | None:
    try:
        body = json.loads((out / STATE_DIR / f"{name}.json").read_text())
        if body["fingerprint"] != fingerprint:
            return None
        record = ShardRecord(**body["record"])
        rejected = tuple(Rejection(**r) for r in body["rejected"])
        first, end = body["items"]
        moments = None if body.get("moments") is None else tuple(int(v) for v in body["moments"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or half-written: the shard is simply redone
    return FinishedShard(record, first, end, rejected, moments)


def _files_match(out: Path, record: ShardRecord) -> bool:
    tar, index = out / record.tar, out / record.index
    try:
        if tar.stat().st_size != record.bytes or not index.is_file():
            return False
    except OSError:
        return False
    return sha256_file(tar) == record.sha256 and sha256_file(index) == record.index_sha256


def reusable_prefix(out: Path, split: str, fingerprint: str) -> list[FinishedShard]:
    """The finished shards of `split` that a rerun can keep, in order, contiguous from shard 0."""
    finished: list[FinishedShard] = []
    next_item = 0
    while True:
        shard = _load_sidecar(out, shard_name(split, len(finished)), fingerprint)
        if shard is None or shard.first_item != next_item or not _files_match(out, shard.record):
            return finished
        finished.append(shard)
        next_item = shard.end_item


def remove_temporaries(out: Path) -> None:
    """Half-written files of killed runs (`*.tmp.<host>.<pid>`, and `*.tmp` of earlier versions):
    never complete, never reused. Called only by the holder of OUT's lock, so no live writer owns
    any of them."""
    leftovers = [path for folder in (out, out / STATE_DIR)
                 for pattern in (f"*{TMP_SUFFIX}", f"*{TMP_SUFFIX}.*") for path in folder.glob(pattern)]
    leftovers += out.glob(f".*{TMP_SUFFIX}-*")  # the stats writer's `.stats.json.tmp-<pid>`
    for path in leftovers:
        path.unlink(missing_ok=True)


def clear_state(out: Path) -> None:
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
