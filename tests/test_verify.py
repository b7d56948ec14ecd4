"""`alexnet-fast verify OUT`: passes a good set, names the shard of any damage, exits non-zero."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from alexnet_fast.pipeline.shard_format import (encode_sample, index_header, index_text, rows_from_members,
                                                sample_intact)
from alexnet_fast.pipeline.shardset import ShardSet
from alexnet_fast.tools.sharding.tarwriter import Sample, build_shard
from alexnet_fast.tools.sharding.verify import _check_sample
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


def test_the_index_the_writer_writes_is_the_one_read_back_from_the_tar_headers(shard_set):
    """tarwriter computes each part's offset while writing; verify and the DALI loader's rebuilt
    index (index_patches.index_from_tar) derive it from the tar's headers: the same text."""
    samples = [Sample(key=k, label=k % 3, wnid="n0", source=f"s{k}", jpeg=bytes(100 + k), w=1, h=1, orig_w=1,
                      orig_h=1) for k in range(5)]
    shard = build_shard(samples)
    with tarfile.open(fileobj=io.BytesIO(shard.tar), mode="r:") as tar:
        rows = rows_from_members([m for m in tar if m.isfile()])
    assert index_text(index_header(len(rows)), rows).encode() == shard.index
    assert shard.index.startswith(b"v1.2 5\n")
    written = ShardSet.open(shard_set).shards("train")[0]       # and a real one make_shards wrote
    with tarfile.open(written.tar) as tar:
        rows = rows_from_members([m for m in tar if m.isfile()])
    assert index_text(index_header(len(rows)), rows) == written.index.read_text()


def test_verify_and_the_trainers_check_judge_a_sample_the_same_way():
    """One per-sample check (shard_format): verify reports each finding, the trainer's
    `--verify-shards` (integrity.py) only whether the sample is intact. The one difference, kept
    on purpose: a .json without jpg_sha256 is not judged by the hash in verify, and counts as
    changed for the trainer (it cannot vouch for the bytes)."""
    def sample(jpeg=b"\xff\xd8 not decoded here", label=3, **changes):
        return {**dict(encode_sample(jpeg, label, {"wnid": "n0"})), **changes}

    def hash_and_label_findings(parts):
        return [p for p in _check_sample("s.tar", "7", parts, num_classes=10) if "JPEG" not in p]

    intact = sample()
    assert sample_intact(intact) and hash_and_label_findings(intact) == []
    changed = sample(jpg=b"\xff\xd8 changed")
    assert not sample_intact(changed)
    assert hash_and_label_findings(changed) == ["s.tar: sample 7: .jpg bytes differ from the sha256 written with it"]
    relabelled = sample(lbl=sample(label=4)["lbl"])
    assert not sample_intact(relabelled)
    assert hash_and_label_findings(relabelled) == ["s.tar: sample 7: .cls 3 / .lbl disagree or out of range [0, 10)"]
    unhashed = sample(json=json.dumps({"wnid": "n0"}).encode())
    assert not sample_intact(unhashed) and hash_and_label_findings(unhashed) == []
    missing = {k: v for k, v in intact.items() if k != "lbl"}
    assert not sample_intact(missing) and _check_sample("s.tar", "7", missing, 10) == ["s.tar: sample 7: missing .lbl"]
