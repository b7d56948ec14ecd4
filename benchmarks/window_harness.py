"""Equal timed windows for loader benchmarks, one contender per process (standard library only: the
FFCV side imports it from its own venv, where neither click nor this project is installed).

Each contender is a child process that builds its loader, runs a warm-up (timed and reported, never
counted), then waits. The parent (`benchmarks/loaders.py`) asks the contenders in turn for one
window each, round after round, the order reversed every round, so a burst of outside load on a
shared machine falls on all of them alike. A window runs until it has lasted `seconds` AND handed
out `min_batches` batches; while one contender runs its window the others sit blocked (their
loaders' prefetch queues full, threads asleep). Results are medians over the rounds, with the
spread (min-max) and each round's figure, never best-of.

Protocol: the parent writes one JSON request per line on the child's stdin ({"window": {"seconds",
"min_batches"}} or {"quit": true}); the child answers with one line `@@ <json>` on stdout (other
output, e.g. a library's warnings, is ignored).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

TAG = "@@ "


@dataclass(frozen=True)
class WindowRule:
    seconds: float = 10.0          # a window lasts at least this long ...
    min_batches: int = 200         # ... and hands out at least this many batches


def finished_cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its children that have exited and been
    waited for (a finished pool's workers): around a job whose pools end with it, its whole CPU cost."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def process_cpu_seconds() -> float:
    """CPU time of this process, all its threads (DALI's, FFCV's numba workers), its live child
    processes (a DataLoader's workers) and the children they have reaped (a DataLoader's workers of
    an ended epoch: `cutime`/`cstime`, without which the sum would drop when they end); on Linux from
    /proc, elsewhere this process only."""
    if not os.path.isdir("/proc/self/task"):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    ticks, parent_of, cpu = os.sysconf("SC_CLK_TCK"), {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()   # after "(comm)": state, ppid, ...
            except OSError:                                     # ended meanwhile
                continue
            # utime + stime + cutime + cstime
            parent_of[int(entry)], cpu[int(entry)] = int(fields[1]), sum(map(int, fields[11:15])) / ticks
    tree, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, parent in parent_of.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(cpu.get(pid, 0.0) for pid in tree)


def output_problem(shape: tuple, stride: tuple, dtype: str, layout: str, want_dtype: str, crop: int = 227) -> str | None:
    """Why a contender's batch is not [B, 3, crop, crop] of `want_dtype` in `layout` memory order
    (nchw: contiguous; nhwc: channels_last strides), or None: every contender must hand out the same."""
    batch = shape[0]
    strides = {"nchw": (3 * crop * crop, crop * crop, crop, 1), "nhwc": (3 * crop * crop, 1, 3 * crop, 3)}[layout]
    if tuple(shape) != (batch, 3, crop, crop) or tuple(stride) != strides or not dtype.endswith(want_dtype):
        return (f"output is shape {tuple(shape)} strides {tuple(stride)} {dtype}, not [B, 3, {crop}, {crop}] "
                f"{want_dtype} {layout}")
    return None


def run_window(batches: Iterator[int], rule: WindowRule, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Take batches (each item: its image count) until `rule` is met; the rate over exactly those."""
    cpu0, start = process_cpu_seconds(), clock()
    images = count = 0
    while True:
        images += next(batches)
        count += 1
        seconds = clock() - start
        if seconds >= rule.seconds and count >= rule.min_batches:
            break
    return {"img_per_s": images / seconds, "images": images, "batches": count, "seconds": seconds,
            "cpu_ms_per_img": 1000 * (process_cpu_seconds() - cpu0) / images, "load_avg_1m": os.getloadavg()[0]}


def serve(make_batches: Callable[[], Iterator[int]], warmup_batches: int) -> None:
    """The child's side: build the batch stream, warm up, then answer window requests until quit."""
    start = time.perf_counter()
    batches = make_batches()
    for _ in range(warmup_batches):
        next(batches)
    _answer({"warmup_s": time.perf_counter() - start, "warmup_batches": warmup_batches})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        _answer(run_window(batches, WindowRule(**request["window"])))


def _answer(obj: dict) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


class Contender:
    """One contender's child process, seen from the parent."""

    def __init__(self, name: str, argv: list[str], cpus: set[int] | None = None, env: dict | None = None):
        self.name = name
        # taskset-equivalent: the child (and every thread it starts) runs on the same cores as the others
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=preexec, env=env)
        self.warmup = self._read()
        self.windows: list[dict] = []

    def window(self, rule: WindowRule) -> dict:
        self.proc.stdin.write(json.dumps({"window": {"seconds": rule.seconds, "min_batches": rule.min_batches}}) + "\n")
        self.proc.stdin.flush()
        result = self._read()
        self.windows.append(result)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        raise RuntimeError(f"{self.name}: the benchmark process ended (exit {self.proc.wait()}) without a result; "
                           f"see its output above")

    def summary(self) -> dict:
        return summarize(self.windows) | {"warmup": self.warmup}


def summarize(windows: list[dict]) -> dict:
    """Median and spread over the rounds' windows (not best-of)."""
    rates = [w["img_per_s"] for w in windows]
    return {"img_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "rounds": [round(r, 1) for r in rates],
            "cpu_ms_per_img": statistics.median(w["cpu_ms_per_img"] for w in windows),
            "batches_per_window": statistics.median(w["batches"] for w in windows),
            "seconds_per_window": statistics.median(w["seconds"] for w in windows)}


def interleave(contenders: list[Contender], rounds: int, rule: WindowRule, log=print) -> None:
    """`rounds` windows per contender, one contender at a time, the order reversed every round."""
    for r in range(rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            w = c.window(rule)
            log(f"round {r + 1}/{rounds} {c.name:>28}: {w['img_per_s']:8.1f} img/s  ({w['batches']} batches in "
                f"{w['seconds']:.1f} s, {w['cpu_ms_per_img']:.2f} CPU-ms/img, load {w['load_avg_1m']:.1f})")


def run_contenders(plan: list[tuple[str, list[str]]], cpus: set[int], rounds: int, rule: WindowRule,
                   log=print) -> dict:
    """Start each (name, argv) child on `cpus` in turn (each warm-up alone), interleave their
    windows, stop them all; {name: summary} in the plan's order."""
    contenders = []
    try:
        for name, argv in plan:
            contenders.append(Contender(name, argv, cpus=cpus))
            log(f"{name:>14}: warm-up {contenders[-1].warmup['warmup_s']:.1f} s")
        interleave(contenders, rounds, rule, log=log)
    finally:
        for c in contenders:
            c.close()
    return {c.name: c.summary() for c in contenders}


def serve_or_run(batches: Callable[[str, str, int], Iterator[int]], main: Callable[[], None]) -> None:
    """A benchmark script's entry: `SCRIPT --serve NAME DATA THREADS WARMUP` is a contender's child
    process (`serve` over `batches(NAME, DATA, THREADS)`), anything else the parent (`main`)."""
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        name, data, threads, warmup = sys.argv[2:6]
        serve(lambda: batches(name, data, int(threads)), int(warmup))
    else:
        main()
