"""make_shards end to end: discover RAW, order the inputs, convert in parallel, write shards in order,
resume after a kill, statistics, manifest last.

Determinism: the train list is sorted by (wnid, source) and permuted with `seed`; val keeps file
order. Workers only convert images; results come back in input order (`Pool.imap`) and the main
process cuts them into shards of exactly `per_shard` accepted samples, so the bytes do not depend
on the worker count, and finished shards always form a prefix (what resume relies on).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from alexnet_fast.pipeline.procpool import fork_pool
from alexnet_fast.pipeline.shardset import MANIFEST_NAME, SPLITS, STATS_NAME
from alexnet_fast.tools.run_lock import DirectoryInUse, LockError, hold_directory
from alexnet_fast.tools.sharding import resume
from alexnet_fast.tools.sharding.convert import ImageOptions, convert_image, read_item
from alexnet_fast.tools.sharding.errors import RejectedImage, ShardingError
from alexnet_fast.tools.sharding.files import atomic_write_bytes
from alexnet_fast.tools.sharding.layout import Discovery, RawItem, Rejection, discover
from alexnet_fast.tools.sharding.manifest import (
    ShardRecord,
    build_manifest,
    job_fingerprint,
    read_manifest,
    write_manifest,
)
from alexnet_fast.tools.sharding.tarwriter import Sample, build_shard

SHARD_FILE = re.compile(r"^(train|val)-\d{6}\.(tar|idx)$")


@dataclass(frozen=True)
class ShardOptions:
    """Everything that determines the output bytes."""

    per_shard: int = 1000
    size: int = 256
    keep_aspect: bool = False
    quality: int = 90
    seed: int = 0
    stats_images: int | None = None  # None: all train images

    @property
    def image(self) -> ImageOptions:
        return ImageOptions(self.size, self.keep_aspect, self.quality)


@dataclass
class RunReport:
    out: Path
    layout: str
    samples: dict[str, int]
    shards: dict[str, int]
    reused_shards: int
    rejected: int
    seconds: float
    converted: int  # images converted in this run (not counting reused shards)
    notes: list[str] = field(default_factory=list)
    up_to_date: bool = False

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.out}: already complete for these inputs and options (manifest.json matches); nothing to do"
        rate = self.converted / self.seconds if self.seconds > 0 else 0.0
        parts = [
            f"{self.out}: train {self.samples['train']} samples in {self.shards['train']} shards, "
            f"val {self.samples['val']} in {self.shards['val']}",
            f"rejected {self.rejected} file(s)" + (" (listed in manifest.json)" if self.rejected else ""),
            f"{self.seconds:.1f} s, {rate:.0f} img/s",
        ]
        if self.reused_shards:
            parts.append(f"{self.reused_shards} shard(s) reused from an interrupted run")
        return "; ".join(parts)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _ordered_items(discovery: Discovery, seed: int) -> dict[str, list[RawItem]]:
    """Train: sorted then a seeded global permutation; val: file order. Independent of listing order."""
    train = sorted(discovery.train, key=lambda it: (it.wnid, it.source))
    order = np.random.default_rng(seed).permutation(len(train))
    return {"train": [train[i] for i in order], "val": sorted(discovery.val, key=lambda it: it.source)}


def _convert(item: RawItem, opts: ImageOptions):
    """Worker task: a Converted image, or the rejection reason as a str."""
    try:
        return convert_image(read_item(item), opts)
    except RejectedImage as e:
        return str(e)


@contextlib.contextmanager
def _converter(opts: ImageOptions, workers: int):
    """A function mapping items to conversion results in input order, over `workers` processes."""
    task = functools.partial(_convert, opts=opts)
    if workers <= 1:
        yield lambda items: map(task, items)
        return
    # fork, before any progress-bar thread exists: workers need only PIL and the items, and
    # spawn would re-import `tools/make_shards` as __main__.
    with fork_pool(workers) as pool:
        yield lambda items: pool.imap(task, items, chunksize=max(1, min(32, len(items) // (4 * workers))))


class _SplitWriter:
    """Cuts one split's ordered result stream into shards of `per_shard` accepted samples."""

    def __init__(self, out: Path, split: str, per_shard: int, fingerprint: str, classes: dict[str, int],
                 finished: list[resume.FinishedShard]):
        self.out, self.split, self.per_shard, self.fingerprint = out, split, per_shard, fingerprint
        self.label_of = classes
        self.finished = list(finished)
        self.pending: list[Sample] = []
        self.pending_rejected: list[Rejection] = []
        self.first_item = finished[-1].end_item if finished else 0
        self.next_key = sum(s.record.samples for s in finished)

    def add(self, index: int, item: RawItem, result) -> None:
        if isinstance(result, str):
            self.pending_rejected.append(Rejection(item.source, self.split, result))
        else:
            self.pending.append(Sample(self.next_key, self.label_of[item.wnid], item.wnid, item.source, result.jpeg,
                                       result.w, result.h, result.orig_w, result.orig_h))
            self.next_key += 1
        if len(self.pending) == self.per_shard:
            self.flush(index + 1)

    def flush(self, end_item: int) -> None:
        if not self.pending:
            return  # trailing rejections without samples: reported by finish(), not a shard
        name = resume.shard_name(self.split, len(self.finished))
        shard = build_shard(self.pending)
        atomic_write_bytes(self.out / f"{name}.idx", shard.index)
        atomic_write_bytes(self.out / f"{name}.tar", shard.tar)
        record = ShardRecord(f"{name}.tar", f"{name}.idx", shard.samples, len(shard.tar), shard.sha256,
                             hashlib.sha256(shard.index).hexdigest())
        done = resume.FinishedShard(record, self.first_item, end_item, tuple(self.pending_rejected))
        resume.save_sidecar(self.out, self.fingerprint, done)  # after the files: a sidecar means complete
        self.finished.append(done)
        self.pending, self.pending_rejected, self.first_item = [], [], end_item

    def records(self) -> list[ShardRecord]:
        return [s.record for s in self.finished]

    def rejected(self) -> list[Rejection]:
        return [r for s in self.finished for r in s.rejected] + self.pending_rejected


def _holding_out(out: Path, log: Callable[[str], None]) -> contextlib.AbstractContextManager:
    """OUT belongs to one make_shards at a time (tools/run_lock.py): held until the run ends; a
    second one on the same OUT is refused (ShardingError) before it changes anything there."""
    if out.exists() and not out.is_dir():
        raise ShardingError(f"OUT {str(out)!r} is a file, not a directory")
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(hold_directory(out, "make_shards", warn=log))
    except DirectoryInUse as e:
        raise ShardingError(f"OUT {e}; wait for it to finish (rerunning this command then has nothing to do), "
                            "or stop it and rerun this command to continue its work") from None
    except LockError as e:
        raise ShardingError(f"OUT {str(out)!r} is not writable: {e.reason}") from None
    return stack


def _check_out(out: Path) -> None:
    """OUT (already created and locked) takes new files."""
    try:
        probe = out / ".make_shards-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ShardingError(f"OUT {str(out)!r} is not writable: {e.strerror or e}") from None


def _remove_shard_files(out: Path, keep: set[str]) -> None:
    for path in out.iterdir():
        if SHARD_FILE.match(path.name) and path.name not in keep:
            path.unlink()


def _compute_stats(out: Path, train_tars: list[Path], opts: ShardOptions, workers: int, progress: bool, log) -> None:
    """stats.json from the finished train shards (Numba; alexnet_fast.pipeline.stats)."""
    try:
        from alexnet_fast.pipeline.stats import compute_stats, write_stats
    except ImportError:  # a checkout without the statistics module: shards are still usable
        log("statistics module not available: stats.json not written (run `alexnet-fast stats OUT` later)")
        return
    stats = compute_stats(train_tars, max_images=opts.stats_images, seed=opts.seed, workers=workers,
                          progress=progress)
    write_stats(out, stats)


def make_shards(
    raw: Path,
    out: Path,
    opts: ShardOptions = ShardOptions(),
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> RunReport:
    started = time.perf_counter()
    raw, out = Path(raw), Path(out)
    workers = workers or default_workers()
    discovery = discover(raw)
    with _holding_out(out, log):  # before any log line: a bad or busy OUT is a one-line error
        _check_out(out)
        log(f"found {discovery.describe()}")
        for note in discovery.notes:
            log(note)

        args = {"raw": str(raw.resolve()), **asdict(opts)}
        fingerprint = job_fingerprint(discovery, args)
        previous = read_manifest(out)
        if previous is not None:
            if previous.get("created_by", {}).get("fingerprint") == fingerprint:
                resume.clear_state(out)  # a kill between manifest and clean-up leaves the sidecars
                resume.remove_temporaries(out)
                return RunReport(out, discovery.describe(), {}, {}, 0, len(previous.get("rejected", [])), 0.0, 0,
                                 up_to_date=True)
            if not overwrite:
                raise ShardingError(
                    f"OUT {str(out)!r} already holds a shard set made from other inputs or options; "
                    "choose another OUT or pass --overwrite"
                )
            (out / MANIFEST_NAME).unlink()
            (out / STATS_NAME).unlink(missing_ok=True)
            resume.clear_state(out)
            _remove_shard_files(out, keep=set())
        resume.remove_temporaries(out)

        ordered = _ordered_items(discovery, opts.seed)
        classes = {wnid: i for i, wnid in enumerate(discovery.classes)}
        writers = {
            split: _SplitWriter(out, split, opts.per_shard, fingerprint, classes,
                                resume.reusable_prefix(out, split, fingerprint))
            for split in SPLITS
        }
        reused = sum(len(w.finished) for w in writers.values())
        if reused:
            log(f"resuming: reusing {reused} finished shard(s)")
        tasks = [(split, i, item) for split in SPLITS for i, item in enumerate(ordered[split]) if i >= writers[split].first_item]

        with _converter(opts.image, workers if len(tasks) > 1 else 1) as convert_all:
            results: Iterable = convert_all([item for _, _, item in tasks])
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(tasks), unit="img", desc="make_shards", dynamic_ncols=True,
                               mininterval=0.5, smoothing=0.1)
            for (split, i, item), result in zip(tasks, results):
                writers[split].add(i, item, result)
        for split in SPLITS:
            writers[split].flush(len(ordered[split]))

        keep = {name for w in writers.values() for r in w.records() for name in (r.tar, r.index)}
        _remove_shard_files(out, keep)  # shards of an earlier, longer attempt of this job
        train_tars = [out / r.tar for r in writers["train"].records()]
        if train_tars:
            _compute_stats(out, train_tars, opts, workers, progress, log)

        rejected = discovery.rejected + [r for w in writers.values() for r in w.rejected()]
        manifest = build_manifest(discovery, args, fingerprint, {s: w.records() for s, w in writers.items()}, rejected)
        write_manifest(out, manifest)  # last: its presence means the set is complete
        resume.clear_state(out)
        return RunReport(
            out=out,
            layout=discovery.describe(),
            samples={s: manifest["splits"][s]["samples"] for s in SPLITS},
            shards={s: len(manifest["splits"][s]["shards"]) for s in SPLITS},
            reused_shards=reused,
            rejected=len(rejected),
            seconds=time.perf_counter() - started,
            converted=len(tasks),
            notes=discovery.notes,
        )
