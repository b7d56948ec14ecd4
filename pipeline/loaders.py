"""One entry point for every data loader the trainer, evaluator and profiler use.

    shard_set = ShardSet.open("shards/imagenet")          # optional: make_loader opens it otherwise
    loader = make_loader(LoaderSpec(data="shards/imagenet", split="train", batch_size=128, ...), shard_set)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # images: [B,3,227,227] on spec.device, labels: int64 [B]
            ...

`kind="dali"` is the DALI pipeline (GPU decode with device="cuda", its CPU twin with "cpu"),
dali_loader.py; `kind="baseline"` is webdataset + PIL + torch DataLoader doing the same
augmentation math, baseline.py. Both follow the same `EpochPlan` (epoch_plan.py: shard order, rank
ranges, batch counts). The spec, the `Loader` contract and the choices a spec may take are in
loader_spec.py (re-exported here); damaged shard files are found by shard_damage.py before any
reader starts.
"""
from __future__ import annotations

from pathlib import Path

from alexnet_fast.pipeline.host import keep_batch_buffers_mapped
from alexnet_fast.pipeline.loader_spec import (LOADER_KINDS, ON_CORRUPT_MODES, CorruptSampleError, Loader, LoaderSpec,
                                               check_spec, default_loader_workers)
from alexnet_fast.pipeline.shard_damage import check_shard_files
from alexnet_fast.pipeline.shardset import ShardSet

__all__ = ["make_loader", "LoaderSpec", "Loader", "CorruptSampleError", "LOADER_KINDS", "ON_CORRUPT_MODES",
           "default_loader_workers"]


def make_loader(spec: LoaderSpec, shard_set: ShardSet | None = None) -> Loader:
    """The loader `spec` asks for. `shard_set`: the already-open shard set of `spec.data`, so a
    process reads manifest.json once; None opens it here."""
    check_spec(spec)
    if shard_set is None:
        shard_set = ShardSet.open(spec.data)
    elif Path(shard_set.root).resolve() != Path(spec.data).resolve():
        raise ValueError(f"shard set {str(shard_set.root)!r} is not the spec's data {spec.data!r}")
    if not shard_set.has_split(spec.split):
        raise ValueError(f"shard set {spec.data!r} has no {spec.split} samples")
    damaged = check_shard_files(shard_set, spec.split, spec.on_corrupt)
    if spec.device == "cpu":
        keep_batch_buffers_mapped()
    # Imported here: a process that uses one kind does not load the other's libraries (DALI, or
    # webdataset + PIL).
    if spec.kind == "dali":
        from alexnet_fast.pipeline.dali_loader import DaliLoader
        return DaliLoader(spec, shard_set, damaged)
    from alexnet_fast.pipeline.baseline import BaselineLoader
    return BaselineLoader(spec, shard_set, damaged)
