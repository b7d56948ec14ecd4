"""`on_corrupt="skip"` on shards that lost a part after make_shards wrote them: a tar cut short
(its lost samples are skipped and counted, the rest are read) and a missing .idx (rebuilt from the
tar: nothing is lost). The DALI loader on a damaged copy of the session's shard set, whole epochs.
(The default, `error`, stopping with the shard's name: test_damaged_shards.py.)"""
from __future__ import annotations

import shutil
import tarfile

import pytest
import torch

from alexnet_fast.pipeline.loaders import CorruptSampleError, LoaderSpec, make_loader

TRAIN_SHARD, VAL_SHARD = "train-000001", "val-000000"
KEEP = 5              # the tar is cut inside the JPEG of its 6th sample: 5 intact samples stay


def _keys(tar) -> list[str]:
    with tarfile.open(tar) as archive:
        return [m.name.split(".")[0] for m in archive if m.name.endswith(".jpg")]


def _cut_inside_sample(tar, index: int) -> None:
    with tarfile.open(tar) as archive:
        member = [m for m in archive if m.name.endswith(".jpg")][index]
    data = tar.read_bytes()
    tar.write_bytes(data[: member.offset_data + member.size // 2])


@pytest.fixture
def damaged_copy(shard_set, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(shard_set, out)
    return out


def _loader(data, batch_size=8, **kw):
    loader = make_loader(LoaderSpec(data=str(data), batch_size=batch_size, seed=1, workers=1, **kw))
    loader.with_params = True
    return loader


def _epoch(loader) -> tuple[list[str], torch.Tensor]:
    names, images = [], []
    for x, _, batch_names, _ in loader:
        names += batch_names
        images.append(x)
    return names, torch.cat(images)


@pytest.mark.parametrize("index_too", [False, True], ids=["tar-cut", "tar-cut-and-index-missing"])
def test_a_cut_short_tar_is_read_up_to_the_cut_and_the_rest_skipped(damaged_copy, index_too):
    tar = damaged_copy / f"{TRAIN_SHARD}.tar"
    keys = _keys(tar)
    _cut_inside_sample(tar, KEEP)
    if index_too:
        (damaged_copy / f"{TRAIN_SHARD}.idx").unlink()
    with pytest.raises(CorruptSampleError, match=f"{tar} is cut short"):
        make_loader(LoaderSpec(data=str(damaged_copy)))                 # the default: stop, naming it

    # batches of 4 divide the 68 train samples: every sample is drawn in every epoch, so every lost
    # one must be met, and counted exactly once over the two epochs
    loader = _loader(damaged_copy, batch_size=4, on_corrupt="skip")
    lost = len(keys) - KEEP
    assert len(loader.notes) == 1 and str(tar) in loader.notes[0]
    assert f"{lost} lost sample(s) skipped" in loader.notes[0]
    assert ("rebuilt from the tar" in loader.notes[0]) == index_too
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        names, _ = _epoch(loader)
        assert len(names) == len(set(names))
        seen += names
        assert len(names) == loader.num_samples - len(set(loader.skipped))   # every intact sample, once
    from_damaged = sorted(n.rsplit(":", 1)[1] for n in seen if n.startswith(f"{tar}:"))
    assert from_damaged == sorted(keys[:KEEP] * 2)                      # the intact samples, read each epoch
    # each lost one counted once: by its key, or (no index left to name it) by a placeholder
    lost_keys = [f"lost{i}" for i in range(lost)] if index_too else keys[KEEP:]
    assert sorted(loader.skipped) == sorted(f"{tar}:{k}" for k in lost_keys)


def test_a_missing_index_is_rebuilt_and_nothing_is_lost(shard_set, damaged_copy):
    (damaged_copy / f"{TRAIN_SHARD}.idx").unlink()
    loader = _loader(damaged_copy, on_corrupt="skip")
    assert loader.notes == [f"index {TRAIN_SHARD}.idx of shard {damaged_copy / TRAIN_SHARD}.tar is missing: "
                            f"rebuilt from the tar"]
    names, images = _epoch(loader)
    intact_names, intact_images = _epoch(_loader(shard_set))
    assert loader.skipped == []
    assert [n.replace(str(damaged_copy), "") for n in names] == [n.replace(str(shard_set), "") for n in intact_names]
    assert torch.equal(images, intact_images)                            # the very same epoch

    baseline = make_loader(LoaderSpec(data=str(damaged_copy), kind="baseline", batch_size=8, workers=1,
                                      on_corrupt="skip"))
    assert sum(len(y) for _, y in baseline) == len(baseline) * 8        # it reads tars without the .idx


def test_val_over_two_ranks_counts_every_intact_sample_once(damaged_copy):
    tar = damaged_copy / f"{VAL_SHARD}.tar"
    keys = _keys(tar)
    _cut_inside_sample(tar, KEEP)
    seen, skipped = [], []
    for rank in range(2):
        loader = _loader(damaged_copy, split="val", rank=rank, world_size=2, on_corrupt="skip")
        names, images = _epoch(loader)
        assert len(names) == loader.num_samples == images.shape[0]
        seen += names
        skipped += loader.skipped
    assert sorted(seen) == sorted(f"{tar}:{k}" for k in keys[:KEEP])
    assert sorted(skipped) == sorted(f"{tar}:{k}" for k in keys[KEEP:])     # each lost one counted once


def test_the_baseline_loader_refuses_to_skip_a_cut_short_tar(damaged_copy):
    tar = damaged_copy / f"{TRAIN_SHARD}.tar"
    _cut_inside_sample(tar, KEEP)
    with pytest.raises(CorruptSampleError, match="the baseline loader cannot skip them; use the DALI loader"):
        make_loader(LoaderSpec(data=str(damaged_copy), kind="baseline", on_corrupt="skip"))


def _flip_bytes_in_jpeg(tar, index: int) -> str:
    """8 bytes inverted mid-way through a JPEG's entropy-coded data: it still decodes, to wrong pixels."""
    with tarfile.open(tar) as archive:
        member = [m for m in archive if m.name.endswith(".jpg")][index]
    data = bytearray(tar.read_bytes())
    for i in range(8):
        data[member.offset_data + member.size // 2 + i] ^= 0xFF
    tar.write_bytes(bytes(data))
    return member.name.split(".")[0]


def test_shard_check_names_the_samples_whose_bytes_changed(damaged_copy):
    from alexnet_fast.pipeline.integrity import check_shards
    from alexnet_fast.pipeline.shardset import ShardSet

    key = _flip_bytes_in_jpeg(damaged_copy / f"{TRAIN_SHARD}.tar", 3)
    manifest = damaged_copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace(ShardSet.open(damaged_copy).shards("val")[0].sha256, "0" * 64))
    shards = ShardSet.open(damaged_copy)
    checks = check_shards(shards.shards("train") + shards.shards("val"), workers=2)
    differ = {c.shard.tar.stem: c.changed for c in checks if not c.matches}
    assert differ == {TRAIN_SHARD: (key,), VAL_SHARD: ()}    # val: only the manifest changed


def test_excluded_samples_are_left_out_and_counted(damaged_copy):
    tar = damaged_copy / f"{VAL_SHARD}.tar"
    keys = _keys(tar)
    names = [f"{tar}:{keys[2]}", f"{tar}:{keys[11]}"]
    seen = []
    for rank in range(2):
        loader = _loader(damaged_copy, split="val", rank=rank, world_size=2)
        loader.exclude(names)
        rank_names, images = _epoch(loader)
        assert len(rank_names) == loader.num_samples == images.shape[0]
        seen += rank_names
        assert len(loader.skipped) == 1            # one of the two falls into each rank's half
    assert sorted(seen) == sorted(f"{tar}:{k}" for k in keys if f"{tar}:{k}" not in names)
    baseline = make_loader(LoaderSpec(data=str(damaged_copy), split="val", kind="baseline", batch_size=8, workers=1))
    baseline.exclude(names)
    assert sum(len(y) for _, y in baseline) == len(keys) - 2 and sorted(baseline.skipped) == sorted(names)


@pytest.mark.parametrize("kind", ["dali", "baseline"])
@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
def test_a_missing_tar_stops_both_loaders_in_both_modes(damaged_copy, kind, on_corrupt):
    tar = damaged_copy / f"{TRAIN_SHARD}.tar"
    tar.unlink()
    with pytest.raises(CorruptSampleError, match=f"^shard {tar} is missing: run `alexnet-fast verify"):
        make_loader(LoaderSpec(data=str(damaged_copy), kind=kind, workers=1, on_corrupt=on_corrupt))
