"""The executor on this machine: a fork pool converts the images, the main process writes the shards.

Results come back in input order (`Pool.imap`), so the plan cuts them as they arrive and each shard
is written, then recorded, before the next one: finished shards always form a prefix.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

from alexnet_fast.pipeline.procpool import fork_pool
from alexnet_fast.tools.sharding.convert import ImageOptions
from alexnet_fast.tools.sharding.layout import RawItem
from alexnet_fast.tools.sharding.plan import Outcome, ShardPlan, convert_item, write_shard


def _convert(job: tuple[RawItem, bool], opts: ImageOptions):
    item, moments = job
    return convert_item(item, opts, moments)


@contextlib.contextmanager
def _converter(opts: ImageOptions, workers: int):
    """A function mapping (item, with moments) pairs to conversion results in input order, over
    `workers` processes."""
    task = functools.partial(_convert, opts=opts)
    if workers <= 1:
        yield lambda jobs: map(task, jobs)
        return
    # fork, before any progress-bar thread exists: workers need only PIL and the items, and
    # spawn would re-import `tools/make_shards` as __main__.
    with fork_pool(workers) as pool:
        yield lambda jobs: pool.imap(task, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers))))


class LocalExecutor:
    def __init__(self, workers: int):
        self.workers = workers

    def describe(self) -> str:
        return f"{self.workers} local process(es)"

    def write_shards(self, plan: ShardPlan, advance: Callable[[int], None]) -> None:
        jobs = [(task.item, plan.moments_for(task)) for task in plan.todo]
        with _converter(plan.image, self.workers if len(jobs) > 1 else 1) as convert_all:
            def outcomes() -> Iterator[Outcome]:
                for task, result in zip(plan.todo, convert_all(jobs)):
                    advance(1)
                    yield Outcome(task, result if isinstance(result, str) else None, result)

            for shard in plan.cut(outcomes()):
                plan.finish(shard, write_shard(plan.out, shard, lambda converted: converted))
