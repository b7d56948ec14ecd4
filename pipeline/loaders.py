"""One entry point for every data loader the trainer, evaluator and profiler use.

    loader = make_loader(LoaderSpec(data="shards/imagenet", split="train", batch_size=128, ...))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # images: [B,3,227,227] on spec.device, labels: int64 [B]
            ...

`kind="dali"` is the DALI pipeline (GPU decode with device="cuda", its CPU twin with "cpu");
`kind="baseline"` is webdataset + PIL + torch DataLoader doing the same augmentation math.

How an epoch is split and shuffled (both loaders follow the same `EpochPlan`):
- Train: the shard files are permuted per epoch by a generator seeded with (seed, epoch) -- the same
  permutation on every rank -- and the concatenated sample list is cut into `world_size` contiguous
  ranges exactly as DALI's reader does (`shard_id`/`num_shards`: rank r gets [N*r/k, N*(r+1)/k)).
  Each rank shuffles its range through a buffer seeded by (seed, epoch, rank), and runs exactly
  (N // k) // batch_size full batches, so every rank steps the same number of times (DDP needs it).
- Val: manifest order, the same contiguous ranges, every sample exactly once: the reader pads its
  last batch (`pad_last_batch=True`) and the loader trims it, so padding never reaches metrics.

Why not DALI's `shuffle_after_epoch`: it permutes the tars only between epochs of one long-lived
pipeline, with the permutation a function of the number of epochs already run, so a run resumed
at epoch e would see a different order than the uninterrupted run. The DALI loader instead builds
a fresh pipeline per epoch from `EpochPlan(seed, epoch, rank)`: `set_epoch(e)` alone fixes every
sample order and every random crop/flip/alpha of that epoch (rebuilding costs well under a second,
once per epoch).

`kind="dali"` lives in dali_loader.py (mid-epoch resume from DALI's pipeline checkpoint, corrupt
samples located and named or skipped, damaged shards worked around); `kind="baseline"` in
baseline.py. This module holds what both share: the spec, the contract, the epoch plan, the
shard-file check and the host-memory tuning.
"""
from __future__ import annotations

import functools
import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Protocol

import numpy as np
import torch

from alexnet_fast.pipeline.index_patches import read_index, row_fits, row_key
from alexnet_fast.pipeline.shardset import ShardFile, ShardSet


@dataclass(frozen=True)
class LoaderSpec:
    data: str                                   # shard set directory (has manifest.json)
    split: Literal["train", "val"] = "train"
    kind: Literal["dali", "baseline"] = "dali"
    batch_size: int = 128                       # per rank
    rank: int = 0
    world_size: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    device_id: int = 0                          # CUDA device index when device == "cuda"
    seed: int = 0
    workers: int = 2                            # DALI threads / DataLoader workers
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    crop: int = 227
    ten_crop: bool = False                      # val only: images [B,10,3,crop,crop]
    lighting_std: float = 0.1                   # PCA lighting alpha ~ N(0, lighting_std); 0 disables
    # (x - mean) / std per channel; False: x - mean only, the paper's centred raw RGB values
    # (0..255 scale), which its N(0, 0.01) init was tuned for (model/config.py `normalize`)
    scale_by_std: bool = True
    on_corrupt: Literal["error", "skip"] = "error"
    shuffle_buffer: int = 4096                  # train: per-rank shuffle buffer (samples)
    prefetch: int = 2                           # DALI prefetch queue depth / DataLoader prefetch_factor
    # DALI on the CPU: hand out each image batch as a view of DALI's own output buffer instead of
    # a copy. The view is valid only until the next batch is requested (DALI recycles the buffer),
    # which is how the trainer, evaluator and profiler consume batches; code that keeps batches
    # (tests, list(loader)) must leave this off. Saves a ~40 MB copy per batch of 64 (measured: ~9
    # of ~37 ms per batch on 2 cores). The GPU path always copies device to device; the baseline
    # loader ignores it.
    borrow_buffers: bool = False


class Loader(Protocol):
    num_samples: int                            # samples this rank sees per epoch (val: exact, no padding)
    skipped: list[str]                          # "<tar>:<key>" of the samples left out so far (on_corrupt="skip")
    notes: list[str]                            # damaged shards the loader works around (on_corrupt="skip")

    def __len__(self) -> int: ...              # batches per epoch on this rank (same on every rank for train)

    def set_epoch(self, epoch: int) -> None: ...   # the next iteration is epoch `epoch` from its first batch

    def resume(self, epoch: int, batches_done: int, state: dict | None = None) -> bool: ...
    # the next iteration yields epoch `epoch` from batch `batches_done` on; True if `state` (from
    # state_dict) restored the loader there, False if it replays the batches before it

    def state_dict(self) -> dict: ...          # where this rank is in its epoch, between two batches

    def exclude(self, names: list[str]) -> None: ...   # leave these "<tar>:<key>" samples out, skipped and counted

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class CorruptSampleError(RuntimeError):
    """A sample inside a shard cannot be decoded; the message names the shard and the key."""


def make_loader(spec: LoaderSpec) -> Loader:
    _check_spec(spec)
    shard_set = ShardSet.open(spec.data)
    if not shard_set.has_split(spec.split):
        raise ValueError(f"shard set {spec.data!r} has no {spec.split} samples")
    damaged = check_shard_files(shard_set, spec.split, spec.on_corrupt)
    if spec.device == "cpu":
        keep_batch_buffers_mapped()
    if spec.kind == "dali":
        from alexnet_fast.pipeline.dali_loader import DaliLoader
        return DaliLoader(spec, shard_set, damaged)
    from alexnet_fast.pipeline.baseline import BaselineLoader
    return BaselineLoader(spec, shard_set, damaged)


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


def color_stats(spec: LoaderSpec, shard_set: ShardSet):
    """The ColorStats a loader normalizes and lights with: stats.json, or with scale_by_std off
    its mean-only variant."""
    from alexnet_fast.pipeline.augment import ColorStats

    stats = ColorStats.from_dict(shard_set.stats())
    return stats if spec.scale_by_std else stats.centred_only()


def check_shard_files(shard_set: ShardSet, split: str, on_corrupt: str = "error") -> list[ShardDamage]:
    """Before any reader starts: every shard of `split` has its tar and its index, and no sample
    the index lists lies past the end of its tar (a copy cut short). Otherwise DALI stops with a
    C++ assertion about a malformed index and webdataset with a tar error; this names the shard
    (and the first lost sample) in one line instead. A few stat calls per shard: no data is read.
    With on_corrupt="skip", returns the damaged shards for the loader to work around (a missing
    tar still stops it: nothing of that shard is left to read)."""
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


@functools.cache
def _glibc():
    """glibc through ctypes, or None where the C library is not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc-only symbol: AttributeError elsewhere
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def keep_batch_buffers_mapped() -> None:
    """Let glibc serve host batch buffers from its heap instead of fresh mmaps.

    A float32 batch of 64 crops is ~40 MB: above glibc's largest mmap threshold (32 MB), so every
    batch was a new mapping whose first touch page-faults ~10,000 times and is zeroed by the kernel.
    Measured on 2 CPU cores: copying a DALI batch into a fresh torch tensor took 30 ms, into reused
    memory 2-8 ms, and the whole CPU loader went from ~1,450 to ~2,150 img/s. With the thresholds
    raised, freed batches stay in the heap and the next batch reuses pages already mapped. Applies
    to the whole process (both loaders, the baseline's forked workers too); a no-op off glibc.
    """
    libc = _glibc()
    if libc is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3          # from glibc's <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def release_freed_memory() -> None:
    """Collect garbage, then glibc's malloc_trim(0): hand the pages its arenas hold free back to the OS.

    Once per epoch, between two pipelines. Each epoch builds a fresh DALI pipeline; the old one
    sits in reference cycles (freed only by an occasional full collection), and with batch
    buffers served from the heap (above) what it frees stays in glibc's arenas, fragmented.
    benchmarks/loader_memory.py measured the CPU loader's RSS growing ~5-12 MiB per epoch (about
    400 -> 1100 MiB over 80 epochs of a 256-image set); with both steps here it levels off (slope
    -0.05 MiB/epoch over epochs 30-99). Costs ~0.1 s per epoch (mostly the full collection); the
    trim is a no-op off glibc.
    """
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _check_spec(spec: LoaderSpec) -> None:
    if spec.kind not in ("dali", "baseline"):
        raise ValueError(f"loader kind must be 'dali' or 'baseline', not {spec.kind!r}")
    if spec.split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {spec.split!r}")
    if spec.ten_crop and spec.split != "val":
        raise ValueError("ten_crop is for the val split only")
    if not 0 <= spec.rank < spec.world_size:
        raise ValueError(f"rank {spec.rank} is outside world size {spec.world_size}")
    if spec.batch_size < 1 or spec.workers < 1:
        raise ValueError("batch_size and workers must be at least 1")
    if spec.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {spec.dtype}")
    if spec.on_corrupt not in ("error", "skip"):
        raise ValueError(f"on_corrupt must be 'error' or 'skip', not {spec.on_corrupt!r}")


# --------------------------------------------------------------------------------------------
# The epoch plan both loaders follow
# --------------------------------------------------------------------------------------------
def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the samples `rank` reads: DALI's reader split (integer floor division)."""
    return total * rank // world_size, total * (rank + 1) // world_size


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from several integers (DALI seeds are signed ints)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0] >> 1)


@dataclass(frozen=True)
class EpochPlan:
    shards: tuple[ShardFile, ...]   # in reading order
    start: int                      # this rank's samples: [start, stop) of the concatenated order
    stop: int
    batches: int                    # batches per epoch on this rank
    num_samples: int
    seed: int                       # seeds this rank's shuffle and random augmentation

    @classmethod
    def make(cls, spec: LoaderSpec, shard_set: ShardSet, epoch: int) -> "EpochPlan":
        shards = shard_set.shards(spec.split)
        total = sum(s.samples for s in shards)
        train = spec.split == "train"
        if train:  # same permutation on every rank: a function of (seed, epoch) only
            order = np.random.default_rng(derive_seed(spec.seed, epoch)).permutation(len(shards))
            shards = [shards[i] for i in order]
        start, stop = rank_range(total, spec.rank, spec.world_size)
        if train:
            batches = (total // spec.world_size) // spec.batch_size   # the smallest rank's full batches
            if batches == 0:
                raise ValueError(f"{total} train samples over {spec.world_size} rank(s) do not fill one batch of "
                                 f"{spec.batch_size}: use a smaller batch size")
            num_samples = batches * spec.batch_size
        else:
            num_samples = stop - start
            batches = math.ceil(num_samples / spec.batch_size)
        return cls(tuple(shards), start, stop, batches, num_samples, derive_seed(spec.seed, epoch, spec.rank, 1))
