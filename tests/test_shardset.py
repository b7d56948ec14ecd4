"""ShardSet.open reads manifest.json once per process and version of the file."""
from __future__ import annotations

import json
import shutil

from alexnet_fast.pipeline import shardset
from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader
from alexnet_fast.pipeline.shardset import ShardSet


def test_the_manifest_is_parsed_once_per_version(shard_set, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(shard_set, copy)
    before = shardset._read_manifest.cache_info().misses
    # what one training process does: the command's check, the trainer, a train and a val loader
    sets = [ShardSet.open(copy) for _ in range(2)]
    make_loader(LoaderSpec(data=str(copy), split="train", batch_size=4, workers=1))
    make_loader(LoaderSpec(data=str(copy), split="val", batch_size=4, workers=1), sets[0])
    assert shardset._read_manifest.cache_info().misses == before + 1
    # a manifest rewritten (another version of the file) is read again, never served stale
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["classes"] = list(reversed(manifest["classes"]))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert ShardSet.open(copy).classes == manifest["classes"]
    assert shardset._read_manifest.cache_info().misses == before + 2
