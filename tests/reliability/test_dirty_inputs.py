"""make_shards over a raw tree laced with everything a real dump of ImageNet (or a user's copy of it)
contains: no crash, and every input entry is either a sample in a shard or listed in `rejected`
with its reason.

Unreadable files: the run drops root's power to ignore permission bits (CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH) when the suite runs as root, so chmod 000 means the same to it as to any
user. Whether the files really were unreadable to it is probed with the same privileges, and the
expectation follows what the kernel actually enforced: a readable file must be kept.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
from faults import MAKE_SHARDS, limits, run
from PIL import Image

from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, draw_image, write_raw_imagenet

KEPT = "kept"


def _jpeg(seed: int, size=(96, 80)) -> bytes:
    buf = io.BytesIO()
    draw_image(seed % 2, 2, np.random.default_rng(seed), size=size).save(buf, "JPEG")
    return buf.getvalue()


def _readable_by_the_run(path: Path) -> bool:
    probe = run([sys.executable, "-c", f"open({str(path)!r}, 'rb').read(1)"],
                preexec=limits(drop_root_file_access=True), timeout=60)
    return probe.returncode == 0


def _lace(root: Path, w0: str, w1: str) -> dict[str, str]:
    """Add the dirt; returns {path relative to RAW: KEPT or a substring of the rejection reason}."""
    train = root / "train"
    expect: dict[str, str] = {}

    def put(rel: str, data: bytes, outcome: str) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expect[rel] = outcome
        return path

    # wrong extensions: judged by content, not by name
    put(f"train/{w0}/holiday.png", _jpeg(1), KEPT)                 # a JPEG named .png
    put(f"train/{w1}/IMG_0001", _jpeg(2), KEPT)                    # no extension at all
    put(f"train/{w1}/notes.txt", b"shot on a rainy day\n", "not an image")
    put(f"train/{w0}/random.JPEG", np.random.default_rng(9).bytes(5000), "not an image")
    put(f"train/{w0}/zero.JPEG", b"", "empty file")
    put(f"train/{w1}/cut.JPEG", _jpeg(3, size=(300, 200))[:900], "truncated")
    # symlink loops and other non-files
    os.symlink("self.JPEG", train / w0 / "self.JPEG")
    expect[f"train/{w0}/self.JPEG"] = "Too many levels of symbolic links"
    os.symlink("..", train / w0 / "up")                            # a folder loop inside a class
    expect[f"train/{w0}/up"] = "not a regular file"
    os.symlink(".", train / "n09999999")                            # a "class" that is the train folder
    expect["train/n09999999/"] = "symlink loop"
    os.symlink("nowhere.JPEG", train / w1 / "gone.JPEG")
    expect[f"train/{w1}/gone.JPEG"] = "No such file or directory"
    os.mkfifo(train / w1 / "pipe.JPEG")                            # open() on it would block forever
    expect[f"train/{w1}/pipe.JPEG"] = "not a regular file"
    # folders that are not WordNet IDs, files outside class folders
    put("train/tmp/stray.JPEG", _jpeg(4), "is not a WordNet ID")
    put("train/.ipynb_checkpoints/copy.JPEG", _jpeg(5), "is not a WordNet ID")
    put("train/README.txt", b"ImageNet train\n", "not inside a class folder")
    put("val/misc/extra.JPEG", _jpeg(6), "is not a WordNet ID")
    # permissions
    put(f"train/{w1}/locked.JPEG", _jpeg(7), KEPT).chmod(0)
    put(f"train/{w0}/private/inside.JPEG", _jpeg(8), KEPT)
    (train / w0 / "private").chmod(0)
    return expect


def _written_samples(out: Path) -> dict[str, tuple[str, bytes]]:
    """{source path: (wnid, JPEG bytes)} of every sample in every shard."""
    written = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            parts: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, ext = member.name.split(".", 1)
                parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for sample in parts.values():
            meta = json.loads(sample["json"])
            written[meta["source"]] = (meta["wnid"], sample["jpg"])
    return written


def test_every_input_is_a_sample_or_rejected_with_its_reason(tmp_path):
    tree = write_raw_imagenet(tmp_path / "raw", SampleSpec(classes=2, train_per_class=3, val_per_class=2,
                                                           min_side=64, max_side=120, val_layout=ValFormat.FOLDERS))
    w0, w1 = tree.classes
    root = tree.root
    # the generator's own odd files: kept (CMYK, grey, a PNG, a large one) or rejected with their reason
    generator_reasons = {"empty.JPEG": "empty file", "truncated.JPEG": "truncated", "garbage.JPEG": "not an image"}
    assert {s.rsplit("_", 1)[-1] for s in tree.rejected} == set(generator_reasons)
    expect = {**{s: KEPT for s in (*tree.train, *tree.val)},
              **{s: generator_reasons[s.rsplit("_", 1)[-1]] for s in tree.rejected}}
    expect.update(_lace(root, w0, w1))
    private = root / "train" / w0 / "private"
    try:
        if not _readable_by_the_run(root / "train" / w1 / "locked.JPEG"):
            expect[f"train/{w1}/locked.JPEG"] = "Permission denied"
        if not _readable_by_the_run(private / "inside.JPEG"):
            # an unlistable folder is reported as a whole: what is inside cannot be known
            del expect[f"train/{w0}/private/inside.JPEG"]
            expect[f"train/{w0}/private/"] = "cannot list folder: Permission denied"

        done = run([*MAKE_SHARDS, str(root), str(tmp_path / "out"), "--per-shard", "4", "--workers", "2",
                    "--no-progress"], preexec=limits(drop_root_file_access=True))
    finally:
        private.chmod(0o755)            # so the temporary tree can be removed by any user
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr

    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    samples = _written_samples(out)
    written = {source: wnid for source, (wnid, _) in samples.items()}
    assert not set(written) & set(rejected)
    assert set(written) | set(rejected) == set(expect)            # nothing lost, nothing invented
    for path, outcome in expect.items():
        if outcome == KEPT:
            assert path in written, f"{path} should be a sample, was rejected: {rejected.get(path)}"
        else:
            assert path in rejected and outcome in rejected[path], f"{path}: {rejected.get(path)!r}"
    # labels come from the real class folders only: no class made of a loop or a stray folder
    assert manifest["classes"] == [w0, w1]
    assert all(wnid == path.split("/")[1] for path, wnid in written.items())
    assert f"rejected {len(rejected)} file(s)" in done.stdout
    # and every kept odd file (named .png, no extension, once locked, the generator's CMYK, grey,
    # PNG and large ones) really became a 256x256 RGB JPEG
    odd = [path for path, outcome in expect.items()
           if outcome == KEPT and path not in tree.train and path not in tree.val or
           path.rsplit("_", 1)[-1] in ("cmyk.JPEG", "gray.JPEG", "png.JPEG", "large.JPEG")]
    assert len(odd) >= 6, odd
    for path in odd:
        with Image.open(io.BytesIO(samples[path][1])) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (256, 256)), path
