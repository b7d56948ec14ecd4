"""make_shards end to end: discover RAW, order the inputs, plan the shards, have an executor convert
and write them, resume after a kill, statistics, manifest last.

Determinism: the train list is sorted by (wnid, source) and permuted with `seed`; val keeps file
order. The shard plan (plan.py) cuts the ordered conversion outcomes into shards of exactly
`per_shard` accepted samples, so the bytes depend neither on the worker count nor on the executor
(local_executor.py: a process pool here; ray_executor.py: Ray tasks), and finished shards are
recorded in order, so they always form a prefix (what resume relies on).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from alexnet_fast.pipeline.shardset import MANIFEST_NAME, SPLITS, STATS_NAME, shard_set_beside
from alexnet_fast.pipeline.stats import compute_stats, stats_from_moments, sum_moments, write_stats
from alexnet_fast.pipeline.stats import warm_up as stats_warm_up
from alexnet_fast.tools.run_lock import DirectoryInUse, LockError, hold_directory
from alexnet_fast.tools.sharding import resume
from alexnet_fast.tools.sharding.convert import ImageOptions
from alexnet_fast.tools.sharding.convert import warm_up as convert_warm_up
from alexnet_fast.tools.sharding.errors import ShardingError
from alexnet_fast.tools.sharding.layout import Discovery, RawItem, discover
from alexnet_fast.tools.sharding.local_executor import LocalExecutor
from alexnet_fast.tools.sharding.manifest import (
    build_manifest,
    job_fingerprint,
    read_manifest,
    write_manifest,
)
from alexnet_fast.tools.sharding.plan import Executor, ShardPlan

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


def _check_apart(raw: Path, out: Path) -> None:
    """OUT and RAW must not overlap: shards written into the raw tree (OUT = RAW, or OUT inside it)
    would be read back as raw input by the next run, and a RAW inside OUT would have its files
    next to (or among) the shards. Symlinks are followed, so another name for the same folder is
    caught too. Checked before OUT is created."""
    raw_path, out_path = raw.resolve(), out.resolve()
    if raw_path == out_path or raw_path in out_path.parents:
        where = "is RAW itself" if raw_path == out_path else f"is inside RAW {str(raw)!r}"
    elif out_path in raw_path.parents:
        where = f"holds RAW {str(raw)!r}"
    else:
        return
    raise ShardingError(f"OUT {str(out)!r} {where}: the shards must be written outside the raw tree "
                        f"(e.g. {shard_set_beside(raw)})")


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


@contextlib.contextmanager
def _progress_bar(total: int, show: bool):
    """advance(n): n more images converted; a tqdm bar (img/s, ETA) on stderr when `show`. The bar
    (and tqdm's monitor thread) starts at the first advance, after the local executor has forked
    its pool: a fork with other threads running can copy a held lock into the child."""
    bar = None

    def advance(n: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="img", desc="make_shards", dynamic_ncols=True, mininterval=0.5,
                       smoothing=0.1)
        bar.update(n)

    try:
        yield advance if show else (lambda n: None)
    finally:
        if bar is not None:
            bar.close()


def _write_stats(out: Path, plan: ShardPlan, opts: ShardOptions, workers: int, progress: bool) -> None:
    """stats.json. Every train image (the default): from the moments the conversion pass computed
    (summed per shard, kept in the resume sidecars, so reused shards count too); a sample
    (--stats-images N): decoded from the finished train shards. Either way the same bytes as
    `alexnet-fast stats` over the shards (pipeline/stats.py)."""
    finished = plan.finished["train"]
    if plan.stats_in_pass and all(s.moments is not None for s in finished):
        stats = stats_from_moments(sum_moments(s.moments for s in finished), sum(s.record.samples for s in finished),
                                   max_images=None, seed=opts.seed)
    else:  # a sample, or shards reused from a run that did not compute moments
        stats = compute_stats([out / s.record.tar for s in finished], max_images=opts.stats_images, seed=opts.seed,
                              workers=workers, progress=progress)
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
    executor: Executor | None = None,
) -> RunReport:
    """`workers`: processes on this machine (the conversion, unless `executor` is given, and the
    statistics). `executor`: who converts and writes the shards; default a LocalExecutor(workers)."""
    started = time.perf_counter()
    raw, out = Path(raw), Path(out)
    workers = workers or default_workers()
    executor = executor or LocalExecutor(workers)
    if raw.is_dir():    # (a RAW that is no folder is discover's one line)
        _check_apart(raw, out)
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
        plan = ShardPlan(out, opts.image, opts.per_shard, fingerprint, classes, ordered,
                         {split: resume.reusable_prefix(out, split, fingerprint) for split in SPLITS},
                         stats_in_pass=opts.stats_images is None)
        stats_warm_up()  # the moments kernel compiled before the pool forks
        convert_warm_up()  # and torch imported once, not by every worker
        if plan.reused:
            log(f"resuming: reusing {plan.reused} finished shard(s)")
        with _progress_bar(len(plan.todo), progress) as advance:
            executor.write_shards(plan, advance)
        resume.remove_temporaries(out)  # temp files of writers killed mid-write (a retried Ray task's)

        keep = {name for split in SPLITS for r in plan.records(split) for name in (r.tar, r.index)}
        _remove_shard_files(out, keep)  # shards of an earlier, longer attempt of this job
        if plan.finished["train"]:
            _write_stats(out, plan, opts, workers, progress)

        rejected = discovery.rejected + plan.rejected()
        manifest = build_manifest(discovery, args, fingerprint, {s: plan.records(s) for s in SPLITS}, rejected)
        write_manifest(out, manifest)  # last: its presence means the set is complete
        resume.clear_state(out)
        return RunReport(
            out=out,
            layout=discovery.describe(),
            samples={s: manifest["splits"][s]["samples"] for s in SPLITS},
            shards={s: len(manifest["splits"][s]["shards"]) for s in SPLITS},
            reused_shards=plan.reused,
            rejected=len(rejected),
            seconds=time.perf_counter() - started,
            converted=len(plan.todo),
            notes=discovery.notes,
        )
