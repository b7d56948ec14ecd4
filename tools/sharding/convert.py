"""One raw file -> one stored JPEG: read, decode (any mode/format Pillow knows), resize, re-encode.

Stored image: shorter side resized to `size` and the centre `size`x`size` square kept (the 2012
paper's preprocessing), or the whole image at shorter side `size` with `keep_aspect`; always a
baseline RGB JPEG. Anything that cannot be read or decoded raises RejectedImage with the reason.

The primitives (measured per stage in benchmarks/RESULTS.md, issue 18):
* decode: a YCbCr or greyscale JPEG goes to libjpeg-turbo through simplejpeg, DCT-scaled by 1/2, 1/4
  or 1/8 where that stays at or above the stored size (the same pixels as Pillow's `draft`, without
  Pillow's per-image Python); every other file, and any JPEG simplejpeg refuses (CMYK, warnings such
  as extra bytes, truncation), goes to Pillow, whose message names the problem when it fails too.
* resize: antialiased bilinear on uint8 pixels by torch (the kernel of `interpolate(antialias=True)`,
  written straight into HWC memory: Pillow's BILINEAR filter within one level, ~3x less CPU); one
  thread per process, since make_shards runs one converter per core.
* encode: libjpeg-turbo through simplejpeg, baseline, quality `quality`, 4:2:0 (as Pillow's default
  at this quality), ~30% less CPU than through Pillow.
`CONVERTER` names this recipe and the libraries' versions in the job fingerprint, so that a resume
never mixes shards of two recipes.

Very large photos: a JPEG over Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, ~179
megapixels) is still kept: decoded at 1/8 of its size, never below the stored size, a 192-megapixel
photo costs 3 megapixels of memory. Other formats cannot decode at reduced scale and are rejected
with their pixel count and the limit.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from importlib.metadata import version as _version

import numpy as np
import simplejpeg
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from alexnet_fast.pipeline.stats import image_moments
from alexnet_fast.tools.sharding.errors import RejectedImage
from alexnet_fast.tools.sharding.layout import RawItem

# What decides the stored pixels besides ImageOptions, with the versions of the libraries that do
# the work: part of the job fingerprint (manifest.py) and recorded in manifest.json.
CONVERTER = (f"2: simplejpeg {_version('simplejpeg')} / Pillow {_version('pillow')} decode with power-of-2 DCT "
             f"scaling, torch {_version('torch').split('+')[0]} antialiased bilinear, simplejpeg q/4:2:0 encode")

# Pillow's filter, kept for the benchmark's baseline loop (benchmarks/make_shards.py).
RESAMPLE = Image.Resampling.BILINEAR

# JPEG colour spaces simplejpeg decodes to the RGB Pillow would give; others (CMYK, YCCK) go to Pillow.
_SIMPLEJPEG_SPACES = {"YCbCr", "Gray"}


@dataclass(frozen=True)
class ImageOptions:
    size: int = 256
    keep_aspect: bool = False
    quality: int = 90


@dataclass(frozen=True)
class Converted:
    jpeg: bytes
    w: int  # stored size
    h: int
    orig_w: int
    orig_h: int
    # stats.json's moment vector of the stored JPEG's decoded pixels (pipeline/stats.py), when asked:
    # the statistics come from this pass instead of a second read of the train shards.
    moments: tuple[int, ...] | None = None


def read_item(item: RawItem) -> bytes:
    """The raw bytes of an input file or tar member; OSErrors become rejections."""
    try:
        if item.size < 0:
            st = os.stat(item.file)  # follows symlinks: a loop or dangling link raises here
            if not stat.S_ISREG(st.st_mode):
                raise RejectedImage("not a regular file")  # fifos would block open(); dirs cannot be read
            with open(item.file, "rb") as f:
                return f.read()
        with open(item.file, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.size)
    except OSError as e:
        raise RejectedImage(f"cannot read: {e.strerror or e}") from None
    if len(data) != item.size:
        raise RejectedImage(f"tar member cut short ({len(data)} of {item.size} bytes)")
    return data


def _describe(error: Exception) -> str:
    """`Type: message` without object addresses, so the same file gets the same reason every run."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(error).__name__}: {error}")


def _target_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side exactly `size`."""
    if w <= h:
        return size, max(1, round(h * size / w))
    return max(1, round(w * size / h)), size


def _draft_scale(w: int, h: int, tw: int, th: int) -> int:
    """Pillow's `draft` rule: the largest of 1, 2, 4, 8 that divides (w, h) without going below (tw, th)."""
    scale = min(w // tw, h // th)
    return 8 if scale >= 8 else 4 if scale >= 4 else 2 if scale >= 2 else 1


def convert_image(data: bytes, opts: ImageOptions, *, moments: bool = False) -> Converted:
    """The stored image of one raw file (RejectedImage if there is none); with `moments`, also the
    statistics' moment vector of the stored JPEG as any reader decodes it (not of the pixels before
    encoding: stats.json describes what training reads)."""
    if not data:
        raise RejectedImage("empty file")
    pixels, orig_w, orig_h = _decode_jpeg(data, opts.size) or _decode_with_pillow(data, opts.size)
    tw, th = _target_size(orig_w, orig_h, opts.size)
    out = _resize(pixels, (th, tw) if opts.keep_aspect else (opts.size, opts.size), crop_square=not opts.keep_aspect)
    try:
        jpeg = simplejpeg.encode_jpeg(out, quality=opts.quality, colorspace="RGB", colorsubsampling="420")
    except ValueError as e:  # an encoder failure is this image's, not the run's
        raise RejectedImage(f"cannot encode: {_describe(e)}") from None
    return Converted(jpeg, out.shape[1], out.shape[0], orig_w, orig_h,
                     image_moments(jpeg, "stored image") if moments else None)


def _decode_jpeg(data: bytes, size: int) -> tuple[np.ndarray, int, int] | None:
    """(RGB pixels, original width, height) of a YCbCr or greyscale JPEG, DCT-scaled like Pillow's
    draft; None for anything else simplejpeg does not decode cleanly (Pillow then decides)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    # Whatever simplejpeg raises on hostile bytes (ValueError for libjpeg's errors and warnings),
    # Pillow gets the file next and names the problem in the rejection.
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:  # noqa: BLE001 - see above
        return None
    if colorspace not in _SIMPLEJPEG_SPACES or w < 1 or h < 1:
        return None
    scale = _draft_scale(w, h, *_target_size(w, h, size))
    dw, dh = -(-w // scale), -(-h // scale)
    if dw * dh > _pixel_limit():
        raise RejectedImage(f"too large to decode: {w}x{h} decodes to {dw}x{dh} even at reduced scale, "
                            f"over Pillow's limit of {_pixel_limit()} pixels")
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=dw, min_height=dh), w, h
    except Exception:  # noqa: BLE001 - see above
        return None


def _decode_with_pillow(data: bytes, size: int) -> tuple[np.ndarray, int, int]:
    """(RGB pixels, original width, height) by Pillow: any format it knows, any mode, JPEGs drafted."""
    # Pillow raises many exception types on hostile bytes (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError, ...): every one of them means "not a usable image".
    try:
        im = _open(data)
    except RejectedImage:
        raise
    except UnidentifiedImageError:
        raise RejectedImage("not an image: no image format recognised") from None
    except Exception as e:  # noqa: BLE001 - see above
        raise RejectedImage(f"not an image: {_describe(e)}") from None
    try:
        orig_w, orig_h = im.size
        if orig_w < 1 or orig_h < 1:
            raise RejectedImage(f"image has no pixels ({orig_w}x{orig_h})")
        if im.format == "JPEG":
            # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding, never below the target.
            im.draft("RGB", _target_size(orig_w, orig_h, size))
        if im.size[0] * im.size[1] > _pixel_limit():   # what a huge JPEG still decodes to
            raise RejectedImage(f"too large to decode: {orig_w}x{orig_h} decodes to {im.size[0]}x{im.size[1]} "
                                f"even at reduced scale, over Pillow's limit of {_pixel_limit()} pixels")
        im.load()
        if im.mode != "RGB":  # CMYK, L, P, RGBA, I;16 ...: all stored as RGB
            im = im.convert("RGB")
        return np.asarray(im), orig_w, orig_h
    except RejectedImage:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data surfaces only at load()
        raise RejectedImage(f"cannot decode: {_describe(e)}") from None


def _resize(pixels: np.ndarray, out_hw: tuple[int, int], crop_square: bool) -> np.ndarray:
    """HxWx3 uint8 -> out_hw, antialiased bilinear; with `crop_square`, of the centre square (whole
    pixels; a half-pixel offset is rounded down) rather than the whole image."""
    h, w = pixels.shape[:2]
    if crop_square:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        pixels = pixels[top:top + side, left:left + side]
    if pixels.shape[:2] == out_hw:
        return np.ascontiguousarray(pixels)
    # Contiguous (the crop is a strided view) and writable (torch.from_numpy warns on a read-only
    # array, as np.asarray of a PIL image is): one copy at most.
    pixels = np.require(pixels, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    torch = _torch()
    out = torch.empty((1, *out_hw, 3), dtype=torch.uint8)             # HWC bytes, as the encoder takes them
    with _one_thread(torch):
        x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)    # NCHW view of HWC
        # F.interpolate's kernel (antialias=True), writing into a channels_last `out` as it stands:
        # F.interpolate itself returns NCHW, and transposing that back to HWC costs more than the resize.
        torch.ops.aten._upsample_bilinear2d_aa.out(x, list(out_hw), False, None, None, out=out.permute(0, 3, 1, 2))
    return out[0].numpy()


def warm_up() -> None:
    """Import torch (~2 CPU-s) now, before a pool forks, so that its workers inherit it rather than
    each import it; until then make_shards' quick paths (--help, a bad RAW, an up-to-date OUT) skip it."""
    _torch()


@functools.cache
def _torch():
    import torch

    return torch


@contextlib.contextmanager
def _one_thread(torch):
    """torch on one thread for one resize: make_shards already runs one converter per core, and an
    OpenMP team per 0.4-ms resize costs more than it saves. The caller's setting is put back."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pixel_limit() -> int:
    """Pillow's decompression-bomb limit: the size Image.open refuses (it warns above half of it)."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 2**63


def _open(data: bytes) -> Image.Image:
    """Image.open, except that a JPEG over Pillow's decompression-bomb limit is opened anyway (its
    header only: the caller drafts it to a small scale before anything is decoded); any other
    format over the limit is a RejectedImage naming its size and the limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            bomb = e
    if data[:3] == b"\xff\xd8\xff":
        # The plugin's own constructor reads the header without Image.open's bomb check.
        return JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    if isinstance(bomb, Image.DecompressionBombWarning):
        return Image.open(io.BytesIO(data))    # under the hard limit: decoded in full, as Pillow allows
    pixels = re.search(r"\((\d+) pixels\)", str(bomb))
    size = f"{int(pixels.group(1))} pixels" if pixels else "its size"
    raise RejectedImage(f"too large to decode: {size}, over Pillow's limit of {_pixel_limit()} pixels "
                        "(only JPEGs can be decoded at reduced scale)")
