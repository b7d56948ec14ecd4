"""The shard plan that every executor follows: which input items are left to convert, where the
shard cuts fall, how a planned shard becomes files, and the in-order record of finished shards.

The driver (driver.py) builds one `ShardPlan`; an executor (local_executor.py: a process pool on
this machine; ray_executor.py: Ray tasks on a cluster) converts the items and writes the shards.
What decides the bytes lives here, once, so both executors produce the same files:

* `convert_item` is the one conversion (a `Converted`, or the rejection reason as a str);
* `ShardPlan.cut` turns the ordered outcomes into `PlannedShard`s of exactly `per_shard` accepted
  samples (keys, labels, rejections) — it needs to know only whether each item was accepted, not
  its bytes, so an executor may keep the converted images wherever they were made;
* `write_shard` builds the tar + index and renames them into place under this process's temp
  names (files.temp_path), on whichever machine runs it;
* `ShardPlan.finish` records a written shard in the resume sidecar, strictly in shard order, so
  finished shards always form a prefix (resume.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol

from alexnet_fast.pipeline.stats import sum_moments
from alexnet_fast.tools.sharding import resume
from alexnet_fast.tools.sharding.convert import Converted, ImageOptions, convert_image, read_item
from alexnet_fast.tools.sharding.errors import RejectedImage
from alexnet_fast.tools.sharding.files import atomic_write_bytes
from alexnet_fast.tools.sharding.layout import RawItem, Rejection
from alexnet_fast.tools.sharding.manifest import ShardRecord
from alexnet_fast.tools.sharding.tarwriter import Sample, build_shard


def convert_item(item: RawItem, opts: ImageOptions, moments: bool = False) -> Converted | str:
    """One input item: its stored image (with its statistics moments if `moments`: see
    ShardPlan.moments_for), or the reason it is rejected (the same text on any machine)."""
    try:
        return convert_image(read_item(item), opts, moments=moments)
    except RejectedImage as e:
        return str(e)


class Task(NamedTuple):
    split: str
    index: int  # position in the split's ordered input list
    item: RawItem


class Outcome(NamedTuple):
    """What the cutter needs of one converted item: rejected (`reason`) or not, and where the
    executor keeps its image (`handle`: the Converted itself, or a reference into a remote block)."""
    task: Task
    reason: str | None
    handle: object


@dataclass(frozen=True)
class Entry:
    """One accepted sample of a planned shard; its image is wherever `handle` says."""
    key: int
    label: int
    wnid: str
    source: str
    handle: object


@dataclass(frozen=True)
class PlannedShard:
    split: str
    number: int
    first_item: int  # input items [first_item, end_item) of the split's ordered list
    end_item: int
    entries: tuple[Entry, ...]
    rejected: tuple[Rejection, ...]

    @property
    def name(self) -> str:
        return resume.shard_name(self.split, self.number)

class Written(NamedTuple):
    """A shard written: its manifest record, and the sum of its images' statistics moments (None
    when the conversion did not compute them)."""
    record: ShardRecord
    moments: tuple[int, ...] | None


def write_shard(out: Path, shard: PlannedShard, image_of: Callable[[object], Converted]) -> Written:
    """`name`.idx then `name`.tar in OUT, each complete or absent (temp file of this process, then
    rename). Runs in the driver (local executor) or in a Ray worker on any node."""
    images = [image_of(e.handle) for e in shard.entries]
    samples = [Sample(e.key, e.label, e.wnid, e.source, c.jpeg, c.w, c.h, c.orig_w, c.orig_h)
               for e, c in zip(shard.entries, images)]
    built = build_shard(samples)
    atomic_write_bytes(out / f"{shard.name}.idx", built.index)
    atomic_write_bytes(out / f"{shard.name}.tar", built.tar)
    record = ShardRecord(f"{shard.name}.tar", f"{shard.name}.idx", built.samples, len(built.tar), built.sha256,
                         hashlib.sha256(built.index).hexdigest())
    computed = images and all(c.moments is not None for c in images)
    return Written(record, tuple(sum_moments(c.moments for c in images)) if computed else None)


class _SplitCutter:
    """Cuts one split's ordered outcomes into shards of `per_shard` accepted samples."""

    def __init__(self, split: str, per_shard: int, classes: dict[str, int], finished: list[resume.FinishedShard]):
        self.split, self.per_shard, self.label_of = split, per_shard, classes
        self.number = len(finished)
        self.first_item = finished[-1].end_item if finished else 0
        self.next_key = sum(s.record.samples for s in finished)
        self.pending: list[Entry] = []
        self.pending_rejected: list[Rejection] = []

    def add(self, outcome: Outcome) -> PlannedShard | None:
        item = outcome.task.item
        if outcome.reason is not None:
            self.pending_rejected.append(Rejection(item.source, self.split, outcome.reason))
        else:
            self.pending.append(Entry(self.next_key, self.label_of[item.wnid], item.wnid, item.source, outcome.handle))
            self.next_key += 1
        return self.cut(outcome.task.index + 1) if len(self.pending) == self.per_shard else None

    def cut(self, end_item: int) -> PlannedShard | None:
        if not self.pending:
            return None  # trailing rejections without samples: reported in `rejected`, not a shard
        shard = PlannedShard(self.split, self.number, self.first_item, end_item, tuple(self.pending),
                             tuple(self.pending_rejected))
        self.number += 1
        self.pending, self.pending_rejected, self.first_item = [], [], end_item
        return shard


class ShardPlan:
    """One job's remaining work and its finished shards (reused ones first)."""

    def __init__(self, out: Path, image: ImageOptions, per_shard: int, fingerprint: str, classes: dict[str, int],
                 ordered: dict[str, list[RawItem]], finished: dict[str, list[resume.FinishedShard]],
                 stats_in_pass: bool = False):
        self.out, self.image, self.per_shard, self.fingerprint = out, image, per_shard, fingerprint
        self.stats_in_pass = stats_in_pass
        self.classes, self.ordered = classes, ordered
        self.finished = {split: list(done) for split, done in finished.items()}
        self.reused = sum(len(done) for done in self.finished.values())
        start = {split: done[-1].end_item if done else 0 for split, done in self.finished.items()}
        self.todo = [Task(split, i, item) for split, items in ordered.items()
                     for i, item in enumerate(items) if i >= start[split]]
        self._trailing_rejected: list[Rejection] = []

    def cut(self, outcomes: Iterable[Outcome]) -> Iterator[PlannedShard]:
        """The planned shards, in order, from the outcomes of `todo` in order; a split's last
        (short) shard comes when its outcomes end. The same cuts whichever executor made the outcomes."""
        cutters = {split: _SplitCutter(split, self.per_shard, self.classes, self.finished[split])
                   for split in self.ordered}
        open_splits = list(self.ordered)  # in order; `todo` lists the splits in this order too

        def close_until(split: str | None) -> Iterator[PlannedShard]:
            while open_splits and open_splits[0] != split:
                cutter = cutters[open_splits.pop(0)]
                shard = cutter.cut(len(self.ordered[cutter.split]))
                self._trailing_rejected += cutter.pending_rejected
                if shard is not None:
                    yield shard

        for outcome in outcomes:
            yield from close_until(outcome.task.split)
            shard = cutters[outcome.task.split].add(outcome)
            if shard is not None:
                yield shard
        yield from close_until(None)

    def moments_for(self, task: Task) -> bool:
        """Whether the conversion of `task` also computes its statistics moments: train images, when
        stats.json comes from the conversion pass (every train image; a sample is read from the shards)."""
        return self.stats_in_pass and task.split == "train"

    def finish(self, shard: PlannedShard, written: Written) -> None:
        """Record a written shard; called in shard order (the sidecar goes after the files: a
        sidecar means the shard is complete)."""
        done = resume.FinishedShard(written.record, shard.first_item, shard.end_item, shard.rejected,
                                    written.moments)
        resume.save_sidecar(self.out, self.fingerprint, done)
        self.finished[shard.split].append(done)

    def records(self, split: str) -> list[ShardRecord]:
        return [s.record for s in self.finished[split]]

    def rejected(self) -> list[Rejection]:
        return [r for done in self.finished.values() for s in done for r in s.rejected] + self._trailing_rejected


class Executor(Protocol):
    """Converts `plan.todo` and writes every planned shard, calling `plan.finish` in shard order and
    `advance(n)` as images are converted (the driver's progress bar)."""

    def write_shards(self, plan: ShardPlan, advance: Callable[[int], None]) -> None: ...
