"""What a run is, and whether a command may use it: the class list and shard set a network was
trained on, checked against the data and flags of `train`, `train --resume` and `eval` before
anything runs (so a mismatch is one line and exit 2, and nothing in the run directory changes).

A checkpoint records (model/checkpoint.py `capture`) its arch, num_classes, classes (the wnids:
class index = position) and `data`, the DataIdentity of the shard set it was trained on:

    {"fingerprint": sha256 over the class list and every shard's sha256 (manifest.json),
     "shards": {"train": 5, "val": 1}, "samples": {"train": 68, "val": 16}}

The fingerprint is the shards' content, not their path: a shard set moved or copied elsewhere is
the same data. Checkpoints from before it was recorded skip that one check.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from alexnet_fast.pipeline.shardset import SPLITS, ShardSet

ALLOW_OTHER_DATA = "--allow-other-data"     # the flag that lets a resume continue on another shard set


@dataclass(frozen=True)
class DataIdentity:
    fingerprint: str
    shards: dict[str, int]
    samples: dict[str, int]

    @classmethod
    def of(cls, shard_set: ShardSet) -> "DataIdentity":
        splits = {s: shard_set.manifest["splits"][s]["shards"] for s in SPLITS if s in shard_set.manifest["splits"]}
        hashes = {split: [shard["sha256"] for shard in files] for split, files in splits.items()}
        content = {"classes": shard_set.classes, "shards": hashes}
        fingerprint = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return cls(fingerprint, {s: len(files) for s, files in splits.items()},
                   {s: sum(int(f["samples"]) for f in files) for s, files in splits.items()})

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """'68 train + 16 val samples in 5 + 1 shards'"""
        return (" + ".join(f"{self.samples.get(s, 0)} {s}" for s in SPLITS) + " samples in "
                + " + ".join(str(self.shards.get(s, 0)) for s in SPLITS) + " shards")


def class_difference(trained: list[str], data: list[str]) -> str | None:
    """How the class list `data` differs from `trained` (both wnids in class-index order), in a
    few words; None when they are equal."""
    if trained == data:
        return None
    if len(trained) != len(data):
        return f"{len(data)} classes, not the {len(trained)} it was trained on"
    differ = [i for i, (a, b) in enumerate(zip(trained, data)) if a != b]
    first = differ[0]
    return (f"other classes: {len(differ)} of {len(data)} wnids differ (class {first} is {data[first]} there, "
            f"{trained[first]} in training)")


def num_classes_mismatch(num_classes: int, shard_set: ShardSet) -> str | None:
    """Why --num-classes (0 = the shard set's) cannot train on `shard_set`: it must cover every label."""
    if 0 < num_classes < shard_set.num_classes:
        return (f"--num-classes {num_classes} is fewer than the {shard_set.num_classes} classes of --data "
                f"{shard_set.root} (its labels go up to {shard_set.num_classes - 1}); leave it at 0 to take the "
                f"shard set's")
    return None


def resume_mismatches(saved: dict, *, arch: str, num_classes: int, shard_set: ShardSet,
                      allow_other_data: bool) -> list[str]:
    """What keeps a run from continuing from the checkpoint `saved` with these flags and this shard
    set, one short clause each (naming the flag that would change it); [] when it may. A different
    world size is no mismatch: the run continues, without replaying the other's dropout masks and
    loader order exactly (docs/multinode.md)."""
    problems = []
    if saved["arch"] != arch:
        problems.append(f"it is {saved['arch']}, not --arch {arch} (resume with --arch {saved['arch']})")
    classes = saved.get("classes")
    wnids = class_difference(classes, shard_set.classes) if classes is not None else None
    if wnids is not None:
        problems.append(f"--data {shard_set.root} has {wnids}")
    if saved["num_classes"] != num_classes and wnids is None:
        problems.append(f"it has {saved['num_classes']} outputs, not {num_classes} (resume with --num-classes "
                        f"{saved['num_classes']})")
    if problems:
        return problems
    trained = saved.get("data") or {}
    data = DataIdentity.of(shard_set)
    if trained.get("fingerprint") and trained["fingerprint"] != data.fingerprint and not allow_other_data:
        was = DataIdentity(**trained)
        problems.append(f"--data {shard_set.root} is another shard set with the same classes ({data.describe()}; "
                        f"it was trained on {was.describe()}): pass {ALLOW_OTHER_DATA} to continue on it")
    return problems


def resume_refusal(saved: dict, path, **flags) -> str | None:
    """The one line refusing to resume from checkpoint `saved` (read from `path`), or None when it
    may continue: `flags` as resume_mismatches takes them."""
    problems = resume_mismatches(saved, **flags)
    return f"--resume: {path} cannot continue here: {'; '.join(problems)}" if problems else None


def eval_mismatch(saved: dict, shard_set: ShardSet) -> str | None:
    """Why the checkpoint `saved` cannot be scored on `shard_set`'s val split (labels are class
    indices, so they must mean the classes the network was trained on); None when it can."""
    classes = saved.get("classes")
    if classes is not None:
        difference = class_difference(classes, shard_set.classes)
        return None if difference is None else f"--data {shard_set.root} has {difference}"
    if saved["num_classes"] != shard_set.num_classes:      # a checkpoint that did not record its classes
        return f"the checkpoint has {saved['num_classes']} classes, the shard set {shard_set.num_classes}"
    return None
