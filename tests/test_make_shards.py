"""make_shards on the shared fixture: format, labels, conversion and rejection, read-back."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from alexnet_fast.pipeline.shardset import ShardSet


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _all_samples(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    out = {}
    for shard in ShardSet.open(root).shards(split):
        out.update(_samples(shard.tar))
    return out


def test_every_input_file_is_a_sample_or_rejected(shard_set, raw_imagenet):
    manifest = ShardSet.open(shard_set).manifest
    written = {json.loads(s["json"])["source"] for split in ("train", "val") for s in _all_samples(shard_set, split).values()}
    rejected = {r["path"] for r in manifest["rejected"]}
    assert written == set(raw_imagenet.train) | set(raw_imagenet.val)
    assert rejected == set(raw_imagenet.rejected)
    reasons = {r["path"].rsplit("_", 1)[-1]: r["reason"] for r in manifest["rejected"]}
    assert reasons["empty.JPEG"] == "empty file"
    assert "truncated" in reasons["truncated.JPEG"]
    assert reasons["garbage.JPEG"].startswith("not an image")


def test_labels_follow_sorted_wnids_and_devkit_ids(shard_set, raw_imagenet):
    shard_set_ = ShardSet.open(shard_set)
    assert shard_set_.classes == sorted(raw_imagenet.classes)
    for split, truth in (("train", raw_imagenet.train), ("val", raw_imagenet.val)):
        for key, parts in _all_samples(shard_set, split).items():
            meta = json.loads(parts["json"])
            label = int(parts["cls"])
            assert meta["wnid"] == truth[meta["source"]]
            assert label == shard_set_.classes.index(meta["wnid"])
            assert int.from_bytes(parts["lbl"], "little", signed=True) == label
    # The trap: a reader that used ILSVRC2012_ID - 1 as the class would disagree somewhere.
    assert any(raw_imagenet.devkit_ids[w] - 1 != i for i, w in enumerate(shard_set_.classes))


def test_images_are_256_rgb_baseline_jpegs(shard_set):
    for split in ("train", "val"):
        for parts in _all_samples(shard_set, split).values():
            im = Image.open(io.BytesIO(parts["jpg"]))
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (256, 256))
            assert not im.info.get("progressive")


def test_shards_match_manifest_and_dali_index(shard_set, tmp_path):
    import wds2idx  # DALI's own index writer, installed with nvidia-dali

    shard_set_ = ShardSet.open(shard_set)
    shards = shard_set_.shards("train")
    assert len(shards) == 5 and [s.samples for s in shards] == [16, 16, 16, 16, 4]
    keys = [int(k) for s in shards for k in _samples(s.tar)]
    assert keys == list(range(68))  # decimal sample numbers, consecutive across shards
    for shard in shards + shard_set_.shards("val"):
        reference = tmp_path / shard.index.name
        with wds2idx.IndexCreator(str(shard.tar), str(reference), verbose=False) as creator:
            creator.create_index()
        assert shard.index.read_text() == reference.read_text()


def test_stats_json_covers_the_train_shards(shard_set):
    shard_set_ = ShardSet.open(shard_set)
    stats = shard_set_.stats()
    assert stats["images"] == shard_set_.num_samples("train")
    assert stats["pixels"] == stats["images"] * 256 * 256
    assert not list(shard_set.glob(".*tmp*")) and not (shard_set / ".make_shards").exists()
