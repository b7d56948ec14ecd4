"""The samples a DALI loader leaves out, and how: each points at an intact sample of its tar in a
patched copy of the .idx (index_patches.py), and its rows are dropped from the batches by name.

Three ways in, all with the same outcome (the sample count, rank ranges and shuffles stay what the
manifest says; the sample is listed in `loader.skipped` when its row is dropped):
- a corrupt JPEG found while reading (`on_corrupt="skip"`, corrupt_samples.py finds it);
- a damaged shard (`on_corrupt="skip"`, shard_damage.py finds it): a missing .idx is rebuilt from
  the tar's headers; the samples of a tar cut short, and placeholders for those a rebuilt index
  cannot list, are left out;
- `exclude(names)`: the samples `train --verify-shards` found changed since make_shards.
"""
from __future__ import annotations

from pathlib import Path

from alexnet_fast.pipeline.epoch_plan import EpochPlan
from alexnet_fast.pipeline.index_patches import IndexPatches, index_from_tar
from alexnet_fast.pipeline.loader_spec import CorruptSampleError
from alexnet_fast.pipeline.shard_damage import ShardDamage
from alexnet_fast.pipeline.shard_format import Row, index_header, read_index, row_fits, row_key
from alexnet_fast.pipeline.shardset import ShardFile


class LeftOutSamples:
    """The left-out samples of one loader's split: their names, their rows, their patched indices."""

    def __init__(self, shards: list[ShardFile]) -> None:
        self._shards = shards                       # the split's shards, in manifest order
        self._patches = IndexPatches()              # index copies that point left-out samples at a donor
        self._names: set[str] = set()               # "<tar>:<key>" whose rows are dropped
        self._rows: dict[str, set[int]] = {}        # tar path -> positions of those samples in it

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __bool__(self) -> bool:
        return bool(self._names)

    def index_of(self, shard: ShardFile) -> Path:
        """The index the reader should use for `shard`: the patched copy if there is one."""
        return self._patches.index_of(shard.tar, shard.index)

    def exclude(self, names: list[str]) -> None:
        """Leave these samples ("<tar>:<key>") out from now on (those already left out stay as they are)."""
        by_tar: dict[str, set[str]] = {}
        for name in (n for n in names if n not in self._names):
            tar, key = name.rsplit(":", 1)
            by_tar.setdefault(tar, set()).add(key)
        for shard in self._shards:
            keys = by_tar.get(str(shard.tar))
            if keys:
                header, rows = self._patches.rows(shard.tar, shard.index)
                try:
                    self._leave_out(shard, header, rows, keys)
                except LookupError:
                    raise CorruptSampleError(f"every sample of shard {shard.tar} is damaged or corrupt: "
                                             f"re-make that shard") from None

    def work_around(self, damage: ShardDamage) -> str:
        """A shard missing its .idx or its tail: rebuild the index from the tar, leave the lost
        samples out. Returns the note for `loader.notes`."""
        shard = damage.shard
        if damage.index_missing:
            rows = index_from_tar(shard.tar)
            if len(rows) > shard.samples or (len(rows) < shard.samples and not damage.cut_short):
                raise CorruptSampleError(f"shard {shard.tar} holds {len(rows)} samples, the manifest says "
                                         f"{shard.samples}: re-make that shard")
            template = rows[0] if rows else ["jpg", "0", "0", "x.jpg"]
            placeholders = [f"lost{n}" for n in range(shard.samples - len(rows))]   # keep the sample count
            rows += [[f for i in range(0, len(template), 4) for f in (template[i], "0", "0", f"{key}.{template[i]}")]
                     for key in placeholders]
            header = index_header(shard.samples)
        else:
            header, rows = read_index(shard.index)
            placeholders = []
        lost = {row_key(r) for r in rows if not row_fits(r, damage.tar_size)} | set(placeholders)
        try:        # (no lost sample: only the index was missing, the rebuilt one is written as it is)
            self._leave_out(shard, header, rows, lost)
        except LookupError:
            raise CorruptSampleError(f"{damage.describe()}, with no intact sample left: re-make that shard") from None
        what = "rebuilt from the tar" if damage.index_missing else ""
        return f"{damage.describe()}: " + ", ".join(filter(None, [
            what, f"{len(lost)} lost sample(s) skipped" if lost else ""]))

    def in_range(self, plan: EpochPlan) -> int:
        """How many left-out samples fall into the plan's range of its (val: manifest-order) shards."""
        count, offset = 0, 0
        for shard in plan.shards:
            rows = self._rows.get(str(shard.tar), ())
            count += sum(plan.start <= offset + i < plan.stop for i in rows)
            offset += shard.samples
        return count

    def _leave_out(self, shard: ShardFile, header: str, rows: list[Row], keys: set[str]) -> None:
        self._patches.redirect(shard.tar, header, rows, keys)
        self._names |= {f"{shard.tar}:{key}" for key in keys}
        self._rows.setdefault(str(shard.tar), set()).update(i for i, r in enumerate(rows) if row_key(r) in keys)
