"""`alexnet-fast verify OUT`: passes a good set, names the shard of any damage, exits non-zero."""
from __future__ import annotations

import shutil
import tarfile

import pytest

from alexnet_fast.pipeline.shardset import ShardSet
from alexnet_fast.tools.cli import run_command
from alexnet_fast.tools.cmd_shards import verify_command


def _verify(out, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_command(verify_command, "verify", [str(out), "--workers", "1"])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def copy(shard_set, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(shard_set, out)
    return out


def test_good_set_passes(shard_set, capsys):
    code, out, _ = _verify(shard_set, capsys)
    total = sum(ShardSet.open(shard_set).num_samples(s) for s in ("train", "val"))
    assert code == 0 and f"{total} samples checked: OK" in out


def test_flipped_byte_in_a_jpeg_names_shard_and_sample(copy, capsys):
    tar_path = copy / "train-000001.tar"
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    data = bytearray(tar_path.read_bytes())
    data[member.offset_data + 2] ^= 0xFF  # inside the JPEG's SOI/APP0 header: it no longer decodes
    tar_path.write_bytes(bytes(data))
    code, _, err = _verify(copy, capsys)
    assert code == 1
    assert "train-000001.tar: sha256 differs" in err
    assert f"train-000001.tar: sample {member.name.split('.')[0]}: JPEG does not decode" in err


def test_truncated_tar_fails_naming_the_shard(copy, capsys):
    tar_path = copy / "val-000000.tar"
    tar_path.write_bytes(tar_path.read_bytes()[:20000])
    code, _, err = _verify(copy, capsys)
    assert code == 1 and "val-000000.tar:" in err and "train-" not in err


def test_missing_index_is_detected(copy, capsys):
    (copy / "train-000002.idx").unlink()
    code, _, err = _verify(copy, capsys)
    assert code == 1 and "train-000002.tar: index train-000002.idx is missing" in err


def test_not_a_shard_set_is_a_one_line_error(tmp_path, capsys):
    code, _, err = _verify(tmp_path, capsys)
    assert code == 2 and "no manifest.json" in err and len(err.strip().splitlines()) == 1
