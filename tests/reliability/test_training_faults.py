"""Training runs that meet a corrupt sample, a full disk while checkpointing, a checkpoint cut
short, a SIGKILL in the middle of saving a checkpoint, and a SIGTERM. (SIGKILL mid-epoch + resume
with equal losses, and SIGTERM to a 2-process run, are tests/test_train_resume.py.)

One short real run is shared: `alexnet-fast train --on-corrupt skip` over a shard set with one
undecodable JPEG, 3 steps of batch 4 (2 steps per epoch), a checkpoint every 2 steps and at each
epoch end. Its run directory ends with last.pt (step 3) and last.prev.pt (the end of epoch 0).
Tests that change the run directory work on a copy whose checkpoints are hard links: checkpoints
are only ever replaced by rename, never rewritten in place, so the copy costs no disk and the
shared run stays intact (its small files, rewritten in place, are copied).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from faults import ALEXNET_FAST, KILLPOINT, REPO, env, limits, run

TRAIN = [*ALEXNET_FAST, "train", "--device", "cpu", "--arch", "alexnet-owt", "--batch-size", "4", "--workers", "1",
         "--seed", "3", "--lr", "0.005", "--log-every", "1", "--ckpt-every", "2", "--on-corrupt", "skip"]
CHECKPOINT_FILES = ("last.pt", "last.prev.pt", "best.pt")

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "val_top1" not in r}


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _linked_copy(run_dir: Path, dst: Path) -> Path:
    """The checkpoints hard-linked (only ever replaced by rename), every other file copied:
    metrics.jsonl and config.json are rewritten in place by a resumed run, which through a link
    would change the shared run's own (a later test then compared against another run's steps)."""
    def link_checkpoints(src: str, target: str) -> None:
        (os.link if src.endswith(".pt") else shutil.copy2)(src, target)

    shutil.copytree(run_dir, dst, copy_function=link_checkpoints)
    return dst


@pytest.fixture(scope="module")
def skip_run(damaged_train_set, tmp_path_factory):
    data, shard, key = damaged_train_set
    run_dir = tmp_path_factory.mktemp("skip_run") / "run"
    done = run([*TRAIN, "--data", str(data), "--out", str(run_dir), "--max-steps", "3"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return data, run_dir, done


def test_corrupt_sample_is_skipped_and_counted(skip_run):
    _, run_dir, done = skip_run
    assert "Traceback" not in done.stderr
    epochs = [r for r in _records(run_dir) if "val_top1" in r]
    assert [r["skipped_samples"] for r in epochs] == [1, 1]     # found again in epoch 1, counted once
    assert sorted(_step_losses(run_dir)) == [1, 2, 3]
    assert torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["step"] == 3


def test_disk_full_while_checkpointing_keeps_the_last_good_one(skip_run, tmp_path):
    data, run_dir, _ = skip_run
    copy = _linked_copy(run_dir, tmp_path / "run")
    before = {name: _identity(copy / name) for name in CHECKPOINT_FILES}
    # A checkpoint is ~450 MB; files may grow to 64 MiB: metrics and config still write, the
    # checkpoint's temp file fails with EFBIG part-way, as on a disk that fills up.
    full = run([*TRAIN, "--data", str(data), "--out", str(copy), "--max-steps", "4", "--resume"],
               preexec=limits(file_size=64 << 20), timeout=300)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    error = full.stderr.strip().splitlines()[-1]
    assert error == (f"alexnet-fast: error: cannot write a checkpoint to {copy} at step 4: File too large; "
                     "last.pt still holds the previous one")
    assert {name: _identity(copy / name) for name in CHECKPOINT_FILES} == before   # not touched at all
    assert not [p.name for p in copy.iterdir() if ".tmp" in p.name]


def test_a_failed_checkpoint_write_ends_a_two_process_run_naming_rank_0(train_set, tmp_path):
    """2 gloo processes; rank 0's checkpoint write at step 2 fails (the file-size limit: EFBIG, as a
    full disk fails it) while rank 1 would go on to step 3: the run ends (within the 300 s guard,
    far below the collective timeout rank 1 would otherwise wait out) with one error line naming
    rank 0 and the cause, and leaves no checkpoint or temp file."""
    run_dir = tmp_path / "run"
    done = run([*TRAIN, "--data", str(train_set), "--out", str(run_dir), "--max-steps", "3", "--nproc", "2"],
               preexec=limits(file_size=64 << 20), timeout=300, extra_env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("alexnet-fast: error:")]
    assert errors == [f"alexnet-fast: error: rank 0: cannot write a checkpoint to {run_dir} at step 2: File too "
                      "large; no checkpoint was written"], done.stderr[-3000:]
    assert sorted(_step_losses(run_dir)) == [1, 2]          # no rank went on to step 3
    assert not [p.name for p in run_dir.iterdir() if p.suffix == ".pt" or ".tmp" in p.name]


def _cut_short(path: Path) -> None:
    whole = path.read_bytes()
    path.unlink()                                   # a new file: the shared run keeps its own
    path.write_bytes(whole[: len(whole) // 3])


def _bytes_changed(path: Path) -> None:
    """16 bytes inverted a quarter into the file, inside fc6's weight (the model's tensors come first,
    fc6's 151 MB of them most): torch.load still reads it."""
    data = bytearray(path.read_bytes())
    for i in range(16):
        data[len(data) // 4 + i] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_cut_short, _bytes_changed], ids=["cut-short", "bytes-changed"])
def test_damaged_last_pt_is_detected_the_previous_one_used_and_kept(damage, skip_run, tmp_path):
    """last.pt cut short, or with bytes changed inside a tensor (caught by the sha256 the file
    carries: torch.load alone reads it without complaint): one warning, the run resumes from
    last.prev.pt and replays exactly, and its next save replaces the bad last.pt instead of rotating
    it into last.prev.pt over the good one."""
    data, run_dir, _ = skip_run
    copy = _linked_copy(run_dir, tmp_path / "run")
    previous = torch.load(copy / "last.prev.pt", map_location="cpu", weights_only=False)
    good_previous = _identity(copy / "last.prev.pt")
    damage(copy / "last.pt")
    expected = _step_losses(run_dir)

    resumed = run([*TRAIN, "--data", str(data), "--out", str(copy), "--max-steps", "3", "--resume"], timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "last.pt" in warnings[0] and "previous good checkpoint" in warnings[0]
    assert ("damaged or truncated" if damage is _cut_short else "no longer match the sha256") in warnings[0]
    assert (f"resumed from {copy / 'last.prev.pt'}: epoch {previous['epoch']}, step {previous['step']}"
            in resumed.stdout)
    got = _step_losses(copy)
    assert sorted(got) == [1, 2, 3]
    # the steps after the fallback point replay the uninterrupted run exactly (fixed seed, CPU)
    later = [s for s in got if s > previous["step"]]
    assert later and [got[s] for s in later] == [expected[s] for s in later]
    assert torch.load(copy / "last.pt", map_location="cpu", weights_only=False)["step"] == 3
    # the one save of the resumed run (step 3) replaced the bad file: the good fallback is untouched
    assert _identity(copy / "last.prev.pt") == good_previous


def test_best_pt_is_a_weights_only_file_of_its_own(skip_run):
    """best.pt shares no inode with last.pt or last.prev.pt (damage to one is not damage to
    another), holds the weights and what eval needs, no optimizer state, and passes its own check."""
    from alexnet_fast.model.checkpoint import read_checkpoint

    _, run_dir, _ = skip_run
    best = run_dir / "best.pt"
    assert best.stat().st_ino not in {(run_dir / name).stat().st_ino for name in ("last.pt", "last.prev.pt")}
    weights = read_checkpoint(best)             # checks the sha256 it carries
    assert weights["kind"] == "weights" and "optimizer" not in weights and "rng" not in weights
    assert {"model", "arch", "num_classes", "classes", "config", "best_top1"} <= set(weights)
    assert best.stat().st_size < 0.55 * (run_dir / "last.pt").stat().st_size     # no momentum buffers


def test_every_last_pt_damaged_names_best_pt_and_init_from_starts_from_it(skip_run, tmp_path):
    data, run_dir, _ = skip_run
    copy = _linked_copy(run_dir, tmp_path / "run")
    for name in ("last.pt", "last.prev.pt"):
        _cut_short(copy / name)
    refused = run([*TRAIN, "--data", str(data), "--out", str(copy), "--max-steps", "3", "--resume"], timeout=900)
    assert refused.returncode == 1, refused.stderr[-3000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert "Traceback" not in refused.stderr and error.startswith("alexnet-fast: error: no usable checkpoint")
    assert f"{copy / 'best.pt'} is intact" in error and f"--init-from {copy / 'best.pt'} instead of --resume" in error

    # --lr 1e-30: each update is far below a weight's float32 resolution, so the run's one step leaves
    # them as they were and its last.pt holds best.pt's weights: they were loaded
    fresh = tmp_path / "fresh"
    started = run([*TRAIN, "--data", str(data), "--out", str(fresh), "--max-steps", "1", "--lr", "1e-30",
                   "--init-from", str(copy / "best.pt")], timeout=900)
    assert started.returncode == 0, started.stderr[-3000:]
    assert f"weights from {copy / 'best.pt'}; optimizer, lr schedule and step count start afresh" in started.stdout
    best = torch.load(copy / "best.pt", map_location="cpu", weights_only=False)["model"]
    final = torch.load(fresh / "last.pt", map_location="cpu", weights_only=False)
    assert final["step"] == 1
    # (a weight that was exactly 0 may now be ~1e-32: still nothing like a fresh init's values)
    assert all(torch.allclose(value, final["model"][name], rtol=1e-6, atol=1e-20) for name, value in best.items())


def test_sigkill_between_the_checkpoint_renames_then_resume_matches(skip_run, tmp_path):
    """The 3rd save (step 3) is killed after last.pt became last.prev.pt and before the complete
    last.pt.tmp was renamed to last.pt: the one instant with no last.pt at all."""
    data, run_dir, _ = skip_run
    out = tmp_path / "run"
    cli = str(REPO / "tools" / "cli.py")
    flags = [*TRAIN[3:], "--data", str(data), "--out", str(out), "--max-steps", "3"]
    # TMPDIR: what a killed process cannot clean up (the skip mode's patched indices) stays in tmp_path
    killed = run([*KILLPOINT, str(out), "--kill", "last.pt:before:3", "--", cli, *flags], timeout=300,
                 extra_env={"TMPDIR": str(tmp_path)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "last.pt").exists() and (out / "last.prev.pt").exists() and list(out.glob("last.pt.tmp.*"))

    resumed = run([*TRAIN, "--data", str(data), "--out", str(out), "--max-steps", "3", "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "last.pt missing" in warnings[0], resumed.stderr[-3000:]
    assert f"resumed from {out / 'last.prev.pt'}: epoch 1, step 2" in resumed.stdout
    assert _step_losses(out) == _step_losses(run_dir)
    final, reference = (torch.load(d / "last.pt", map_location="cpu", weights_only=False) for d in (out, run_dir))
    assert final["step"] == reference["step"] == 3
    for name, value in reference["model"].items():
        assert torch.equal(value, final["model"][name]), name
    assert not list(out.glob("last.pt.tmp*"))        # the killed writer's temp file was cleaned up


def test_sigkill_during_a_background_checkpoint_write_then_resume_matches(skip_run, tmp_path):
    """Checkpoints are written on a background thread while training goes on. The 3rd save (step 3)
    is killed in the middle of its write, at the temp file's fsync, on that thread: last.pt is
    still the whole step-2 checkpoint, and the resumed run ends bitwise equal to the uninterrupted one."""
    data, run_dir, _ = skip_run
    out, note = tmp_path / "run", tmp_path / "killed-in"
    cli = str(REPO / "tools" / "cli.py")
    flags = [*TRAIN[3:], "--data", str(data), "--out", str(out), "--max-steps", "3"]
    killed = run([*KILLPOINT, str(out), "--kill", "last.pt:during:3", "--", cli, *flags], timeout=300,
                 extra_env={"TMPDIR": str(tmp_path), "KILLPOINT_NOTE": str(note)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert note.read_text() == "checkpoint writer"          # the kill hit the background write
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["step"] == 2

    resumed = run([*TRAIN, "--data", str(data), "--out", str(out), "--max-steps", "3", "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'}: epoch 1, step 2" in resumed.stdout
    assert _step_losses(out) == _step_losses(run_dir)
    final, reference = (torch.load(d / "last.pt", map_location="cpu", weights_only=False) for d in (out, run_dir))
    assert final["step"] == reference["step"] == 3
    for name, value in reference["model"].items():
        assert torch.equal(value, final["model"][name]), name


def test_sigint_saves_a_checkpoint_and_exits_0_within_seconds(train_set, tmp_path):
    """SIGINT (Ctrl-C) to one process; SIGTERM (a scheduler's preemption) goes to the 2-process run
    of tests/test_train_resume.py and the two-node one of tests/test_multinode.py: one handler takes
    both. How many seconds a stop takes is benchmarks/stop_latency.py's figure; here 120 s only
    tells a hang from a stop."""
    stop = signal.SIGINT
    out = tmp_path / "run"
    proc = subprocess.Popen([*TRAIN, "--data", str(train_set), "--out", str(out), "--epochs", "50"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "no step was logged"
            time.sleep(0.05)
        proc.send_signal(stop)
        sent = time.monotonic()
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {time.monotonic() - sent:.0f} s after {stop.name}: a hang, not a stop")
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"{stop.name} to exit: {time.monotonic() - sent:.1f} s")
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert f"stopped by {stop.name} at step {saved['step']}: checkpoint written to {out / 'last.pt'}" in stdout
    assert saved["step"] >= 1
