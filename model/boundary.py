"""The stall between two epochs, timed by part, for metrics.jsonl.

Every GPU idles from the last step of one epoch to the first step of the next, while the run
evaluates, checkpoints, redraws its curves and starts the next epoch's pipeline. At full-ImageNet
scale an epoch can be seconds long, so this stall is paid ~90 times on every GPU: it is measured
rather than guessed. Epoch e's record carries the stall that came *before* its first step:

    boundary_s                from epoch e-1's last step to epoch e's first step
    boundary_<part>_s         the parts the run timed: eval, checkpoint, plot, pipeline
                              (the loader positioned + the first batch in hand), other (the rest)

The first epoch a process runs has no boundary before it (start-up is not a stall between epochs),
so its record has no such fields.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

from alexnet_fast.model.loop import EpochResult


class EpochBoundary:
    """Times one boundary at a time: `begin` at the previous epoch's last step, `part(name)` around
    the work in between, `fields(next_epoch)` once the next epoch has run."""

    def __init__(self) -> None:
        self.began: float | None = None
        self.parts: dict[str, float] = {}

    def begin(self, last_step_at: float) -> None:
        self.began, self.parts = last_step_at, {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - started

    def fields(self, epoch: EpochResult) -> dict[str, float]:
        """The record fields of the boundary before `epoch` (empty when none was timed)."""
        if self.began is None or not epoch.first_step_at:
            return {}
        parts = {**self.parts, "pipeline": self.parts.get("pipeline", 0.0) + epoch.first_batch_s}
        total = epoch.first_step_at - self.began
        parts["other"] = max(0.0, total - sum(parts.values()))
        return {"boundary_s": total, **{f"boundary_{name}_s": seconds for name, seconds in parts.items()}}
