"""Shards of the manifest missing a part on disk (the tar, its .idx, the tail of the tar), found
before any reader starts from a few stat calls: no data is read.

Otherwise DALI stops with a C++ assertion about a malformed index and webdataset with a tar error;
this names the shard (and the first lost sample) in one line instead. With on_corrupt="skip" the
loaders get the damage to work around (dali_loader.py / left_out.py) or refuse (baseline.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alexnet_fast.pipeline.loader_spec import CorruptSampleError
from alexnet_fast.pipeline.shard_format import read_index, row_fits, row_key
from alexnet_fast.pipeline.shardset import ShardFile, ShardSet


@dataclass(frozen=True)
class ShardDamage:
    """A shard of the manifest missing a part: its .idx, or the tail of its tar."""
    shard: ShardFile
    index_missing: bool
    tar_size: int                   # bytes on disk (< shard.bytes: cut short)

    @property
    def cut_short(self) -> bool:
        return self.tar_size < self.shard.bytes

    def describe(self) -> str:
        parts = [f"index {self.shard.index.name} of shard {self.shard.tar} is missing"] if self.index_missing else []
        if self.cut_short:
            lost = "" if self.index_missing else f"; samples from key {_first_key_past(self.shard.index, self.tar_size)} on are lost"
            parts.append(f"shard {self.shard.tar} is cut short ({self.tar_size} of {self.shard.bytes} bytes{lost})")
        return " and ".join(parts)


def check_shard_files(shard_set: ShardSet, split: str, on_corrupt: str = "error") -> list[ShardDamage]:
    """Before any reader starts: every shard of `split` has its tar and its index, and no sample
    the index lists lies past the end of its tar (a copy cut short). With on_corrupt="skip",
    returns the damaged shards for the loader to work around (a missing tar still stops it:
    nothing of that shard is left to read); otherwise raises CorruptSampleError naming the first."""
    advice = f"run `alexnet-fast verify {shard_set.root}` and re-make the damaged shards"
    damaged = []
    for shard in shard_set.shards(split):
        if not shard.tar.is_file():
            raise CorruptSampleError(f"shard {shard.tar} is missing: {advice}")
        damage = ShardDamage(shard, not shard.index.is_file(), shard.tar.stat().st_size)
        if damage.index_missing or damage.cut_short:
            if on_corrupt != "skip":
                raise CorruptSampleError(f"{damage.describe()}: {advice} (or pass --on-corrupt skip to go on "
                                         f"without the lost samples)")
            damaged.append(damage)
    return damaged


def _first_key_past(index: Path, size: int) -> str:
    """The key of the first sample of a DALI index with a part ending beyond `size` bytes."""
    _, rows = read_index(index)
    return next((row_key(r) for r in rows if not row_fits(r, size)), "?")
