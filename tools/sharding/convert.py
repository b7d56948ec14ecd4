"""One raw file -> one stored JPEG: read, decode (any mode/format Pillow knows), resize, re-encode.

Stored image: shorter side resized to `size` and the centre `size`x`size` square kept (the 2012
paper's preprocessing), or the whole image at shorter side `size` with `keep_aspect`; always a
baseline RGB JPEG. Anything that cannot be read or decoded raises RejectedImage with the reason.

Very large photos: Pillow refuses to open an image over its decompression-bomb limit
(2 x Image.MAX_IMAGE_PIXELS, ~179 megapixels; it warns above ~89). A JPEG that large is still kept:
it is decoded with draft (DCT-scaled) decoding at 1/8 of its size, never below the stored size, so a
192-megapixel photo costs 3 megapixels of memory. Other formats cannot decode at reduced scale and
are rejected with their pixel count and the limit.
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from dataclasses import dataclass

from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from alexnet_fast.pipeline.stats import image_moments
from alexnet_fast.tools.sharding.errors import RejectedImage
from alexnet_fast.tools.sharding.layout import RawItem

# Bilinear with Pillow's antialiasing support; the benchmark's baseline loop uses the same filter.
RESAMPLE = Image.Resampling.BILINEAR


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


def convert_image(data: bytes, opts: ImageOptions, *, moments: bool = False) -> Converted:
    """The stored image of one raw file (RejectedImage if there is none); with `moments`, also the
    statistics' moment vector of the stored JPEG as any reader decodes it (not of the pixels before
    encoding: stats.json describes what training reads)."""
    if not data:
        raise RejectedImage("empty file")
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
        tw, th = _target_size(orig_w, orig_h, opts.size)
        if im.format == "JPEG":
            # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding, never below the target:
            # most of the decode cost of a large JPEG disappears.
            im.draft("RGB", (tw, th))
        if im.size[0] * im.size[1] > _pixel_limit():   # what a huge JPEG still decodes to
            raise RejectedImage(f"too large to decode: {orig_w}x{orig_h} decodes to {im.size[0]}x{im.size[1]} "
                                f"even at reduced scale, over Pillow's limit of {_pixel_limit()} pixels")
        im.load()
        if im.mode != "RGB":  # CMYK, L, P, RGBA, I;16 ...: all stored as RGB
            im = im.convert("RGB")
        dw, dh = im.size  # after draft
        if opts.keep_aspect:
            out = im.resize((tw, th), RESAMPLE)
        else:
            # Crop box of the centre square in the (drafted) source, resized in one pass: the same
            # result as resize-then-crop, without resampling pixels that would be cut off.
            side = min(dw, dh)
            left, top = (dw - side) / 2, (dh - side) / 2
            out = im.resize((opts.size, opts.size), RESAMPLE, box=(left, top, left + side, top + side))
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=opts.quality, progressive=False, optimize=False)
    except RejectedImage:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data surfaces only at load()
        raise RejectedImage(f"cannot decode: {_describe(e)}") from None
    jpeg = buf.getvalue()
    return Converted(jpeg, out.size[0], out.size[1], orig_w, orig_h,
                     image_moments(jpeg, "stored image") if moments else None)


def _pixel_limit() -> int:
    """Pillow's decompression-bomb limit: the size Image.open refuses (it warns above half of it)."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 2**63


def _open(data: bytes) -> Image.Image:
    """Image.open, except that a JPEG over Pillow's decompression-bomb limit is opened anyway (its
    header only: convert_image drafts it to a small scale before anything is decoded); any other
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
