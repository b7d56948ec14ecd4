"""The executor on a Ray cluster (`make_shards RAW OUT --ray [ADDRESS]`): conversion and shard writing
run as Ray tasks on any node; the driver only plans, records and reports. Imported only for --ray
(Ray is the optional extra `alexnet-fast[ray]`).

Two kinds of task, both plain functions of their arguments, so Ray may run them anywhere and run
them again (`max_retries`) when a worker process or node dies:

* `_convert_block(items)` converts a block of consecutive input items and returns two objects: the
  rejection reasons (small: they come back to the driver) and the converted images (stay in Ray's
  object store, on the node that made them);
* `_write_shard(shard, *blocks)` takes a planned shard and the image blocks it draws on, and writes
  the tar + index into OUT under its own process's temp names, then renames them (plan.write_shard).

The driver reads the reasons block by block in input order and feeds them to the same cutter as
the local executor (plan.ShardPlan.cut), which needs only accepted-or-not to place every cut; so
the block size and the number of workers change nothing in the bytes. Write results come back to
the driver in shard order, and only then is each shard recorded in the resume sidecar (in order,
after its files), exactly as in a local run. The driver keeps at most ~2 tasks per CPU of the
cluster in flight and drops its reference to an image block as soon as no later shard needs it,
so the object store holds a bounded window of images, not the data set.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import ray

from alexnet_fast.tools.sharding.convert import Converted, ImageOptions
from alexnet_fast.tools.sharding.errors import ShardingError
from alexnet_fast.tools.sharding.layout import RawItem
from alexnet_fast.tools.sharding.plan import Outcome, PlannedShard, ShardPlan, Written, convert_item, write_shard

RETRIES = 3          # runs of a task again after its worker process (or node) died: Ray's max_retries
MAX_BLOCK = 256      # images per conversion task at most (a few seconds of work: Ray's per-task cost vanishes)
TASKS_PER_CPU = 2    # tasks in flight per cluster CPU: every CPU busy, a bounded window in the object store


@ray.remote(num_returns=2)
def _convert_block(items: list[RawItem], opts: ImageOptions,
                   moments: list[bool]) -> tuple[list[str | None], list[Converted | None]]:
    results = [convert_item(item, opts, with_moments) for item, with_moments in zip(items, moments)]
    return ([r if isinstance(r, str) else None for r in results],
            [None if isinstance(r, str) else r for r in results])


@ray.remote
def _write_shard(out: str, shard: PlannedShard, block_numbers: list[int], *blocks: list[Converted | None]) -> Written:
    images = dict(zip(block_numbers, blocks))  # Ray resolved the block references into the lists
    return write_shard(Path(out), shard, lambda handle: images[handle[0]][handle[1]])


def _absolute(item: RawItem) -> RawItem:
    """Workers do not run in the driver's directory: give them the path every node sees."""
    return dataclasses.replace(item, file=os.path.abspath(item.file))


def _get(ref):
    """ray.get, with a task's own exception raised as itself (an OSError naming the file it could not
    write stays an OSError) and Ray's failures (retries used up, node lost) as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception) and not isinstance(e.cause, ray.exceptions.RayError):
            raise e.cause from None
        raise ShardingError(f"a Ray task failed: {str(e).strip().splitlines()[0]}; finished shards are kept, "
                            "rerun the same command to continue") from None
    except ray.exceptions.RayError as e:
        raise ShardingError(f"a Ray task failed after {RETRIES} retries: {str(e).strip().splitlines()[0]}; "
                            "finished shards are kept, rerun the same command to continue") from None


def _check_reachable(address: str | None) -> None:
    """A `host:port` that nothing answers on fails here in one line: ray.init itself would log GCS
    connection warnings and retry for minutes."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # auto, local, ray://... and none: Ray resolves and reports those itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise ShardingError(f"cannot reach Ray at {address!r}: {e.strerror or e}; start the cluster "
                            "(ray start --head) or pass its head's address") from None


class RayExecutor:
    def __init__(self, address: str | None = None, log: Callable[[str], None] = lambda msg: None):
        self.address = address  # as ray.init takes it; None: Ray's default (RAY_ADDRESS, a cluster on this machine, else a new local one)
        self.log = log

    def describe(self) -> str:
        return f"Ray at {self.address}" if self.address else "Ray (local instance)"

    @contextlib.contextmanager
    def _connected(self):
        if ray.is_initialized():  # the caller's own Ray session (a test, a benchmark, a notebook): use it, keep it
            yield
            return
        _check_reachable(self.address)
        try:
            ray.init(address=self.address, logging_level=logging.ERROR)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = f"at {self.address!r}" if self.address else "(local instance)"
            raise ShardingError(f"cannot start or reach Ray {where}: {str(e).strip().splitlines()[0]}") from None
        try:
            yield
        finally:
            ray.shutdown()

    def write_shards(self, plan: ShardPlan, advance: Callable[[int], None]) -> None:
        with self._connected():
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            self.log(f"Ray: {cpus} CPU(s) in the cluster")
            if plan.todo:
                self._run(plan, advance, cpus)

    def _run(self, plan: ShardPlan, advance: Callable[[int], None], cpus: int) -> None:
        in_flight = TASKS_PER_CPU * cpus
        size = max(1, min(MAX_BLOCK, plan.per_shard, math.ceil(len(plan.todo) / (4 * cpus))))
        blocks = [plan.todo[i:i + size] for i in range(0, len(plan.todo), size)]
        convert = _convert_block.options(max_retries=RETRIES)
        write = _write_shard.options(max_retries=RETRIES)
        out = str(plan.out.absolute())
        reasons: deque = deque()        # reason refs of submitted blocks, in block order
        images: dict[int, ray.ObjectRef] = {}   # image refs of blocks that a later shard may still need
        submitted = 0

        def outcomes() -> Iterator[Outcome]:
            nonlocal submitted
            for number, tasks in enumerate(blocks):
                while submitted < len(blocks) and submitted <= number + in_flight:
                    reasons_ref, images[submitted] = convert.remote([_absolute(t.item) for t in blocks[submitted]],
                                                                    plan.image,
                                                                    [plan.moments_for(t) for t in blocks[submitted]])
                    reasons.append(reasons_ref)
                    submitted += 1
                block_reasons = _get(reasons.popleft())
                advance(len(tasks))
                for position, (task, reason) in enumerate(zip(tasks, block_reasons)):
                    yield Outcome(task, reason, (number, position))

        writes: deque[tuple[PlannedShard, ray.ObjectRef]] = deque()
        for shard in plan.cut(outcomes()):
            needed = sorted({entry.handle[0] for entry in shard.entries})
            writes.append((shard, write.remote(out, shard, needed, *(images[b] for b in needed))))
            for b in [b for b in images if b < needed[-1]]:  # later shards start at or after this one's last block
                del images[b]  # the pending write keeps its own arguments alive
            while writes and (len(writes) > in_flight or ray.wait([writes[0][1]], timeout=0)[0]):
                done, ref = writes.popleft()
                plan.finish(done, _get(ref))
        while writes:
            done, ref = writes.popleft()
            plan.finish(done, _get(ref))
