"""Is a shard still the one make_shards wrote? Checked before training with `train --verify-shards`.

A JPEG whose bytes changed but that still decodes (a flipped bit on a disk or in a copy) reaches
the model as wrong pixels: neither loader can notice, since hashing every sample on the hot path
would put per-sample Python there. This check reads each shard once: the tar's sha256 against the
manifest, and only for a tar that differs, each sample's `.jpg` against the `jpg_sha256` its
`.json` carries and its `.lbl` against its `.cls`, which names the samples that changed.
`alexnet-fast verify` does all of this and more (decodes every JPEG, checks the .idx); this is the
part the trainer needs, at the speed of reading the shards. Shards are spread over threads, not
processes: hashlib releases the GIL while it hashes a chunk, and the trainer calls this after CUDA
and NCCL started threads of their own, where forking is best avoided.
"""
from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool

from alexnet_fast.pipeline.shard_format import SAMPLE_PARTS, sample_intact
from alexnet_fast.pipeline.shardset import ShardFile

CHUNK = 1 << 20


@dataclass(frozen=True)
class ShardCheck:
    shard: ShardFile
    matches: bool                   # the tar's sha256 is the manifest's
    changed: tuple[str, ...] = ()   # keys of the samples whose .jpg or label changed

    def describe(self) -> str:
        if self.changed:
            keys = ", ".join(self.changed[:5]) + (f" and {len(self.changed) - 5} more" if len(self.changed) > 5 else "")
            return (f"shard {self.shard.tar}: sample(s) {keys} changed since make_shards wrote them "
                    f"(.jpg no longer matches the jpg_sha256 in its .json, or .lbl and .cls disagree)")
        return f"shard {self.shard.tar}: sha256 differs from the manifest, but every sample's image and label check out"


def check_shard(shard: ShardFile) -> ShardCheck:
    digest = hashlib.sha256()
    with open(shard.tar, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() == shard.sha256:
        return ShardCheck(shard, True)
    return ShardCheck(shard, False, tuple(_changed_keys(shard)))


def _changed_keys(shard: ShardFile) -> list[str]:
    parts: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(shard.tar, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    if ext in SAMPLE_PARTS:
                        parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError):
        pass        # a tar cut short: the loader's size check names it; judge what was read
    return [key for key, sample in parts.items() if not sample_intact(sample)]


def check_shards(shards: list[ShardFile], workers: int = 1) -> list[ShardCheck]:
    """check_shard over `shards` (in their order), `workers` threads at a time."""
    if workers <= 1 or len(shards) <= 1:
        return [check_shard(s) for s in shards]
    with ThreadPool(min(workers, len(shards))) as pool:
        return pool.map(check_shard, shards)
