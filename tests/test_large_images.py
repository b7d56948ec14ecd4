"""Photos over Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, ~179 megapixels).

A 192-megapixel JPEG (16000x12000) is valid and make_shards keeps it, decoding it at 1/8 scale;
a PNG over the limit cannot be decoded at reduced scale and is rejected with its size and the limit.
Neither file costs the test its size in memory: the JPEG is written byte by byte (a solid grey
baseline JPEG whose every 8x8 block is two zero bits: 750 KB for 192 megapixels) and the PNG's
header alone claims its size.
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from alexnet_fast.pipeline.shardset import ShardSet
from alexnet_fast.tools.sample_data import SampleSpec, write_raw_imagenet
from alexnet_fast.tools.sharding.convert import ImageOptions, convert_image
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards
from alexnet_fast.tools.sharding.errors import RejectedImage

HUGE = (16000, 12000)        # 192 megapixels: over Pillow's hard limit of 178,956,970


def solid_grey_jpeg(width: int, height: int) -> bytes:
    """A valid baseline greyscale JPEG of mid-grey (128) pixels. With the level shift, grey 128 is a
    DC coefficient of 0 and no AC terms; both Huffman tables hold one 1-bit code ("0") for symbol 0,
    so every block is "0" (DC difference 0) + "0" (end of block)."""
    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload

    blocks = -(-width // 8) * -(-height // 8)
    one_code = bytes([1] + [0] * 15) + b"\x00"
    return b"".join([
        b"\xff\xd8",
        segment(0xDB, b"\x00" + b"\x01" * 64),                                          # quant table 0
        segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"),     # SOF0, 1 component
        segment(0xC4, b"\x00" + one_code), segment(0xC4, b"\x10" + one_code),           # DC 0, AC 0
        segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"),                                     # scan
        bytes(-(-blocks * 2 // 8)),
        b"\xff\xd9"])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width`x`height`: Pillow reads the size (and refuses it) before any data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_the_generated_jpeg_is_what_it_claims():
    small = Image.open(io.BytesIO(solid_grey_jpeg(40, 24)))
    small.load()
    assert small.size == (40, 24) and small.getextrema() == (128, 128)


def test_a_192_megapixel_jpeg_is_kept_at_reduced_scale():
    data = solid_grey_jpeg(*HUGE)
    assert HUGE[0] * HUGE[1] > 2 * Image.MAX_IMAGE_PIXELS        # Image.open alone refuses it
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    converted = convert_image(data, ImageOptions(size=256))
    assert (converted.orig_w, converted.orig_h) == HUGE
    assert (converted.w, converted.h) == (256, 256)
    stored = Image.open(io.BytesIO(converted.jpeg))
    assert stored.mode == "RGB" and all(abs(lo - 128) <= 2 and abs(hi - 128) <= 2 for lo, hi in stored.getextrema())
    assert convert_image(data, ImageOptions(size=256)).jpeg == converted.jpeg      # deterministic


def test_a_png_over_the_limit_is_rejected_naming_its_size_and_the_limit():
    with pytest.raises(RejectedImage) as e:
        convert_image(png_header_only(20000, 10000), ImageOptions(size=256))
    limit = 2 * Image.MAX_IMAGE_PIXELS
    assert str(e.value) == (f"too large to decode: 200000000 pixels, over Pillow's limit of {limit} pixels "
                            "(only JPEGs can be decoded at reduced scale)")


def _samples(out: Path) -> dict[str, dict]:
    """source -> sample metadata, over every train shard."""
    found = {}
    for shard in ShardSet.open(out).shards("train"):
        with tarfile.open(shard.tar) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    found[meta["source"]] = meta
    return found


def test_make_shards_keeps_the_huge_jpeg_and_rejects_the_huge_png(tmp_path):
    tree = write_raw_imagenet(tmp_path / "raw", SampleSpec(classes=2, train_per_class=2, val_per_class=1,
                                                           odd_files=False, min_side=64, max_side=96))
    folder = tree.root / "train" / tree.classes[0]
    (folder / "huge_photo.JPEG").write_bytes(solid_grey_jpeg(*HUGE))
    (folder / "huge_scan.png").write_bytes(png_header_only(20000, 10000))
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        make_shards(tree.root, out, ShardOptions(per_shard=8, size=64), workers=1, progress=False,
                    log=lambda message: None)
        outs.append(out)
    samples = _samples(outs[0])
    huge = next(meta for source, meta in samples.items() if source.endswith("huge_photo.JPEG"))
    assert huge["wnid"] == tree.classes[0]
    rejected = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in ShardSet.open(outs[0]).manifest["rejected"]}
    assert list(rejected) == ["huge_scan.png"] and "200000000 pixels" in rejected["huge_scan.png"]
    # the same bytes every run
    for name in sorted(p.name for p in outs[0].iterdir() if p.suffix in (".tar", ".idx")):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
