"""Which raw ImageNet layout RAW holds, and the list of every input file in it.

Recognised (and reported by name):
  train  FOLDERS  RAW/train/<wnid>/*.JPEG (also Kaggle's RAW/ILSVRC/Data/CLS-LOC/train)
         TAR      RAW/ILSVRC2012_img_train.tar, a tar of per-class tars, read in place by byte
                  offsets (tarfile walks the headers; nothing is extracted to disk)
  val    FOLDERS  RAW/val/<wnid>/*.JPEG
         FLAT     RAW/val/ILSVRC2012_val_*.JPEG + devkit or Kaggle labels
         TAR      RAW/ILSVRC2012_img_val.tar (flat) + devkit or Kaggle labels

Every file found becomes either a `RawItem` or a `Rejection`; nothing is dropped silently.
Folders whose names are not WordNet IDs: if no train folder is a wnid, the folder names are the
class names (an ImageFolder-style dataset); otherwise those folders are skipped and each of their
files is rejected with the reason, so a stray `train/tmp/` does not become a class.
"""
from __future__ import annotations

import enum
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from alexnet_fast.tools.sharding.errors import ShardingError
from alexnet_fast.tools.sharding.labels import ValLabels, find_val_labels

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
KAGGLE_BASE = Path("ILSVRC/Data/CLS-LOC")
WNID = re.compile(r"^n\d{8}$")


class TrainLayout(enum.Enum):
    FOLDERS = "folders"  # train/<wnid>/*.JPEG
    TAR = "tar"  # ILSVRC2012_img_train.tar of per-class tars


class ValLayout(enum.Enum):
    NONE = "none"
    FOLDERS = "folders"  # val/<wnid>/*.JPEG
    FLAT = "flat"  # val/ILSVRC2012_val_*.JPEG, labels from devkit/Kaggle
    TAR = "tar"  # ILSVRC2012_img_val.tar, labels from devkit/Kaggle


@dataclass(frozen=True, slots=True)  # slots: 1.3M of these for full ImageNet
class RawItem:
    """One input file. Tar members are read in place: `file` is the tar, `offset`/`size` the bytes."""

    source: str  # path relative to RAW, for people; tar members as "outer.tar/inner.tar/member"
    wnid: str
    file: str
    offset: int = 0
    size: int = -1  # -1: the whole file


@dataclass(frozen=True)
class Rejection:
    path: str
    split: str
    reason: str

    def as_dict(self) -> dict:
        return {"path": self.path, "split": self.split, "reason": self.reason}


@dataclass
class Discovery:
    raw: Path
    classes: list[str]
    train: list[RawItem]
    val: list[RawItem]
    rejected: list[Rejection]
    train_layout: TrainLayout
    val_layout: ValLayout
    val_labels: str  # "folders", "devkit", "kaggle" or "none"
    notes: list[str] = field(default_factory=list)  # decisions worth a line in the summary

    def describe(self) -> str:
        train = {TrainLayout.FOLDERS: "train/<wnid>/ folders", TrainLayout.TAR: f"{TRAIN_TAR} (tar of per-class tars)"}
        val = {
            ValLayout.NONE: "none found",
            ValLayout.FOLDERS: "val/<wnid>/ folders",
            ValLayout.FLAT: f"flat val/ folder labelled by {self.val_labels}",
            ValLayout.TAR: f"{VAL_TAR} labelled by {self.val_labels}",
        }
        return f"train = {train[self.train_layout]}, val = {val[self.val_layout]}; {len(self.classes)} classes"


def _rel(path: Path, raw: Path) -> str:
    return path.relative_to(raw).as_posix()


def _walk_files(folder: Path, raw: Path, split: str, rejected: list[Rejection]) -> list[Path]:
    """Every non-directory entry under `folder`, not following symlinked folders (no loops).

    Symlinks, fifos and the like are returned too: reading them later either works or rejects
    them with the reason, so nothing vanishes silently.
    """
    files: list[Path] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        rejected.append(Rejection(_rel(folder, raw) + "/", split, f"cannot list folder: {e.strerror or e}"))
        return files
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            files.extend(_walk_files(Path(entry.path), raw, split, rejected))
        else:
            files.append(Path(entry.path))
    return files


def _list_split_dir(split_dir: Path) -> list[os.DirEntry]:
    """Entries of RAW/train or RAW/val; not being able to list one is the user's to fix."""
    try:
        return sorted(os.scandir(split_dir), key=lambda e: e.name)
    except OSError as e:
        raise ShardingError(f"cannot list {str(split_dir)!r}: {e.strerror or e}") from None


def _class_folders(split_dir: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, other entries) of a split folder; symlinked class folders are followed."""
    folders, others = [], []
    for entry in _list_split_dir(split_dir):
        try:
            is_dir = entry.is_dir()  # follows a symlinked class folder; a symlink loop is not a dir
        except OSError:
            is_dir = False
        (folders if is_dir else others).append(Path(entry.path))
    return folders, others


def _folder_items(
    split_dir: Path, raw: Path, split: str, rejected: list[Rejection], notes: list[str], wnids_only: bool | None
) -> tuple[list[RawItem], bool]:
    """Items of `split_dir/<class>/**`. Returns (items, whether class names are wnids)."""
    folders, others = _class_folders(split_dir)
    for path in others:
        rejected.append(Rejection(_rel(path, raw), split, "not inside a class folder"))
    # A symlinked "class folder" that leads back to the split folder (or above it) would make every
    # other class's images a second time, under its name: a loop, rejected as such.
    split_real = split_dir.resolve()
    loops = [f for f in folders if f.is_symlink() and split_real.is_relative_to(f.resolve())]
    for folder in loops:
        rejected.append(Rejection(_rel(folder, raw) + "/", split,
                                  f"symlink loop: links to {os.readlink(folder)!r}, which contains it"))
    folders = [f for f in folders if f not in loops]
    named = [f for f in folders if WNID.match(f.name)]
    if wnids_only is None:
        wnids_only = bool(named)
        if not named and folders:
            notes.append(f"{split}: no folder is a WordNet ID; using the folder names as class names")
    skipped = [f for f in folders if not WNID.match(f.name)] if wnids_only else []
    if skipped:
        names = ", ".join(f.name for f in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        notes.append(f"{split}: skipped {len(skipped)} folder(s) that are not WordNet IDs ({names}); their files are in rejected")
    items: list[RawItem] = []
    for folder in folders:
        files = _walk_files(folder, raw, split, rejected)
        if folder in skipped:
            reason = f"folder {folder.name!r} is not a WordNet ID (n########)"
            rejected.extend(Rejection(_rel(p, raw), split, reason) for p in files)
            continue
        items.extend(RawItem(_rel(p, raw), folder.name, str(p)) for p in files)
    return items, wnids_only


def _tar_members(tar_path: Path, raw: Path, split: str, rejected: list[Rejection]):
    """(member, absolute data offset) of each regular file of an uncompressed tar, in tar order."""
    try:
        tar = tarfile.open(tar_path, "r:")
    except (tarfile.TarError, OSError) as e:
        rejected.append(Rejection(_rel(tar_path, raw), split, f"unreadable tar: {e}"))
        return
    with tar:
        try:
            for member in tar:
                if member.isfile():
                    yield member, member.offset_data
        except (tarfile.TarError, OSError, EOFError) as e:
            rejected.append(Rejection(_rel(tar_path, raw), split, f"tar is damaged after {len(tar.members)} members: {e}"))


def _train_tar_items(tar_path: Path, raw: Path, rejected: list[Rejection]) -> list[RawItem]:
    """Members of the per-class tars inside ILSVRC2012_img_train.tar, located by byte offset."""
    items: list[RawItem] = []
    outer_name = _rel(tar_path, raw)
    with open(tar_path, "rb") as outer_file:
        for member, base in _tar_members(tar_path, raw, "train", rejected):
            where = f"{outer_name}/{member.name}"
            wnid = member.name.rsplit("/", 1)[-1].split(".")[0]
            if not member.name.endswith(".tar") or not WNID.match(wnid):
                rejected.append(Rejection(where, "train", "not a per-class tar named <wnid>.tar"))
                continue
            outer_file.seek(base)
            try:
                # A window onto the inner tar: tarfile reads its headers and seeks over the data.
                inner = tarfile.open(fileobj=_Window(outer_file, base, member.size), mode="r:")
                for m in inner:
                    if m.isfile():
                        items.append(RawItem(f"{where}/{m.name}", wnid, str(tar_path), base + m.offset_data, m.size))
            except (tarfile.TarError, OSError, EOFError) as e:
                rejected.append(Rejection(where, "train", f"unreadable per-class tar: {e}"))
    return items


class _Window:
    """A read-only, seekable view of bytes [start, start+size) of an open file."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


def _flat_val_items(
    files: list[tuple[str, str, int, int]], labels: ValLabels, rejected: list[Rejection]
) -> list[RawItem]:
    """files: (source, file, offset, size); each gets its wnid from the labels or is rejected."""
    items = []
    for source, file, offset, size in files:
        wnid = labels.wnid_for(source)
        if wnid is None:
            rejected.append(Rejection(source, "val", f"no label for this file in the {labels.origin} labels"))
        else:
            items.append(RawItem(source, wnid, file, offset, size))
    return items


def discover(raw: Path) -> Discovery:
    """Find the layout of RAW and list every input file; raises ShardingError when none fits."""
    raw = Path(raw)
    if not raw.exists():
        raise ShardingError(f"RAW {str(raw)!r} does not exist")
    if not raw.is_dir():
        raise ShardingError(f"RAW {str(raw)!r} is not a directory")
    base = raw / KAGGLE_BASE if (raw / KAGGLE_BASE).is_dir() else raw
    rejected: list[Rejection] = []
    notes: list[str] = []

    if (base / "train").is_dir():
        train_layout = TrainLayout.FOLDERS
        train, wnids_only = _folder_items(base / "train", raw, "train", rejected, notes, None)
        if (raw / TRAIN_TAR).exists():
            notes.append(f"both train/ and {TRAIN_TAR} exist; used train/")
    elif (raw / TRAIN_TAR).is_file():
        train_layout = TrainLayout.TAR
        train, wnids_only = _train_tar_items(raw / TRAIN_TAR, raw, rejected), True
    else:
        raise ShardingError(
            f"no recognisable ImageNet layout in {str(raw)!r}: expected train/<wnid>/*.JPEG, "
            f"{TRAIN_TAR} or ILSVRC/Data/CLS-LOC/train/"
        )
    classes = sorted({item.wnid for item in train})
    if not classes:
        raise ShardingError(f"no train images found in {str(raw)!r} ({train_layout.value} layout)")

    val: list[RawItem] = []
    val_layout, val_labels = ValLayout.NONE, "none"
    val_dir = base / "val"
    has_val_dir = val_dir.is_dir() and bool(_list_split_dir(val_dir))  # an empty val/ is no val split
    if val_dir.is_dir() and not has_val_dir:
        notes.append("val/ is empty: no val split written")
    if has_val_dir and _class_folders(val_dir)[0]:
        val_layout, val_labels = ValLayout.FOLDERS, "folders"
        val, _ = _folder_items(val_dir, raw, "val", rejected, notes, wnids_only)
    elif has_val_dir or (raw / VAL_TAR).is_file():
        labels = find_val_labels(raw)
        if labels is None:
            raise ShardingError(
                f"val images in {str(val_dir if has_val_dir else raw / VAL_TAR)!r} are not in class folders "
                "and no val labels were found: put ILSVRC2012_devkit_t12/ (or its .tar.gz) or LOC_val_solution.csv in RAW"
            )
        val_labels = labels.origin
        if has_val_dir:
            val_layout = ValLayout.FLAT
            files = [(_rel(p, raw), str(p), 0, -1) for p in _walk_files(val_dir, raw, "val", rejected)]
        else:
            val_layout = ValLayout.TAR
            files = [
                (f"{VAL_TAR}/{m.name}", str(raw / VAL_TAR), offset, m.size)
                for m, offset in _tar_members(raw / VAL_TAR, raw, "val", rejected)
            ]
        val = _flat_val_items(files, labels, rejected)

    known = set(classes)
    for item in [v for v in val if v.wnid not in known]:
        rejected.append(Rejection(item.source, "val", f"class {item.wnid} has no train images"))
    val = [v for v in val if v.wnid in known]
    return Discovery(raw, classes, train, val, rejected, train_layout, val_layout, val_labels, notes)
