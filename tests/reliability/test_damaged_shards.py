"""A shard damaged after make_shards wrote it: `verify` names the shard and the sample, and training
stops with that name (`--on-corrupt error`, the default) instead of a traceback or a hang.
(`--on-corrupt skip` on the same damage: test_training_faults.py.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile

import pytest
from faults import ALEXNET_FAST, damage_jpeg, run

from alexnet_fast.tools.cli import run_command
from alexnet_fast.tools.cmd_shards import verify_command

SHARD = "train-000001.tar"
TRAIN = [*ALEXNET_FAST, "train", "--device", "cpu", "--arch", "alexnet-owt", "--batch-size", "4", "--workers", "1",
         "--max-steps", "2", "--seed", "3"]

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


def _second_jpeg(tar_path):
    with tarfile.open(tar_path) as tar:
        return [m for m in tar if m.name.endswith(".jpg")][1]


def flip_bytes_inside_a_jpeg(out) -> str:
    """8 bytes inverted in the middle of a JPEG's entropy-coded data: it still decodes (to wrong pixels)."""
    member = _second_jpeg(out / SHARD)
    data = bytearray((out / SHARD).read_bytes())
    for i in range(8):
        data[member.offset_data + member.size // 2 + i] ^= 0xFF
    (out / SHARD).write_bytes(bytes(data))
    return member.name.split(".")[0]


def destroy_a_jpeg_header(out) -> str:
    return damage_jpeg(out / SHARD, out / SHARD.replace(".tar", ".idx"))


def cut_the_tar_short(out) -> str:
    member = _second_jpeg(out / SHARD)
    data = (out / SHARD).read_bytes()
    (out / SHARD).write_bytes(data[: member.offset_data + member.size // 2])   # inside that sample's JPEG
    return member.name.split(".")[0]


def remove_the_index(out) -> str:
    (out / SHARD.replace(".tar", ".idx")).unlink()
    return ""


def change_the_manifest_checksum(out) -> str:
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(s for s in manifest["splits"]["train"]["shards"] if s["tar"] == SHARD)
    entry["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return ""


# damage -> what verify must say about it (besides the shard's name); {key} is the damaged sample
VERIFY_SAYS = {
    flip_bytes_inside_a_jpeg: "sample {key}: .jpg bytes differ from the sha256",
    destroy_a_jpeg_header: "sample {key}: JPEG does not decode",
    cut_the_tar_short: "unreadable tar in sample {key}",
    remove_the_index: "index train-000001.idx is missing",
    change_the_manifest_checksum: "sha256 differs from the manifest",
}


@pytest.mark.parametrize("damage", list(VERIFY_SAYS), ids=lambda f: f.__name__)
def test_verify_names_the_shard_and_sample(damage, train_set, tmp_path, capsys):
    out = tmp_path / "set"
    shutil.copytree(train_set, out)
    key = damage(out)
    with pytest.raises(SystemExit) as exit_info:
        run_command(verify_command, "verify", [str(out), "--workers", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    problems = [line for line in captured.err.splitlines() if line.startswith("verify: ")]
    assert problems and all(f"verify: {SHARD}: " in line for line in problems), captured.err
    assert any(VERIFY_SAYS[damage].format(key=key) in line for line in problems), captured.err
    assert "FAILED" in captured.out


def test_training_stops_naming_the_corrupt_sample(damaged_train_set, tmp_path):
    data, shard, key = damaged_train_set
    done = run([*TRAIN, "--data", str(data), "--out", str(tmp_path / "run")], timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("alexnet-fast: error: corrupt JPEG")
    assert f"{data / shard}, key {key}" in error and "--on-corrupt skip" in error


@pytest.mark.parametrize("damage,says", [
    (cut_the_tar_short, "is cut short"),
    (remove_the_index, "index train-000001.idx of shard"),
], ids=["cut-tar", "missing-index"])
def test_training_on_a_shard_missing_parts_stops_naming_it(damage, says, train_set, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(train_set, out)
    damage(out)
    done = run([*TRAIN, "--data", str(out), "--out", str(tmp_path / "run")], timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("alexnet-fast: error: ") and says in error and str(out / SHARD) in error
    assert "verify" in error and "--on-corrupt skip" in error


@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
def test_a_missing_tar_stops_the_run_in_both_modes(on_corrupt, train_set, tmp_path):
    """A shard the manifest lists whose tar is gone: nothing of it is left to read or skip, so
    `--on-corrupt skip` stops too, naming it, before any step and with no checkpoint written."""
    out = tmp_path / "set"
    shutil.copytree(train_set, out)
    (out / SHARD).unlink()
    run_dir = tmp_path / "run"
    done = run([*TRAIN, "--data", str(out), "--out", str(run_dir), "--on-corrupt", on_corrupt], timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error == (f"alexnet-fast: error: shard {out / SHARD} is missing: run `alexnet-fast verify {out}` "
                     "and re-make the damaged shards"), error
    assert not list(run_dir.glob("*.pt"))


def test_training_with_skip_goes_on_past_a_cut_short_shard_and_says_so(train_set, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(train_set, out)
    key = cut_the_tar_short(out)
    done = run([*TRAIN, "--data", str(out), "--out", str(tmp_path / "run"), "--on-corrupt", "skip"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1, done.stderr
    assert f"shard {out / SHARD} is cut short" in warnings[0] and f"samples from key {key} on are lost" in warnings[0]
    assert "lost sample(s) skipped" in warnings[0]


@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
def test_verify_shards_catches_a_jpeg_that_changed_but_still_decodes(on_corrupt, train_set, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(train_set, out)
    key = flip_bytes_inside_a_jpeg(out)
    run_dir = tmp_path / "run"
    done = run([*TRAIN, "--data", str(out), "--out", str(run_dir), "--verify-shards", "--on-corrupt", on_corrupt],
               timeout=300)
    assert "Traceback" not in done.stderr
    named = f"shard {out / SHARD}: sample(s) {key} changed since make_shards wrote them"
    if on_corrupt == "error":
        assert done.returncode == 1, done.stderr[-3000:]
        error = done.stderr.strip().splitlines()[-1]
        assert error.startswith("alexnet-fast: error: ") and named in error and "--on-corrupt skip" in error
        return
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(named in line and "left out" in line for line in done.stderr.splitlines() if "warning:" in line)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "val_top1" in line]
    assert [r.get("skipped_samples") for r in epochs] == [1]     # all 8 samples are drawn in the one epoch


def test_a_changed_jpeg_is_caught_by_the_background_hash_check_by_default(train_set, tmp_path):
    """Without --verify-shards the shards are hashed against the manifest behind the first epoch:
    the result is in the epoch's record, the epoch's checkpoint is written, and (--on-corrupt
    error, the default) the run stops with one line naming the shard and the sample."""
    out = tmp_path / "set"
    shutil.copytree(train_set, out)
    key = flip_bytes_inside_a_jpeg(out)
    run_dir = tmp_path / "run"
    done = run([*TRAIN, "--data", str(out), "--out", str(run_dir)], timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("alexnet-fast: error: ") and "--on-corrupt skip" in error and "--resume" in error
    assert f"shard {out / SHARD}: sample(s) {key} changed since make_shards wrote them" in error
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_top1" in line]
    assert epochs[-1]["shard_check"] | {"seconds": 0} == {"shards": 3, "differ": 1, "changed_samples": 1, "seconds": 0}
    assert (run_dir / "last.pt").is_file()


def test_a_corrupt_sample_on_one_of_two_ranks_ends_the_run_at_once_naming_it(damaged_train_set, tmp_path):
    """Only the rank whose range holds the sample fails; the other is waiting in the gradient
    all-reduce. The failed rank exits at once so the launcher stops the group (no collective
    timeout), and its message reaches the command's one error line."""
    data, shard, key = damaged_train_set
    try:        # 300 s: generous on a busy machine, and half the 10-minute collective timeout
        done = run([*TRAIN, "--data", str(data), "--out", str(tmp_path / "run"), "--nproc", "2"], timeout=300,
                   extra_env={"OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"still running after {e.timeout:.0f} s: the other rank waits in its collective")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("alexnet-fast: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("alexnet-fast: error: rank ") and "corrupt JPEG" in errors[0]
    assert f"{data / shard}, key {key}" in errors[0]
