"""Which samples a rank reads in an epoch, in what order, in how many batches: the plan both
loaders follow, so they see the same samples on each rank.

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from alexnet_fast.pipeline.loader_spec import LoaderSpec
from alexnet_fast.pipeline.shardset import ShardFile, ShardSet


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the samples `rank` reads: DALI's reader split (integer floor division)."""
    return total * rank // world_size, total * (rank + 1) // world_size


def train_batches(total: int, world_size: int, batch_size: int) -> int:
    """Full batches per epoch on every rank: the smallest rank's ((N // k) // batch_size)."""
    return (total // world_size) // batch_size


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
            batches = train_batches(total, spec.world_size, spec.batch_size)
            if batches == 0:
                raise ValueError(f"{total} train samples over {spec.world_size} rank(s) do not fill one batch of "
                                 f"{spec.batch_size}: use a smaller batch size")
            num_samples = batches * spec.batch_size
        else:
            num_samples = stop - start
            batches = math.ceil(num_samples / spec.batch_size)
        return cls(tuple(shards), start, stop, batches, num_samples, derive_seed(spec.seed, epoch, spec.rank, 1))
