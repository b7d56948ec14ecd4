"""`alexnet-fast verify OUT`: re-read every shard and check it against manifest.json.

Per shard: the tar and its .idx exist, size and sha256 match the manifest, the tar holds exactly
the manifest's sample count with .jpg/.cls/.lbl/.json each, .cls and .lbl agree and lie in the
class range, every JPEG decodes and matches the sha256 in its .json (so a changed byte is traced
to its sample even when the JPEG still decodes), and the .idx is the index of this tar. Problems
name the shard (and the sample); the command exits non-zero on any.
"""
from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from alexnet_fast.pipeline.procpool import fork_pool
from alexnet_fast.pipeline.shard_format import (SAMPLE_PARTS, index_header, index_text, jpg_sha256,
                                                recorded_jpg_sha256, rows_from_members, sample_labels)
from alexnet_fast.pipeline.shardset import SPLITS, ShardFile, ShardSet


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"FAILED with {len(self.problems)} problem(s)"
        return f"{self.shards} shards, {self.samples} samples checked: {verdict}"


def verify_shard(shard: ShardFile, num_classes: int) -> tuple[int, list[str]]:
    """(samples seen, problems) for one shard."""
    name = shard.tar.name
    if not shard.tar.is_file():
        return 0, [f"{name}: missing"]
    problems = []
    if not shard.index.is_file():
        problems.append(f"{name}: index {shard.index.name} is missing")
    data = shard.tar.read_bytes()
    if len(data) != shard.bytes:
        problems.append(f"{name}: {len(data)} bytes, manifest says {shard.bytes}")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        problems.append(f"{name}: sha256 differs from the manifest")
    samples: dict[str, dict[str, bytes]] = {}
    members: list[tarfile.TarInfo] = []     # the files read, for the index this tar should have
    reading = None      # the member being read: where a cut-short tar ends
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                reading = m.name
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
                reading = None
                members.append(m)
    except (tarfile.TarError, OSError, EOFError) as e:
        where = f" in sample {reading.partition('.')[0]} ({reading})" if reading else ""
        return len(samples), problems + [f"{name}: unreadable tar{where} after {len(samples)} samples: {e}"]
    if len(samples) != shard.samples:
        problems.append(f"{name}: {len(samples)} samples, manifest says {shard.samples}")
    for key, parts in samples.items():
        problems.extend(_check_sample(name, key, parts, num_classes))
    if shard.index.is_file():
        rows = rows_from_members(members)
        expected = index_text(index_header(len(rows)), rows)
        if shard.index.read_text(errors="replace") != expected:
            problems.append(f"{name}: index {shard.index.name} does not match the tar")
    return len(samples), problems


def _check_sample(shard: str, key: str, parts: dict[str, bytes], num_classes: int) -> list[str]:
    """The shared per-sample check (shard_format), one finding per problem; and every JPEG decodes."""
    where = f"{shard}: sample {key}"
    missing = [c for c in SAMPLE_PARTS if c not in parts]
    if missing:
        return [f"{where}: missing {', '.join('.' + c for c in missing)}"]
    problems = []
    try:
        label, labels_agree = sample_labels(parts)
        if not labels_agree or not 0 <= label < num_classes:
            problems.append(f"{where}: .cls {label} / .lbl disagree or out of range [0, {num_classes})")
        digest = recorded_jpg_sha256(parts)     # a sample written without one is not judged by it
        if digest is not None and jpg_sha256(parts["jpg"]) != digest:
            problems.append(f"{where}: .jpg bytes differ from the sha256 written with it")
    except (ValueError, struct.error) as e:
        problems.append(f"{where}: bad label or metadata: {e}")
    try:
        with Image.open(io.BytesIO(parts["jpg"])) as im:
            if im.format != "JPEG" or im.mode != "RGB":
                problems.append(f"{where}: .jpg is {im.format} {im.mode}, expected RGB JPEG")
            im.load()
    except Exception as e:  # noqa: BLE001 - any decode failure is the finding
        problems.append(f"{where}: JPEG does not decode: {type(e).__name__}: {e}")
    return problems


def _verify_task(args: tuple[ShardFile, int]) -> tuple[int, list[str]]:
    return verify_shard(*args)


def verify_shard_set(out: Path, workers: int = 1, progress: bool = False) -> VerifyReport:
    shard_set = ShardSet.open(out)
    report = VerifyReport()
    tasks = [(s, shard_set.num_classes) for split in SPLITS if split in shard_set.manifest["splits"]
             for s in shard_set.shards(split)]
    for split, entry in shard_set.manifest["splits"].items():
        listed = sum(s["samples"] for s in entry["shards"])
        if entry["samples"] != listed:
            report.problems.append(f"manifest: {split} total {entry['samples']} != {listed}, the sum over its shards")
    pool = fork_pool(min(workers, len(tasks))) if workers > 1 and len(tasks) > 1 else None
    try:
        # Results in manifest order, so the problem list reads shard by shard.
        results = pool.imap(_verify_task, tasks) if pool else map(_verify_task, tasks)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(tasks), unit="shard", desc="verify", dynamic_ncols=True)
        for count, problems in results:
            report.shards += 1
            report.samples += count
            report.problems.extend(problems)
    finally:
        if pool:
            pool.terminate()
    return report
