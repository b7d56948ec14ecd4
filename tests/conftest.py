"""Shared fixtures: a small raw ImageNet tree and the shard set make_shards builds from it.

Both are session-scoped and built once through the real code (generator -> make_shards), so every
test reads the same real shards. Other helpers may append fixtures at the end of this file.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

# Under `pytest -n N` (pytest-xdist) the cores this process may run on (a container's cpuset, not
# the host's count) are shared between N workers: each worker's torch, and every process it starts,
# gets its share as OpenMP threads, as the product gives each rank its share (model/distributed.py).
# Set here, before any test imports torch (torch reads it then). At torch's default (every core per
# process) two workers on 2 cores ran two concurrent training runs in 21-25 s; with one thread each,
# 18 s (2026-12-03).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

from alexnet_fast.tools.sample_data import RawTree, SampleSpec, ValFormat, write_raw_imagenet
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

# 4 classes x 16 train (+4 odd files kept, 3 rejected) and 4 val per class, labelled by the devkit.
SHARD_SET_SPEC = SampleSpec(classes=4, train_per_class=16, val_per_class=4, val_layout=ValFormat.FLAT_DEVKIT)
SHARD_SET_OPTIONS = ShardOptions(per_shard=16)  # 68 train samples -> 5 train shards, 1 val shard


@pytest.fixture(scope="session")
def raw_imagenet(tmp_path_factory) -> RawTree:
    """A raw ImageNet tree (train/<wnid>/ folders, flat val/ + devkit) with the odd files."""
    return write_raw_imagenet(tmp_path_factory.mktemp("raw_imagenet"), SHARD_SET_SPEC)


@pytest.fixture(scope="session")
def shard_set(raw_imagenet, tmp_path_factory) -> Path:
    """The shard set directory make_shards writes from `raw_imagenet` (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("shard_set")
    make_shards(raw_imagenet.root, out, SHARD_SET_OPTIONS, workers=1, progress=False, log=lambda msg: None)
    return out


@pytest.fixture(scope="session")
def wait_for_step():
    """wait(run, step, procs, timeout): until RUN/metrics.jsonl has logged a step >= `step` (whole
    lines only), failing if one of `procs` (a run's processes) ends first or `timeout` s pass."""
    def wait(run: Path, step: int, procs: list[subprocess.Popen], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "the run ended before it could be interrupted"
            metrics = run / "metrics.jsonl"
            if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                        if line.endswith("}")):
                return
            time.sleep(0.1)
        raise AssertionError(f"step {step} never logged")

    return wait



@pytest.fixture(scope="session", autouse=True)
def session_temp_dir(tmp_path_factory):
    """The temp dir of the suite and of every process it starts: one folder of its own, removed at
    the end, so the suite leaves nothing in /tmp (torchrun's launcher writes a `torchelastic_*`
    log folder there per run and never removes it) and removes only what it made (other jobs on
    the machine use /tmp too). pytest's own tmp_path folders are placed before the switch, where
    pytest puts them (pyproject's tmp_path_retention_policy removes each passed test's at its
    teardown). A short path: Unix socket paths (gloo, Ray) allow 107 bytes."""
    import os
    import shutil
    import tempfile

    tmp_path_factory.getbasetemp()
    path = tempfile.mkdtemp(prefix="alexnet-fast-tests-")
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = path, path
    try:
        yield Path(path)
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(path, ignore_errors=True)


# How the README's test command (`pytest -n 2`, pytest-xdist) shares the suite between its two
# worker processes. Each file runs whole on one worker, so its module-scoped fixtures (shard sets,
# torchrun runs) are built once, as with `--dist loadfile`. The files that start four ranks or a Ray
# cluster form one unit: two of them at once on a 24 GB machine left ~3 GB free. Units are handed
# out in this order, each to the worker that frees up first, so the longest go first and the short
# files fill in at the end (started last, the 4-minute demo would run alone while the other idled).
# The resume file's cases share only session fixtures and take ~1 min each: each is a unit of its
# own, so its ~4 minutes are shared between the workers instead of ending one worker's run late.
MEMORY_HEAVY = ("test_parallel.py", "test_parallel_train.py", "test_multinode.py", "test_make_shards_ray.py")
LONGEST_FIRST = ("memory-heavy", "test_demo.py", "test_resume_is_the_same_run.py", "test_training_faults.py",
                 "test_run_lock.py", "test_eval.py", "test_damaged_shards.py", "test_train_resume.py",
                 "test_profile.py", "test_recipes.py")
PER_TEST_UNITS = ("test_resume_is_the_same_run.py",)


def _group(file_name: str) -> str:
    """The name a test file is scheduled and ordered by: "memory-heavy" for those files, else its own."""
    return "memory-heavy" if file_name in MEMORY_HEAVY else file_name


def _unit(nodeid: str) -> str:
    """The scheduling unit of a test (its nodeid: the path relative to the root, then `::` names)."""
    path = nodeid.split("::", 1)[0]
    name = Path(path).name
    if name in PER_TEST_UNITS:
        return nodeid
    return path if _group(name) == name else _group(name)


@pytest.hookimpl(optionalhook=True)     # called by pytest-xdist only (`-n`)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        """--dist loadfile, with the memory-heavy files as one unit and PER_TEST_UNITS split per
        test. (Not xdist_group marks and --dist loadgroup: pytest 9.2 derives a nodeid from its
        parts, and xdist 3.8's renaming of nodeids by group no longer takes, so every test went
        out on its own.)"""

        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False      # keep the collection order below, not biggest-first
    return FileUnits(config, log)


def pytest_collection_modifyitems(config, items):
    def rank(item: pytest.Item) -> int:
        key = _group(item.path.name)
        return LONGEST_FIRST.index(key) if key in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)                # stable: within a rank, the collection order
