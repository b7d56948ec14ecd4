"""make_shards killed (SIGKILL) again and again, and a disk that fills up under it: rerunning the same
command always ends with the bytes of one uninterrupted run, and a good file is never replaced by
half of one.

Kill points are drawn with a fixed seed from the files an uninterrupted run writes, in the order it
writes them (shard index, shard tar, resume sidecar per shard, then stats.json and manifest.json),
each just before or just after the file is renamed into place, or in the middle of writing a shard;
killpoint.py delivers the SIGKILL from inside the real process at that moment.
"""
from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest
from faults import KILLPOINT, MAKE_SHARDS, limits, run, tree_bytes

SEED = 2012
KILLS_DURING_SHARDS = 5      # + 1 kill after the last shard (statistics or manifest)
FLAGS = ["--per-shard", "3", "--no-progress"]

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


def _command(raw: Path, out: Path, workers: int) -> list[str]:
    return [str(raw), str(out), *FLAGS, "--workers", str(workers)]


@pytest.fixture(scope="module")
def reference(tiny_raw, tmp_path_factory) -> tuple[Path, list[str]]:
    """One uninterrupted run (1 worker) and the files it made final, in the order it did."""
    out = tmp_path_factory.mktemp("reference") / "out"
    trace = out.parent / "trace.txt"
    done = run([*KILLPOINT, str(out), "--trace", str(trace), "--", *MAKE_SHARDS[1:], *_command(tiny_raw.root, out, 1)])
    assert done.returncode == 0, done.stderr[-3000:]
    writes = trace.read_text().split()
    assert writes[-2:] == ["stats.json", "manifest.json"]
    return out, writes


def _kill_at(raw: Path, out: Path, target: str, when: str) -> None:
    killed = run([*KILLPOINT, str(out), "--kill", f"{target}:{when}", "--", *MAKE_SHARDS[1:],
                  *_command(raw, out, 2)])
    assert killed.returncode == -signal.SIGKILL, f"not killed at {target}:{when}\n{killed.stderr[-3000:]}"
    assert (out / "manifest.json").exists() == (target == "manifest.json" and when == "after")


def test_killed_at_seeded_random_points_then_identical_bytes(tiny_raw, reference, tmp_path):
    ref_out, writes = reference
    rng = random.Random(SEED)
    shard_writes = range(len(writes) - 2)
    points = sorted(rng.sample(shard_writes, KILLS_DURING_SHARDS)) + [rng.choice([len(writes) - 2, len(writes) - 1])]
    out = tmp_path / "out"
    for point in points:     # each rerun resumes from what the previous kill left, and is killed later on
        _kill_at(tiny_raw.root, out, writes[point], rng.choice(["before", "after"]))

    final = run([*MAKE_SHARDS, *_command(tiny_raw.root, out, 2)])
    assert final.returncode == 0, final.stderr[-3000:]
    # shards, indices, stats.json and manifest.json identical; no temp file or resume state left
    assert tree_bytes(out) == tree_bytes(ref_out)


def test_killed_while_writing_a_shard_then_identical_bytes(tiny_raw, reference, tmp_path):
    """Killed inside the write of a shard's temp file (half its bytes on disk), twice: a train tar,
    then, in the rerun that resumes from it, the val tar. The next run ends with the bytes of one
    uninterrupted run and no temp file."""
    ref_out, writes = reference
    ref_files = tree_bytes(ref_out)
    train_tars = [name for name in writes if name.startswith("train-") and name.endswith(".tar")]
    val_tar = next(name for name in writes if name.startswith("val-") and name.endswith(".tar"))
    out = tmp_path / "out"
    for target in (train_tars[len(train_tars) // 2], val_tar):
        _kill_at(tiny_raw.root, out, target, "midway")
        half = list(out.glob(f"{target}.tmp.*"))
        assert len(half) == 1 and half[0].stat().st_size == len(ref_files[target]) // 2, half
        assert not (out / target).exists()

    final = run([*MAKE_SHARDS, *_command(tiny_raw.root, out, 2)])
    assert final.returncode == 0, final.stderr[-3000:]
    assert tree_bytes(out) == ref_files


def test_disk_full_keeps_the_good_files_and_a_rerun_finishes(tiny_raw, reference, tmp_path):
    ref_out, writes = reference
    out = tmp_path / "out"
    # A previous run died with train-000002.tar complete but before its sidecar marked it done:
    # the next run rewrites that shard, so a failed write could replace a good file.
    _kill_at(tiny_raw.root, out, ".make_shards/train-000002.json", "before")
    good = tree_bytes(out)
    assert "train-000002.tar" in good

    # Every later shard tar is larger than this limit; the indices and sidecars are smaller.
    smallest_tar = min(len(data) for name, data in tree_bytes(ref_out).items() if name.endswith(".tar"))
    full = run([*MAKE_SHARDS, *_command(tiny_raw.root, out, 1)], preexec=limits(file_size=smallest_tar // 2))
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    error = full.stderr.strip().splitlines()[-1]
    assert error.startswith("make_shards: error: cannot write ") and "train-000002.tar" in error
    assert "File too large" in error and "rerun" in error
    after = tree_bytes(out)
    assert after["train-000002.tar"] == good["train-000002.tar"]       # the good file was not replaced
    assert {n: d for n, d in after.items() if n.endswith(".tar")} == {n: d for n, d in good.items() if n.endswith(".tar")}
    assert not [n for n in after if ".tmp" in n] and "manifest.json" not in after

    rerun = run([*MAKE_SHARDS, *_command(tiny_raw.root, out, 1)])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "reused from an interrupted run" in rerun.stdout
    assert tree_bytes(out) == tree_bytes(ref_out)
