"""Every raw layout make_shards recognises, each labelled correctly, nothing lost, nothing extracted."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from alexnet_fast.pipeline.shardset import ShardSet
from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards
from alexnet_fast.tools.sharding.layout import TrainLayout

SMALL = dict(classes=3, train_per_class=3, val_per_class=2, min_side=64, max_side=160)
OPTS = ShardOptions(per_shard=8, size=64)


def _read_split(out: Path, split: str) -> dict[str, tuple[int, str]]:
    """source -> (class index, wnid) of every sample written."""
    seen = {}
    for shard in ShardSet.open(out).shards(split):
        with tarfile.open(shard.tar) as tar:
            parts = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in parts.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                seen[meta["source"]] = (int(parts[name.replace(".json", ".cls")]), meta["wnid"])
    return seen


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _check(tree, out: Path) -> dict:
    manifest = ShardSet.open(out).manifest
    classes = manifest["classes"]
    assert classes == tree.classes
    for split, truth in (("train", tree.train), ("val", tree.val)):
        assert _read_split(out, split) == {src: (classes.index(w), w) for src, w in truth.items()}
    assert {r["path"]: r["split"] for r in manifest["rejected"]} == tree.rejected
    return manifest


@pytest.mark.parametrize(
    "train_layout, val_format, reported",
    [
        (TrainLayout.FOLDERS, ValFormat.FOLDERS, ("folders", "folders", "folders")),
        (TrainLayout.TAR, ValFormat.TAR_DEVKIT, ("tar", "tar", "devkit")),
        (TrainLayout.TAR, ValFormat.FLAT_DEVKIT, ("tar", "flat", "devkit")),
        (TrainLayout.FOLDERS, ValFormat.FLAT_KAGGLE, ("folders", "flat", "kaggle")),
    ],
)
def test_layout_is_detected_and_labelled(tmp_path, train_layout, val_format, reported):
    tree = write_raw_imagenet(tmp_path / "raw", SampleSpec(**SMALL, train_layout=train_layout, val_layout=val_format))
    before = _files(tree.root)
    logged = []
    make_shards(tree.root, tmp_path / "out", OPTS, workers=1, progress=False, log=logged.append)
    manifest = _check(tree, tmp_path / "out")
    created = manifest["created_by"]
    assert (created["layouts"]["train"], created["layouts"]["val"], created["val_labels"]) == reported
    assert logged[0].startswith("found train = ")  # the run says which layout it found
    assert _files(tree.root) == before  # tars are read in place: nothing extracted into RAW


def test_devkit_as_tar_gz(tmp_path):
    tree = write_raw_imagenet(tmp_path / "raw", SampleSpec(**SMALL, val_layout=ValFormat.FLAT_DEVKIT))
    devkit = tree.root / "ILSVRC2012_devkit_t12"
    with tarfile.open(tree.root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(devkit, arcname=devkit.name)
    shutil.rmtree(devkit)
    make_shards(tree.root, tmp_path / "out", OPTS, workers=1, progress=False, log=lambda m: None)
    _check(tree, tmp_path / "out")


def test_devkit_ids_are_mapped_through_meta_mat(tmp_path):
    """Regression for the devkit trap: ILSVRC2012_ID - 1 is not the sorted-wnid class index."""
    tree = write_raw_imagenet(tmp_path / "raw", SampleSpec(classes=5, train_per_class=1, val_per_class=3,
                                                           odd_files=False, min_side=32, max_side=48,
                                                           val_layout=ValFormat.FLAT_DEVKIT))
    assert [tree.devkit_ids[w] for w in tree.classes] != list(range(1, 6))
    make_shards(tree.root, tmp_path / "out", OPTS, workers=1, progress=False, log=lambda m: None)
    seen = _read_split(tmp_path / "out", "val")
    assert {src: w for src, (_, w) in seen.items()} == tree.val
    assert all(cls == tree.classes.index(w) for cls, w in seen.values())


def test_folders_that_are_not_wnids(tmp_path):
    tree = write_raw_imagenet(tmp_path / "raw", SampleSpec(**SMALL, odd_files=False))
    stray = tree.root / "train" / "tmp"
    stray.mkdir()
    shutil.copy(next(iter((tree.root / "train" / tree.classes[0]).iterdir())), stray / "copy.JPEG")
    (tree.root / "train" / "README.txt").write_text("not an image")
    logged = []
    make_shards(tree.root, tmp_path / "out", OPTS, workers=1, progress=False, log=logged.append)
    manifest = ShardSet.open(tmp_path / "out").manifest
    assert manifest["classes"] == tree.classes  # `tmp` did not become a class
    reasons = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert "WordNet ID" in reasons["train/tmp/copy.JPEG"]
    assert reasons["train/README.txt"] == "not inside a class folder"
    assert any("not WordNet IDs" in line for line in logged)


def test_plain_folder_names_become_classes(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "raw" / "train" / name).mkdir(parents=True)
    tree = write_raw_imagenet(tmp_path / "gen", SampleSpec(classes=2, train_per_class=2, odd_files=False,
                                                           min_side=32, max_side=48, val_layout=ValFormat.NONE))
    for wnid, name in zip(tree.classes, ("cat", "dog")):
        for src in (tree.root / "train" / wnid).iterdir():
            shutil.copy(src, tmp_path / "raw" / "train" / name / src.name)
    report = make_shards(tmp_path / "raw", tmp_path / "out", OPTS, workers=1, progress=False, log=lambda m: None)
    assert ShardSet.open(tmp_path / "out").classes == ["cat", "dog"]
    assert report.samples == {"train": 4, "val": 0}
    assert any("folder names as class names" in n for n in report.notes)
