"""A run is the run it was: `train --resume` and `eval` refuse data or flags that do not fit the
checkpoint, `train` refuses a class count or batch its data cannot fill, and make_shards refuses an
OUT that overlaps RAW: one line on stderr, exit 2, and nothing in the run directory (or the raw
tree) changed: every file's bytes, size and mtime (checkpoints: inode, size, mtime) as before.

Real commands on real shard sets: `train_set` (2 classes), the same images sharded 2 per shard
instead of 4 (same classes, other shards), and the same tree with its class folders renamed (as
many classes, other wnids). One short run (1 step) gives the checkpoint all of them are held to.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from faults import ALEXNET_FAST, MAKE_SHARDS, QUIET, env, one_error_line, run

from alexnet_fast.model.identity import DataIdentity
from alexnet_fast.pipeline.shardset import ShardSet
from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

FLAGS = ["--device", "cpu", "--arch", "alexnet-owt", "--batch-size", "4", "--workers", "1", "--seed", "3",
         "--log-every", "1"]
TRAIN = [*ALEXNET_FAST, "train", *FLAGS]
# a command that ought to be refused but is not still ends soon (the test then fails on its exit code)
BOUNDED = ["--max-steps", "2"]

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under `root` (hidden ones too): checkpoints by (inode, size, mtime) -- they are
    only ever replaced by rename --, every other file by its bytes and mtime as well."""
    def state(path: Path) -> tuple:
        st = path.stat()
        content = None if path.suffix == ".pt" else path.read_bytes()
        return st.st_ino, st.st_size, st.st_mtime_ns, content
    return {p.relative_to(root).as_posix(): state(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sets(train_set, tmp_path_factory) -> dict[str, Path]:
    """"trained": train_set; "resharded": its images in other shards (same classes);
    "other_wnids": as many classes under other wnids; "raw": the raw tree of the last two."""
    root = tmp_path_factory.mktemp("identity")
    raw = write_raw_imagenet(root / "raw", SampleSpec(classes=2, train_per_class=4, val_per_class=2, min_side=64,
                                                      max_side=96, odd_files=False, val_layout=ValFormat.FOLDERS))
    make_shards(raw.root, root / "resharded", ShardOptions(per_shard=2), workers=1, **QUIET)
    renamed = root / "raw_renamed"
    shutil.copytree(raw.root, renamed)
    for split in ("train", "val"):
        for i, folder in enumerate(sorted((renamed / split).iterdir())):
            folder.rename(folder.with_name(f"n0999999{i}"))
    make_shards(renamed, root / "other_wnids", ShardOptions(per_shard=4), workers=1, **QUIET)
    return {"trained": train_set, "resharded": root / "resharded", "other_wnids": root / "other_wnids",
            "raw": raw.root}


@pytest.fixture(scope="module")
def trained_run(sets, tmp_path_factory) -> Path:
    """A run of one step on `train_set`: RUN/last.pt records its arch, classes and shard set."""
    run_dir = tmp_path_factory.mktemp("identity_run") / "run"
    done = run([*TRAIN, "--data", str(sets["trained"]), "--out", str(run_dir), "--max-steps", "1"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def refused(args: list[str], says: list[str], untouched: Path) -> str:
    """Run `args`; assert exit 2, one line on stderr holding every part of `says`, nothing on
    stdout, and nothing under `untouched` changed. Returns the line."""
    before = snapshot(untouched) if untouched.exists() else None
    done = run(args, timeout=180)
    line = one_error_line(done.stderr)
    assert done.returncode == 2, done.stderr
    assert all(part in line for part in says), line
    assert done.stdout == ""
    assert (snapshot(untouched) if untouched.exists() else None) == before
    return line


@pytest.mark.parametrize("data,flags,says", [
    ("other_wnids", [], ["has other classes: 2 of 2 wnids differ", "class 0 is n09999990 there, n01440764 in "
                                                                   "training"]),
    ("resharded", [], ["is another shard set with the same classes", "pass --allow-other-data"]),
    ("trained", ["--arch", "alexnet2012"], ["it is alexnet-owt, not --arch alexnet2012"]),
    ("trained", ["--num-classes", "3"], ["it has 2 outputs, not 3", "--num-classes 2"]),
], ids=["other-wnids", "other-shards", "other-arch", "other-class-count"])
def test_resume_refuses_what_does_not_fit_the_checkpoint_before_touching_run(data, flags, says, sets, trained_run):
    line = refused([*TRAIN, "--data", str(sets[data]), "--out", str(trained_run), "--resume", *flags, *BOUNDED],
                   [f"--resume: {trained_run / 'last.pt'} cannot continue here: ", *says], trained_run)
    assert line.startswith("alexnet-fast: error: ") and line.endswith("or train into another --out")


def test_allow_other_data_continues_on_the_other_shard_set(sets, trained_run, tmp_path):
    """The flag the refusal names does what it says: the run goes on from its checkpoint on the
    other shard set, and its next checkpoint records that set."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, copy_function=os.link)   # checkpoints are replaced by rename, never rewritten
    for small in ("config.json", "metrics.jsonl"):
        (copy / small).unlink()
        shutil.copy2(trained_run / small, copy / small)
    done = run([*TRAIN, "--data", str(sets["resharded"]), "--out", str(copy), "--resume", "--allow-other-data",
                "--max-steps", "2"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {copy / 'last.pt'}: epoch 0, step 1" in done.stdout
    import torch
    saved = torch.load(copy / "last.pt", map_location="cpu", weights_only=False, mmap=True)
    assert saved["step"] == 2 and saved["data"] == DataIdentity.of(ShardSet.open(sets["resharded"])).as_dict()


def test_the_data_fingerprint_is_the_shards_not_their_path(sets, tmp_path):
    """A shard set copied elsewhere is the same data (a resume from it needs no flag); the same
    images in other shards are not."""
    copy = tmp_path / "moved"
    shutil.copytree(sets["trained"], copy)
    trained = DataIdentity.of(ShardSet.open(sets["trained"]))
    assert DataIdentity.of(ShardSet.open(copy)) == trained
    assert DataIdentity.of(ShardSet.open(sets["resharded"])).fingerprint != trained.fingerprint


def test_eval_refuses_a_shard_set_with_other_wnids(sets, trained_run):
    """Same number of classes, other wnids: labels would mean other classes (scored ~chance before)."""
    refused([*ALEXNET_FAST, "eval", "--device", "cpu", "--data", str(sets["other_wnids"]),
             "--checkpoint", str(trained_run)],
            ["has other classes: 2 of 2 wnids differ", f"{trained_run / 'last.pt'} cannot be scored on it"],
            trained_run)


@pytest.mark.parametrize("flags,says", [
    (["--num-classes", "1"], ["--num-classes 1 is fewer than the 2 classes of --data", "labels go up to 1"]),
    (["--batch-size", "16"], ["--batch-size 16 is more than the 8 train images of --data", "no full batch"]),
], ids=["num-classes-below-the-data", "batch-above-the-data"])
def test_train_refuses_a_run_its_data_cannot_fill_before_creating_run(flags, says, sets, tmp_path):
    run_dir = tmp_path / "run"
    refused([*TRAIN, "--data", str(sets["trained"]), "--out", str(run_dir), *flags, *BOUNDED], says, run_dir)
    assert not run_dir.exists()


@pytest.mark.parametrize("out,says", [
    ("{data}", "is the shard set --data"),
    ("{data}/run", "is inside the shard set --data"),
], ids=["out-is-data", "out-inside-data"])
def test_train_refuses_to_write_its_run_into_the_shard_set(out, says, sets):
    data = sets["trained"]
    refused([*TRAIN, "--data", str(data), "--out", out.format(data=data), *BOUNDED], [says, "go outside it"], data)
    assert not (data / "run").exists()


@pytest.mark.parametrize("out,says", [
    ("{raw}", "is RAW itself"),
    ("{raw}/shards", "is inside RAW"),
    ("{raw}/train/shards", "is inside RAW"),
    ("{parent}", "holds RAW"),
], ids=["out-is-raw", "out-inside-raw", "out-inside-a-split", "raw-inside-out"])
def test_make_shards_refuses_an_out_that_overlaps_raw(out, says, sets):
    raw = sets["raw"]
    line = refused([*MAKE_SHARDS, str(raw), out.format(raw=raw, parent=raw.parent), "--workers", "1"],
                   [says, "the shards must be written outside the raw tree", f"(e.g. {raw}-shards)"], raw.parent)
    assert line.startswith("make_shards: error: OUT ")


def test_data_pointing_at_a_raw_tree_suggests_an_out_beside_it(sets, tmp_path):
    raw = sets["raw"]
    line = refused([*ALEXNET_FAST, "train", "--data", str(raw), "--out", str(tmp_path / "run")],
                   ["looks like raw ImageNet, not a shard set", f"`alexnet-fast shards {raw} {raw}-shards`"], raw)
    assert not (tmp_path / "run").exists()
    assert "shards RAW" not in line


def test_ctrl_c_to_a_two_process_run_is_one_line(sets, tmp_path, wait_for_step):
    """SIGINT to the whole process group (what Ctrl-C does): the launcher and both workers get it,
    the launcher passes SIGTERM on as well. One line says so, naming SIGINT and the checkpoint
    step, on its own line of stdout; stderr holds nothing but the progress bar."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*TRAIN, "--data", str(sets["trained"]), "--out", str(run_dir), "--nproc", "2",
                             "--epochs", "3"], env=env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_step(run_dir, 1, [proc], timeout=180)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    said = [line for line in (out + "\n" + err).split("\n") if "stopped" in line or "signal" in line]
    import torch
    step = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False, mmap=True)["step"]
    assert said == [f"stopped by SIGINT: {run_dir / 'last.pt'} holds step {step} (continue with --resume --out "
                    f"{run_dir})"], (out[-2000:], err[-2000:])
    bar_only = [part for part in err.replace("\r", "\n").split("\n") if part.strip()]
    assert all(part.startswith("epoch ") for part in bar_only), err[-2000:]



def test_a_run_error_after_its_progress_bar_is_a_line_of_its_own(sets, tmp_path):
    """A run that fails once its progress bar is drawn (an lr that makes the loss inf at step 2)
    prints its error as a whole line: split at newlines only, not after the bar's carriage returns
    (a pipe here; on a terminal the line is erased first)."""
    # bytes, not text=True: universal newlines would turn the bar's carriage returns into newlines
    done = subprocess.run([*TRAIN, "--data", str(sets["trained"]), "--out", str(tmp_path / "run"), "--lr", "1e30",
                           "--max-steps", "4"], capture_output=True, env=env(), timeout=300)
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr[-3000:]
    assert "\r" in stderr and "|" in stderr, "the progress bar was drawn before the failure"
    assert stderr.endswith("\n")
    last = stderr[:-1].split("\n")[-1]
    assert last.startswith("alexnet-fast: error: loss became NaN/inf at step 2"), repr(stderr[-400:])
