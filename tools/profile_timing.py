"""Honest timing for the profiler: warm up untimed, then several timed repetitions, report the
median and keep every one.

    plan = TimingPlan(warmup=10, repeats=5, steps=20)
    result = measure(step, device, plan, device_events=True)    # StageResult: median img/s, all runs

`step()` does one batch's work and returns the images it handled. The warm-up absorbs what only
the first steps pay (cuDNN autotuning, DALI's prefetch queues filling, allocator growth, a
torch.compile); each repetition starts and ends with the device idle. On a GPU, `device_events`
times with CUDA events (for work the GPU runs back to back: training steps); otherwise with
perf_counter around a device synchronize (for host-driven work: loaders, disk reads).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class TimingPlan:
    warmup: int        # untimed steps first
    repeats: int       # timed repetitions; the median is reported
    steps: int         # steps per timed repetition


@dataclass
class StageResult:
    img_per_s: float                       # median over the timed repetitions
    runs_img_per_s: list[float]            # every timed repetition
    images_per_run: int
    warmup_seconds: float = 0.0            # the untimed warm-up (a torch.compile included)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"img_per_s": self.img_per_s, "runs_img_per_s": self.runs_img_per_s,
                "images_per_run": self.images_per_run, "warmup_s": self.warmup_seconds, **self.extra}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_seconds(run: Callable[[], None], device: torch.device, device_events: bool) -> float:
    """Seconds `run()` takes, with the device idle before and finished after."""
    synchronize(device)
    if device_events and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - t0


def measure(step: Callable[[], int], device: torch.device, plan: TimingPlan, *, device_events: bool = False,
            min_warmup: int = 0) -> StageResult:
    """Warm up with `plan.warmup` (at least `min_warmup`) calls of `step`, then time `plan.repeats`
    repetitions of `plan.steps` calls; the median repetition's img/s."""
    def warm_up() -> None:
        for _ in range(max(plan.warmup, min_warmup)):
            step()

    warmup_seconds = time_seconds(warm_up, device, device_events=False)
    runs, images = [], 0
    for _ in range(plan.repeats):
        counted = [0]

        def repetition() -> None:
            for _ in range(plan.steps):
                counted[0] += step()

        seconds = time_seconds(repetition, device, device_events)
        images = counted[0]
        runs.append(images / seconds)
    return StageResult(statistics.median(runs), runs, images, warmup_seconds)
