"""The host a loader runs on: how many CPU cores this process may use, glibc's heap tuned for
batch buffers (both loaders, every device), and the per-epoch collection kept cheap."""
from __future__ import annotations

import contextlib
import functools
import gc
import os
from typing import Iterator


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: taskset, cgroup cpusets), not the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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


@contextlib.contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Keep the objects alive at entry (the modules of torch, DALI, matplotlib: ~355,000) out of
    every garbage collection until exit (gc.freeze), then hand them back (gc.unfreeze).

    `release_freed_memory` runs a full collection every epoch, and Python runs some of its own as a
    run allocates. Each one walked every object the imports left: 0.20-0.25 s per collection, ~8%
    of the CPU time of a short training process (perf, 2026-12-03); with them frozen a collection
    walks only what the run made since (~0 s). Nothing frozen is lost: the objects are unfrozen at
    exit, so garbage among them is collected then. A caller that froze objects itself keeps them
    frozen (only the outermost use unfreezes)."""
    outermost = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        yield
    finally:
        if outermost:
            gc.unfreeze()
