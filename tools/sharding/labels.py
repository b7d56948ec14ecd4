"""Validation labels for a flat `val/` folder: the ILSVRC2012 devkit or Kaggle's LOC_val_solution.csv.

The devkit's trap: `ILSVRC2012_validation_ground_truth.txt` holds ILSVRC2012_IDs (1..1000), and
those IDs are NOT positions in the sorted wnid list. The only correct route is
ID -> wnid through `meta.mat`, then wnid -> class index through the sorted train wnids.
"""
from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

from alexnet_fast.tools.sharding.errors import ShardingError

DEVKIT_DIR = "ILSVRC2012_devkit_t12"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_CSV = "LOC_val_solution.csv"


@dataclass(frozen=True)
class ValLabels:
    """image stem (e.g. 'ILSVRC2012_val_00000001') -> wnid, and where that came from."""

    by_stem: dict[str, str]
    origin: str  # "devkit" or "kaggle", for the layout report

    def wnid_for(self, filename: str) -> str | None:
        stem = filename.split("/")[-1].split(".")[0]
        return self.by_stem.get(stem)


def find_val_labels(raw: Path) -> ValLabels | None:
    """Labels for flat val images from whatever RAW holds (devkit folder, devkit tar, Kaggle CSV)."""
    if (raw / DEVKIT_DIR / META_MAT).is_file() and (raw / DEVKIT_DIR / GROUND_TRUTH).is_file():
        meta = (raw / DEVKIT_DIR / META_MAT).read_bytes()
        truth = (raw / DEVKIT_DIR / GROUND_TRUTH).read_text()
        return ValLabels(devkit_labels(meta, truth), "devkit")
    if (raw / DEVKIT_TAR).is_file():
        meta, truth = _read_devkit_tar(raw / DEVKIT_TAR)
        return ValLabels(devkit_labels(meta, truth), "devkit")
    if (raw / KAGGLE_CSV).is_file():
        return ValLabels(kaggle_labels((raw / KAGGLE_CSV).read_text()), "kaggle")
    return None


def _read_devkit_tar(path: Path) -> tuple[bytes, str]:
    try:
        with tarfile.open(path, "r:*") as tar:
            meta = tar.extractfile(f"{DEVKIT_DIR}/{META_MAT}").read()
            truth = tar.extractfile(f"{DEVKIT_DIR}/{GROUND_TRUTH}").read().decode()
    except (tarfile.TarError, KeyError, OSError, AttributeError) as e:
        raise ShardingError(f"cannot read val labels from {path}: {e}") from None
    return meta, truth


def devkit_id_to_wnid(meta_mat: bytes) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid for the leaf synsets (num_children == 0) of the devkit's meta.mat."""
    import scipy.io  # only flat-val runs pay for scipy

    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
        return {
            int(s["ILSVRC2012_ID"]): str(s["WNID"])
            for s in synsets.ravel()
            if int(s["num_children"]) == 0
        }
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ShardingError(f"devkit meta.mat is not readable as the ILSVRC2012 synset table: {e}") from None


def devkit_labels(meta_mat: bytes, ground_truth: str) -> dict[str, str]:
    """Line i (1-based) of the ground truth is the ILSVRC2012_ID of ILSVRC2012_val_{i:08d}."""
    id_to_wnid = devkit_id_to_wnid(meta_mat)
    labels = {}
    for i, line in enumerate(ground_truth.split(), start=1):
        wnid = id_to_wnid.get(int(line))
        if wnid is None:
            raise ShardingError(f"devkit ground truth line {i} names ILSVRC2012_ID {line}, which meta.mat lacks")
        labels[f"ILSVRC2012_val_{i:08d}"] = wnid
    return labels


def kaggle_labels(csv_text: str) -> dict[str, str]:
    """LOC_val_solution.csv rows: `ImageId,PredictionString` where the string starts with the wnid."""
    labels = {}
    for row in csv.DictReader(io.StringIO(csv_text)):
        try:
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
        except (KeyError, IndexError, AttributeError):
            raise ShardingError(f"{KAGGLE_CSV} row {row!r} has no ImageId/PredictionString") from None
    return labels
