"""GPU tests: every test here is marked `gpu` and skipped, with the reason, where it cannot run.

    python -m pytest -q tests/gpu          # here (no GPU): every test collected and reported skipped
    python -m pytest -q -m gpu tests/gpu   # on a GPU node (benchmarks/gpu_check.py runs exactly this)

A module marks itself `pytest.mark.gpu` (torch on CUDA only) or `pytest.mark.gpu(dali=True)` (also
DALI's GPU backend: the mixed decoder). Skips are decided at collection, before any fixture runs,
so a machine without a GPU builds no data for them, and importing these modules needs no GPU.

`gpu_shards` is a shard set larger than tests/conftest.py's (8 classes x 64 train, 16 val each):
enough batches per epoch that per-image host CPU time is not swamped by pipeline builds. It is
built with every usable core (sample_data's process pool, make_shards' workers).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

GPU_SHARD_SPEC = dict(classes=8, train_per_class=64, val_per_class=16, odd_files=False)
GPU_PER_SHARD = 64          # 512 train samples -> 8 train shards, 128 val -> 2 val shards


def cuda_missing() -> str | None:
    """Why torch cannot run on a GPU here, or None."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"
    return None


def dali_gpu_missing() -> str | None:
    """Why DALI's GPU backend (the mixed decoder) cannot run here, or None."""
    try:
        import nvidia.dali.backend as dali_backend
    except ImportError as e:
        return f"DALI is not importable ({e}); benchmarks/gpu_check.py --extra-site puts its wheel on the path"
    if dali_backend.GetCUDADeviceCount() < 1:
        return "DALI sees no CUDA device (a CPU-only DALI build, or no GPU)"
    return None


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    cuda_reason = dali_reason = None
    checked = False
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None or here not in Path(str(item.fspath)).parents:
            continue
        if not checked:
            cuda_reason, dali_reason, checked = cuda_missing(), dali_gpu_missing(), True
        reason = cuda_reason or (dali_reason if marker.kwargs.get("dali") else None)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def gpu_shards(tmp_path_factory) -> Path:
    """A shard set of 512 train / 128 val samples (read-only: copy before changing)."""
    from alexnet_fast.pipeline.host import usable_cores
    from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet
    from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

    cores = usable_cores()
    raw = write_raw_imagenet(tmp_path_factory.mktemp("gpu_raw"),
                             SampleSpec(**GPU_SHARD_SPEC, val_layout=ValFormat.FLAT_DEVKIT), workers=cores)
    out = tmp_path_factory.mktemp("gpu_shards")
    make_shards(raw.root, out, ShardOptions(per_shard=GPU_PER_SHARD), workers=cores, progress=False,
                log=lambda msg: None)
    shutil.rmtree(raw.root)
    return out


@pytest.fixture
def damaged_gpu_shards(gpu_shards, tmp_path):
    """(copy of gpu_shards whose 3rd sample of the 2nd train shard has a destroyed JPEG header,
    "<tar>:<key>" of it, tar file name, key)."""
    from reliability.faults import damage_jpeg

    from alexnet_fast.pipeline.shardset import ShardSet

    copy = tmp_path / "damaged"
    shutil.copytree(gpu_shards, copy)
    shard = ShardSet.open(copy).shards("train")[1]
    key = damage_jpeg(shard.tar, shard.index, row=2)
    return copy, f"{shard.tar}:{key}", shard.tar.name, key
