"""make_shards' conversion primitives (tools/sharding/convert.py) against the Pillow path they replace.

simplejpeg decodes YCbCr and greyscale JPEGs with Pillow's draft rule: the pixels must be Pillow's
exactly, at every DCT scale. torch's antialiased bilinear resize must stay within one level of
Pillow's BILINEAR. Files simplejpeg does not take (CMYK JPEGs, PNGs, JPEGs with extra bytes) must
still convert through Pillow. The statistics' decoder (pipeline/stats.py) must give Pillow's pixels
for stored JPEGs, since stats.json is defined by them.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_fast.pipeline.stats import decode_rgb
from alexnet_fast.tools.sample_data import draw_image
from alexnet_fast.tools.sharding import convert
from alexnet_fast.tools.sharding.convert import ImageOptions, convert_image


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return draw_image(seed % 7, 7, np.random.default_rng(seed), size=(w, h))


def encoded(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def with_extra_bytes(jpeg: bytes) -> bytes:
    """Two stray bytes after the first segment (APP0): libjpeg decodes it with the warning
    "Corrupt JPEG data: 2 extraneous bytes before marker", which simplejpeg's strict mode refuses."""
    end = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:end] + b"\x00\x00" + jpeg[end:]


def pillow_drafted(data: bytes, size: int = 256) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", convert._target_size(*im.size, size))
    return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("w,h,scale", [(300, 260, 1), (500, 375, 1), (700, 560, 2), (1300, 1100, 4), (2600, 2100, 8)])
def test_jpeg_decode_is_pillows_draft_exactly(w, h, scale):
    data = encoded(photo(w, h), quality=92)
    pixels, ow, oh = convert._decode_jpeg(data, 256)
    assert (ow, oh) == (w, h)
    assert pixels.shape == (-(-h // scale), -(-w // scale), 3)      # the DCT scale Pillow's draft picks
    assert np.array_equal(pixels, pillow_drafted(data))


def test_greyscale_jpeg_decodes_to_pillows_rgb():
    data = encoded(photo(420, 300).convert("L"), quality=90)
    pixels, _, _ = convert._decode_jpeg(data, 256)
    assert np.array_equal(pixels, pillow_drafted(data))


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (1024, 683), (300, 300)])
def test_resize_is_within_one_level_of_pillow_bilinear(w, h):
    pixels = np.asarray(photo(w, h, seed=w + h))
    ours = convert._resize(pixels, (256, 256), crop_square=True)
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    pillows = np.asarray(Image.fromarray(pixels[top:top + side, left:left + side]).resize((256, 256), convert.RESAMPLE))
    diff = np.abs(ours.astype(int) - pillows.astype(int))
    assert ours.shape == (256, 256, 3) and ours.dtype == np.uint8
    assert diff.max() <= 1 and (diff > 0).mean() < 0.05


@pytest.mark.parametrize("w,h,keep_aspect", [(500, 375, False), (353, 500, False), (500, 375, True), (200, 150, True)])
def test_resize_is_torchs_interpolate_exactly(w, h, keep_aspect):
    """The direct call into the kernel (for its HWC output) gives F.interpolate's pixels."""
    pixels = np.array(photo(w, h, seed=3))
    out_hw = convert._target_size(w, h, 256)[::-1] if keep_aspect else (256, 256)
    ours = convert._resize(pixels, out_hw, crop_square=not keep_aspect)
    if not keep_aspect:
        side = min(w, h)
        pixels = pixels[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    reference = torch.nn.functional.interpolate(x, size=out_hw, mode="bilinear", antialias=True, align_corners=False)
    assert ours.shape == (*out_hw, 3) and ours.flags.c_contiguous
    assert np.array_equal(ours, reference[0].permute(1, 2, 0).numpy())


def test_keep_aspect_keeps_the_whole_image_at_the_shorter_side():
    out = convert_image(encoded(photo(500, 375)), ImageOptions(keep_aspect=True))
    assert (out.w, out.h) == (341, 256)
    assert Image.open(io.BytesIO(out.jpeg)).size == (341, 256)


@pytest.mark.parametrize("make", [
    lambda: encoded(photo(400, 320).convert("CMYK")),            # Adobe CMYK JPEG: simplejpeg declines it
    lambda: encoded(photo(400, 320), "PNG"),
    lambda: encoded(photo(400, 320).convert("RGBA"), "PNG"),
    lambda: with_extra_bytes(encoded(photo(400, 320))),                # libjpeg warns: extraneous bytes
], ids=["cmyk-jpeg", "png", "rgba-png", "jpeg-with-extra-bytes"])
def test_files_simplejpeg_declines_still_convert_through_pillow(make):
    data = make()
    assert convert._decode_jpeg(data, 256) is None              # not simplejpeg's: Pillow decodes it
    out = convert_image(data, ImageOptions())
    stored = np.asarray(Image.open(io.BytesIO(out.jpeg)))
    assert (out.orig_w, out.orig_h) == (400, 320) and stored.shape == (256, 256, 3)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (256, 256), convert.RESAMPLE, box=(40, 0, 360, 320))).astype(int)
    assert np.abs(stored.astype(int) - reference).mean() < 6        # the same picture, after a q90 round trip


def test_a_cut_jpeg_is_rejected_with_pillows_reason():
    data = encoded(photo(400, 320))
    with pytest.raises(convert.RejectedImage, match="cannot decode: OSError: image file is truncated"):
        convert_image(data[: len(data) // 2], ImageOptions())


def test_the_statistics_decoder_gives_pillows_pixels_for_stored_jpegs():
    for seed, (w, h) in enumerate([(500, 375), (640, 480), (256, 300), (1200, 900)]):
        stored = convert_image(encoded(photo(w, h, seed), quality=95), ImageOptions()).jpeg
        assert np.array_equal(decode_rgb(stored, "x"), np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")))


def test_conversion_is_deterministic_and_names_its_recipe():
    data = encoded(photo(700, 500))
    assert convert_image(data, ImageOptions()).jpeg == convert_image(data, ImageOptions()).jpeg
    assert "simplejpeg" in convert.CONVERTER and "torch" in convert.CONVERTER
