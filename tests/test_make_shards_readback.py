"""The shards read back through the two libraries that consume them: webdataset and DALI."""
from __future__ import annotations

import json
import math

import numpy as np

from alexnet_fast.pipeline.shardset import ShardSet


def _expected(shard_set_dir, raw_imagenet, split):
    """(source -> class index) from the generator's ground truth."""
    classes = ShardSet.open(shard_set_dir).classes
    truth = raw_imagenet.train if split == "train" else raw_imagenet.val
    return {src: classes.index(wnid) for src, wnid in truth.items()}


def test_webdataset_library_reads_every_sample(shard_set, raw_imagenet):
    import webdataset as wds

    for split in ("train", "val"):
        urls = [str(s.tar) for s in ShardSet.open(shard_set).shards(split)]
        seen = {}
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
            assert sample["jpg"].size == (256, 256) and sample["jpg"].mode == "RGB"
            seen[sample["json"]["source"]] = int(sample["cls"])
        assert seen == _expected(shard_set, raw_imagenet, split)


def test_dali_webdataset_reader_uses_the_index_files(shard_set, raw_imagenet):
    from nvidia.dali import fn, pipeline_def, types

    shards = ShardSet.open(shard_set).shards("train")
    total = sum(s.samples for s in shards)

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def read():
        jpg, lbl, meta = fn.readers.webdataset(
            paths=[str(s.tar) for s in shards], index_paths=[str(s.index) for s in shards],
            ext=["jpg", "lbl", "json"], dtypes=[types.UINT8, types.INT32, types.UINT8],
            missing_component_behavior="error", random_shuffle=False, name="reader",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl, meta

    pipe = read()
    pipe.build()
    expected = _expected(shard_set, raw_imagenet, "train")
    seen = {}
    for _ in range(math.ceil(total / 8)):  # one epoch; the last batch wraps into the next
        images, labels, metas = pipe.run()
        for i in range(len(labels)):
            source = json.loads(bytes(np.array(metas[i])).decode())["source"]
            assert np.array(images[i]).shape == (256, 256, 3)
            seen[source] = int(np.array(labels[i]).reshape(()))
    assert seen == expected
