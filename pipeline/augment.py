"""The 2012 paper's augmentation: its parameters, how they are drawn, and the NumPy reference math.

One sample's augmentation is fully described by `SampleParams`: where the 227x227 crop sits
(relative position in [0, 1] per axis, as DALI's `crop_pos_x/y`), whether it is mirrored, and the
lighting coefficients `alpha` (3 values, N(0, lighting_std)). Given those, the output is

    x   = crop(mirror(pixels)) / 255                  # [0, 1], RGB
    x  += eigvec @ (alpha * eigval)                   # PCA lighting (one RGB shift per image)
    out = (x - mean) / std                            # per-channel normalization

with mean/std/eigval/eigvec from the shard set's `stats.json` (on [0, 1] pixels, eigvec columns
are the eigenvectors). Lighting is a constant per-image shift, so it folds into the normalization
mean: out = (pixels - 255 * (mean - delta)) / (255 * std). The DALI pipelines run exactly that as one
`crop_mirror_normalize` with a per-sample mean; `reference_augment` below is the NumPy statement of
the same math, used by the baseline loader and by the tests that check the DALI pipelines.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CROP = 227
# Ten-crop evaluation views (relative crop positions, mirror): four corners and the centre, then
# the same five mirrored -- the order torchvision's TenCrop uses.
TEN_CROP_POSITIONS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
TEN_CROP_VIEWS = tuple((x, y, m) for m in (False, True) for (x, y) in TEN_CROP_POSITIONS)


@dataclass(frozen=True)
class ColorStats:
    """Per-channel statistics of the train split on [0, 1] pixels (from stats.json)."""
    mean: np.ndarray     # [3]
    std: np.ndarray      # [3]
    eigval: np.ndarray   # [3] eigenvalues of the RGB covariance
    eigvec: np.ndarray   # [3, 3] columns are the eigenvectors

    @classmethod
    def from_dict(cls, stats: dict) -> "ColorStats":
        arr = lambda key: np.asarray(stats[key], dtype=np.float64)  # noqa: E731
        out = cls(arr("mean"), arr("std"), arr("eigval"), arr("eigvec"))
        if out.mean.shape != (3,) or out.std.shape != (3,) or out.eigval.shape != (3,) or out.eigvec.shape != (3, 3):
            raise ValueError("stats.json: mean/std/eigval must have 3 values and eigvec 3x3")
        return out

    def lighting_delta(self, alpha: np.ndarray) -> np.ndarray:
        """The RGB shift `eigvec @ (alpha * eigval)` for alpha [..., 3] -> [..., 3]."""
        return (np.asarray(alpha, dtype=np.float64) * self.eigval) @ self.eigvec.T

    def centred_only(self) -> "ColorStats":
        """The same statistics with std = 1 on the 0..255 scale: normalizing with them only
        subtracts the mean, which gives the paper's input, "the (centered) raw RGB values"."""
        return ColorStats(self.mean, np.full(3, 1.0 / 255.0), self.eigval, self.eigvec)

    @property
    def mean_255(self) -> np.ndarray:
        return self.mean * 255.0

    @property
    def std_255(self) -> np.ndarray:
        return self.std * 255.0


@dataclass(frozen=True)
class SampleParams:
    """Everything random about one train sample's augmentation."""
    crop_x: float          # relative crop position in [0, 1] (0 = left edge, 1 = right edge)
    crop_y: float
    mirror: bool
    alpha: np.ndarray      # [3] PCA lighting coefficients


def crop_offset(position: float, size: int, crop: int) -> int:
    """Pixel offset of a crop at relative `position`, rounded the way DALI's crop does (half up, in
    float32), so the reference and the pipelines cut exactly the same window."""
    return int(np.floor(np.float32(position) * np.float32(size - crop) + np.float32(0.5)))


def draw_params(rng: np.random.Generator, lighting_std: float = 0.1) -> SampleParams:
    """One sample's parameters: uniform crop position, fair-coin mirror, alpha ~ N(0, lighting_std)."""
    x, y = rng.random(2, dtype=np.float32)
    mirror = bool(rng.random() < 0.5)
    alpha = rng.normal(0.0, lighting_std, 3) if lighting_std > 0 else np.zeros(3)
    return SampleParams(float(x), float(y), mirror, alpha)


def reference_augment(pixels: np.ndarray, params: SampleParams, stats: ColorStats, crop: int = CROP) -> np.ndarray:
    """HWC uint8 RGB image -> CHW float32 after crop, mirror, lighting, normalization."""
    h, w = pixels.shape[:2]
    x0, y0 = crop_offset(params.crop_x, w, crop), crop_offset(params.crop_y, h, crop)
    window = pixels[y0:y0 + crop, x0:x0 + crop]
    if params.mirror:
        window = window[:, ::-1]
    delta = stats.lighting_delta(params.alpha)
    out = (window.astype(np.float32) - (stats.mean_255 - 255.0 * delta).astype(np.float32)) / stats.std_255.astype(np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def centre_params() -> SampleParams:
    return SampleParams(0.5, 0.5, False, np.zeros(3))


def reference_ten_crop(pixels: np.ndarray, stats: ColorStats, crop: int = CROP) -> np.ndarray:
    """HWC uint8 -> [10, 3, crop, crop]: TEN_CROP_VIEWS in order, no lighting."""
    return np.stack([reference_augment(pixels, SampleParams(x, y, m, np.zeros(3)), stats, crop)
                     for (x, y, m) in TEN_CROP_VIEWS])
