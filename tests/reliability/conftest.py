"""Fixtures of the reliability suite (helpers are in faults.py): tiny data written by the project's
own generator and make_shards, built once per session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from faults import QUIET, damage_jpeg

from alexnet_fast.tools.sample_data import RawTree, SampleSpec, ValFormat, write_raw_imagenet
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> RawTree:
    """3 classes x 5 small train images (+ the generator's odd files), 2 val images per class."""
    spec = SampleSpec(classes=3, train_per_class=5, val_per_class=2, min_side=64, max_side=120,
                      val_layout=ValFormat.FLAT_DEVKIT)
    return write_raw_imagenet(tmp_path_factory.mktemp("tiny_raw"), spec)


def _small_train_set(tmp_path_factory, name: str, val_per_class: int) -> Path:
    raw = write_raw_imagenet(tmp_path_factory.mktemp(f"{name}_raw"),
                             SampleSpec(classes=2, train_per_class=4, val_per_class=val_per_class, min_side=64,
                                        max_side=96, odd_files=False, val_layout=ValFormat.FOLDERS))
    out = tmp_path_factory.mktemp(name)
    make_shards(raw.root, out, ShardOptions(per_shard=4), workers=1, **QUIET)
    return out


@pytest.fixture(scope="session")
def train_set(tmp_path_factory) -> Path:
    """The smallest shard set a training run can use: 2 classes, 8 train samples in 2 shards
    (2 steps of batch 4 per epoch), 4 val samples. Read-only: copy it before changing it."""
    return _small_train_set(tmp_path_factory, "train_set", val_per_class=2)


@pytest.fixture(scope="session")
def train_set_without_val(tmp_path_factory) -> Path:
    """`train_set`'s 8 train samples and no val split (the plateau schedule then steps on the
    training loss). Read-only."""
    return _small_train_set(tmp_path_factory, "noval_set", val_per_class=0)


@pytest.fixture(scope="session")
def damaged_train_set(train_set, tmp_path_factory) -> tuple[Path, str, str]:
    """`train_set` with the JPEG of one sample of train-000001.tar overwritten after the fact.
    Returns (directory, shard file name, sample key)."""
    out = tmp_path_factory.mktemp("damaged") / "set"
    shutil.copytree(train_set, out)
    key = damage_jpeg(out / "train-000001.tar", out / "train-000001.idx")
    return out, "train-000001.tar", key
