"""The default guard against shards that changed since make_shards wrote them: every shard's sha256
against manifest.json, hashed on a background thread while the first epoch trains.

A JPEG whose bytes changed but that still decodes (a flipped bit on a disk or in a copy) reaches
the model as wrong pixels, and neither loader can notice on its hot path. `--verify-shards` hashes
everything before the first step (the run waits for it); without it, this check does the same
hashing (pipeline/integrity.py) behind the training:

- each rank hashes its share of the shards (every world_size-th) on one thread of its own, at the
  lowest CPU priority (nice 19, per thread on Linux), so the training threads and the loader's
  always come first; hashlib releases the GIL while it hashes;
- at each epoch boundary `poll` asks every rank (one tiny all-reduce) whether its share is done;
  once all are, every rank learns every finding (one all-gather) and the result goes into that
  epoch's record in metrics.jsonl as "shard_check": {"shards", "differ", "changed_samples", "seconds"}.

What a failure does follows --on-corrupt, as with --verify-shards: `error` (the default) writes the
epoch's checkpoint and stops with one line naming the shard and samples (re-make the shard, then
--resume: a run on data other than the one it was made from should not go on unnoticed, and only
the samples of one epoch were seen); `skip` leaves the changed samples out of every later epoch,
counted like corrupt ones, and says so in one line.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

from alexnet_fast.model import distributed as D
from alexnet_fast.pipeline.integrity import ShardCheck, check_shards
from alexnet_fast.pipeline.shardset import ShardSet


@dataclass(frozen=True)
class ShardCheckResult:
    shards: int                          # shards hashed, over every rank
    differing: list[ShardCheck]          # those whose sha256 is not the manifest's
    seconds: float                       # the longest rank's hashing time

    @property
    def changed_samples(self) -> list[str]:
        """"<tar>:<key>" of every sample whose image or label changed."""
        return [f"{c.shard.tar}:{key}" for c in self.differing for key in c.changed]

    def record(self) -> dict:
        return {"shard_check": {"shards": self.shards, "differ": len(self.differing),
                                "changed_samples": len(self.changed_samples), "seconds": round(self.seconds, 3)}}


class BackgroundShardCheck:
    """This rank's share of the shard set's shards, hashed on a low-priority thread (`start`);
    `poll` (collective, at epoch boundaries) returns the whole result once, when every rank is done."""

    def __init__(self, shard_set: ShardSet, rank: int, world_size: int) -> None:
        shards = [s for split in ("train", "val") if shard_set.has_split(split) for s in shard_set.shards(split)]
        self.total = len(shards)
        self._mine = shards[rank::world_size]
        self._findings: list[ShardCheck] | None = None
        self._seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="shard hash check", daemon=True)
        self.reported = False

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)   # this thread only (Linux)
        except (OSError, AttributeError):
            pass
        try:
            self._findings = [c for c in check_shards(self._mine) if not c.matches]
        except OSError:                  # an unreadable shard: the loader names it when it reaches it
            self._findings = []
        self._seconds = time.perf_counter() - started

    def poll(self, device: torch.device, wait: bool = False) -> ShardCheckResult | None:
        """Collective. None until every rank has hashed its share (and after the result was given);
        then the findings of every rank. `wait`: at the run's last boundary, finish the hashing
        first (no step is left to slow down), so every run that ends records the result."""
        if self.reported:
            return None
        if wait:
            self._thread.join()
        done = torch.tensor([0 if self._thread.is_alive() else 1], dtype=torch.int32, device=device)
        if D.dist.is_initialized():
            D.dist.all_reduce(done, op=D.dist.ReduceOp.MIN)
        if not int(done.item()):
            return None
        self.reported = True
        shares = D.all_gather_objects((self._findings or [], self._seconds))
        return ShardCheckResult(self.total, [c for findings, _ in shares for c in findings],
                                max(seconds for _, seconds in shares))
