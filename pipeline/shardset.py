"""A shard set on disk: the directory `tools/make_shards` writes, read back through its manifest.

Layout of a shard set directory (see README "Shard format"):

    manifest.json            what was written (schema below), written last, atomically
    stats.json               per-channel mean/std, RGB covariance eigen-decomposition (Numba)
    train-000000.tar         WebDataset shard: <key>.jpg <key>.cls <key>.lbl <key>.json per sample
    train-000000.idx         DALI index of that tar (the format DALI's wds2idx writes, v1.2)
    val-000000.tar / .idx    ...

manifest.json:
    {
      "format": "alexnet-fast-shards", "version": 1,
      "created_by": {"tool": "make_shards", "args": {...}, "layouts": {"train": "...", "val": "..."}},
      "image": {"size": 256, "keep_aspect": false, "quality": 90},
      "classes": ["n01440764", ...],          # class index = position (sorted wnids)
      "splits": {
        "train": {"samples": N, "shards": [{"tar": "train-000000.tar", "index": "train-000000.idx",
                                             "samples": 1000, "bytes": B, "sha256": "..."}, ...]},
        "val": {...}
      },
      "rejected": [{"path": "train/n01440764/x.JPEG", "split": "train", "reason": "..."}, ...]
    }

Sample components: `.jpg` RGB baseline JPEG; `.cls` ASCII decimal class index (webdataset/timm);
`.lbl` the same index as int32 little-endian (so DALI's reader hands labels to the device with no
Python); `.json` {"wnid", "source", "w", "h"}. Keys are decimal sample numbers (no dots).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.json"
STATS_NAME = "stats.json"
FORMAT_NAME = "alexnet-fast-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


class ShardSetError(Exception):
    """The directory is not a usable shard set; the message is one line for the user."""


@dataclass(frozen=True)
class ShardFile:
    tar: Path
    index: Path
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardSet:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        """The shard set at `root`. The manifest is parsed once per process and version of the file
        (a training run opens the set in the command, the trainer and each loader: one read);
        the dict it holds is shared between those ShardSets and must not be changed."""
        root = Path(root)
        if not root.is_dir():
            problem = "is not a directory" if root.exists() else "does not exist"
            raise ShardSetError(f"shard directory {str(root)!r} {problem}")
        path = root / MANIFEST_NAME
        if not path.is_file():
            if looks_like_raw_imagenet(root):
                raise ShardSetError(f"{str(root)!r} has no {MANIFEST_NAME}: it looks like raw ImageNet, not a shard "
                                    f"set (write one outside it with `alexnet-fast shards {root} "
                                    f"{shard_set_beside(root)}` and pass that)")
            raise ShardSetError(
                f"{str(root)!r} has no {MANIFEST_NAME}: not a shard set (write one with `alexnet-fast shards RAW {root}`)"
            )
        try:
            stat = path.stat()
            manifest = _read_manifest(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except (OSError, ValueError) as e:
            raise ShardSetError(f"cannot read {path}: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:  # e.g. a JSON list
            raise ShardSetError(f"{path} is not an alexnet-fast manifest")
        return cls(root, manifest)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image"]["size"])

    def has_split(self, split: str) -> bool:
        return split in self.manifest["splits"] and self.manifest["splits"][split]["samples"] > 0

    def shards(self, split: str) -> list[ShardFile]:
        if split not in self.manifest["splits"]:
            raise ShardSetError(f"shard set {str(self.root)!r} has no {split!r} split")
        return [
            ShardFile(self.root / s["tar"], self.root / s["index"], int(s["samples"]), int(s["bytes"]), s["sha256"])
            for s in self.manifest["splits"][split]["shards"]
        ]

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    def stats(self) -> dict:
        """stats.json: {"mean", "std", "covariance", "eigval", "eigvec", "pixels", "images"} on [0,1] pixels."""
        path = self.root / STATS_NAME
        if not path.is_file():
            raise ShardSetError(f"{str(self.root)!r} has no {STATS_NAME} (compute it with `alexnet-fast stats {self.root}`)")
        return json.loads(path.read_text())


def looks_like_raw_imagenet(root: Path) -> bool:
    """A folder make_shards reads (train/ or val/ folders, ILSVRC2012_img_*.tar, Kaggle's ILSVRC/)."""
    return any((root / name).exists() for name in ("train", "val", "ILSVRC")) or any(root.glob("ILSVRC2012_img_*.tar"))


def shard_set_beside(raw: str | Path) -> Path:
    """Where to suggest writing the shard set of the raw tree `raw`: next to it, never inside it."""
    raw = Path(raw).resolve()
    return raw.with_name(f"{raw.name}-shards")


@functools.lru_cache(maxsize=16)
def _read_manifest(path: str, inode: int, size: int, mtime_ns: int) -> dict:
    """manifest.json parsed; cached by the file's identity and version (a rewritten manifest has
    another inode, size or mtime, so it is read again)."""
    return json.loads(Path(path).read_text())
