"""Same inputs and seed -> the same bytes, whatever the worker count; resume after a real kill -9."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from alexnet_fast.pipeline.shardset import ShardSet
from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

MAKE_SHARDS = Path(__file__).resolve().parents[1] / "tools" / "make_shards"
QUIET = dict(progress=False, log=lambda msg: None)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    spec = SampleSpec(classes=4, train_per_class=10, val_per_class=2, min_side=200, max_side=360,
                      val_layout=ValFormat.FLAT_DEVKIT)
    return write_raw_imagenet(tmp_path_factory.mktemp("raw"), spec).root


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    make_shards(raw, out, ShardOptions(per_shard=3), workers=1, **QUIET)
    return out


def test_same_seed_same_bytes_with_any_worker_count(raw, reference, tmp_path):
    make_shards(raw, tmp_path / "w2", ShardOptions(per_shard=3), workers=2, **QUIET)
    assert _tree_bytes(tmp_path / "w2") == _tree_bytes(reference)


def test_seed_changes_the_train_order_only(raw, reference, tmp_path):
    make_shards(raw, tmp_path / "s1", ShardOptions(per_shard=3, seed=1), workers=1, **QUIET)

    def sources(out, split):
        order = []
        for shard in ShardSet.open(out).shards(split):
            with tarfile.open(shard.tar) as tar:
                order += [tar.extractfile(m).read() for m in tar if m.name.endswith(".json")]
        return order

    assert sources(tmp_path / "s1", "train") != sources(reference, "train")
    assert sorted(sources(tmp_path / "s1", "train")) == sorted(sources(reference, "train"))
    assert sources(tmp_path / "s1", "val") == sources(reference, "val")


def test_keep_aspect_and_size(raw, tmp_path):
    make_shards(raw, tmp_path / "k", ShardOptions(per_shard=100, size=96, keep_aspect=True), workers=1, **QUIET)
    shard = ShardSet.open(tmp_path / "k").shards("train")[0]
    with tarfile.open(shard.tar) as tar:
        sizes = [Image.open(io.BytesIO(tar.extractfile(m).read())).size for m in tar if m.name.endswith(".jpg")]
    assert all(min(s) == 96 for s in sizes) and any(s[0] != s[1] for s in sizes)


def test_rerun_of_a_complete_set_does_nothing(raw, reference):
    before = _tree_bytes(reference)
    report = make_shards(raw, reference, ShardOptions(per_shard=3), workers=1, **QUIET)
    assert report.up_to_date and _tree_bytes(reference) == before


def test_a_new_conversion_recipe_is_a_new_job(raw, reference, tmp_path, monkeypatch):
    """The recipe and library versions (convert.CONVERTER) are recorded and fingerprinted: shards
    made by another recipe are neither reused (resume) nor taken as up to date."""
    import json

    from alexnet_fast.tools.sharding import errors, manifest

    recorded = json.loads((reference / "manifest.json").read_text())["created_by"]["converter"]
    assert recorded == manifest.CONVERTER and "simplejpeg" in recorded
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in _tree_bytes(reference).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    monkeypatch.setattr(manifest, "CONVERTER", recorded + " (a later version)")
    with pytest.raises(errors.ShardingError, match="other inputs or options"):
        make_shards(raw, copy, ShardOptions(per_shard=3), workers=1, **QUIET)


class _Interrupted(Exception):
    pass


def _interrupted_run(raw: Path, out: Path, monkeypatch, shards: int) -> None:
    """make_shards stopped (in this process) right after its `shards`-th finished shard was recorded
    for resume: the state a killed run leaves."""
    from alexnet_fast.tools.sharding import resume

    real, saved = resume.save_sidecar, []

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        saved.append(1)
        if len(saved) == shards:
            raise _Interrupted

    with monkeypatch.context() as patched:
        patched.setattr(resume, "save_sidecar", save_then_stop)
        with pytest.raises(_Interrupted):
            make_shards(raw, out, ShardOptions(per_shard=3), workers=1, **QUIET)
    assert len(list((out / ".make_shards").glob("train-*.json"))) == shards


@pytest.mark.parametrize("recipe", ["same", "new"])
def test_an_interrupted_run_is_resumed_only_by_the_same_conversion_recipe(raw, reference, tmp_path, monkeypatch,
                                                                        recipe):
    """The finished shards of an interrupted run are reused by a rerun with the same recipe, and
    redone, not reused, when the recipe (convert.CONVERTER) changed in between."""
    from alexnet_fast.tools.sharding import manifest

    out = tmp_path / "out"
    _interrupted_run(raw, out, monkeypatch, shards=2)
    if recipe == "new":
        monkeypatch.setattr(manifest, "CONVERTER", manifest.CONVERTER + " (a later version)")
    report = make_shards(raw, out, ShardOptions(per_shard=3), workers=1, **QUIET)
    assert report.reused_shards == (2 if recipe == "same" else 0)
    recorded = json.loads((out / "manifest.json").read_text())["created_by"]["converter"]
    assert recorded == manifest.CONVERTER
    shards = {n: d for n, d in _tree_bytes(out).items() if n.endswith((".tar", ".idx"))}
    assert shards == {n: d for n, d in _tree_bytes(reference).items() if n.endswith((".tar", ".idx"))}


def test_resume_after_kill_9_gives_identical_bytes(raw, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(MAKE_SHARDS), str(raw), str(out), "--per-shard", "3", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecar = out / ".make_shards" / "train-000003.json"
    deadline = time.monotonic() + 60
    while not sidecar.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "make_shards finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert len(list(out.glob("train-*.tar"))) >= 4

    # Finished shards are re-hashed before reuse: a damaged one (and all after it) is redone.
    damaged = out / "train-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / "train-000099.tar.tmp").write_bytes(b"half-written by the killed run")

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 shard(s) reused from an interrupted run" in rerun.stdout
    assert _tree_bytes(out) == _tree_bytes(reference)


def _tarfile_shard(samples: list) -> tuple[bytes, bytes]:
    """What `tarfile` writes for these samples with the shard metadata (the writer before issue 18),
    and the DALI index of its members' offsets."""
    from alexnet_fast.pipeline.shard_format import index_header, index_part, index_text

    buf, rows = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            row = []
            for ext, data in sample.components():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                    len(data), 0, 0o644, 0, 0, "", ""
                offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
                tar.addfile(info, io.BytesIO(data))
                row += index_part(ext, offset, len(data), info.name)
            rows.append(row)
    return buf.getvalue(), index_text(index_header(len(samples)), rows).encode()


@pytest.mark.parametrize("count", [0, 1, 3, 21])
def test_tar_writer_matches_tarfile_byte_for_byte(count):
    """build_shard forms the USTAR headers itself: the same bytes as tarfile, a member size on and
    off the 512-byte blocks, a non-ASCII source, an archive ending on and off a 10240-byte record."""
    import hashlib
    import random

    from alexnet_fast.tools.sharding.tarwriter import Sample, build_shard

    rng = random.Random(count)
    sizes = [0, 1, 511, 512, 513, 10240 - 3 * 512]
    samples = [Sample(k * 7919, rng.randrange(1000), "n01440764", f"train/n01440764/é_{k}.JPEG",
                      rng.randbytes(sizes[k] if k < len(sizes) else rng.randrange(1, 40000)), 256, 256, 500, 375)
               for k in range(count)]
    built = build_shard(samples)
    tar_bytes, index = _tarfile_shard(samples)
    assert built.tar == tar_bytes and built.index == index
    assert built.sha256 == hashlib.sha256(tar_bytes).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(built.tar)) as tar:   # and tarfile reads it back
        assert [m.name for m in tar][:4] == [f"0.{e}" for e in ("jpg", "cls", "lbl", "json")][:4 * count]
