"""Shared fixtures: a small raw ImageNet tree and the shard set make_shards builds from it.

Both are session-scoped and built once through the real code (generator -> make_shards), so every
test reads the same real shards. Other helpers may append fixtures at the end of this file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from alexnet_fast.tools.sample_data import RawTree, SampleSpec, ValFormat, write_raw_imagenet
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

# 4 classes x 16 train (+4 odd files kept, 3 rejected) and 4 val per class, labelled by the devkit.
SHARD_SET_SPEC = SampleSpec(classes=4, train_per_class=16, val_per_class=4, val_layout=ValFormat.FLAT_DEVKIT)
SHARD_SET_OPTIONS = ShardOptions(per_shard=16)  # 68 train samples -> 5 train shards, 1 val shard


# pytest's tmp_path folders (every run's checkpoints: ~0.5 GB each for alexnet-owt with its momentum)
# go to RAM when it has room: writing and fsyncing them on disk is ~13% of the slow tests' time
# (190 s against 165 s for the resume and parallel-train tests on a 2-core VM, 2026-12-03). The
# suite holds at most RAM_TEMP_PEAK of them at once (pyproject's tmp_path_retention_policy =
# "failed" removes each passed test's folder at its teardown); with less than RAM_TEMP_MARGIN free,
# with --basetemp given, or with ALEXNET_FAST_TEST_TMP=disk, they stay where pytest puts them.
RAM_TEMP = Path("/dev/shm")
RAM_TEMP_PEAK = 6 * 2**30
RAM_TEMP_MARGIN = 2 * RAM_TEMP_PEAK


@pytest.hookimpl(tryfirst=True)        # before pytest's tmpdir plugin reads --basetemp
def pytest_configure(config):
    if config.option.basetemp is not None or os.environ.get("ALEXNET_FAST_TEST_TMP") == "disk":
        return
    if not (RAM_TEMP.is_dir() and os.access(RAM_TEMP, os.W_OK)
            and shutil.disk_usage(RAM_TEMP).free >= RAM_TEMP_MARGIN):
        return
    config.option.basetemp = tempfile.mkdtemp(prefix="alexnet-fast-pytest-", dir=RAM_TEMP)
    config.stash[_ram_basetemp] = Path(config.option.basetemp)


_ram_basetemp = pytest.StashKey[Path]()


def pytest_sessionfinish(session, exitstatus):
    """A RAM basetemp is ours to remove (pytest removes only one it chose itself): at once when
    every test passed; kept, and said, when one failed (its folder is what tells why)."""
    path = session.config.stash.get(_ram_basetemp, None)
    if path is None or not path.exists():
        return
    if exitstatus == 0:
        shutil.rmtree(path, ignore_errors=True)
    else:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\nthe failed tests' folders are kept in RAM, in {path}: remove it when done")


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
    the machine use /tmp too). pytest's own tmp_path folders are placed before the switch (in RAM
    or where pytest keeps them: see pytest_configure above). A short path: Unix socket paths (gloo, Ray) allow 107 bytes."""
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
