"""The baseline loader against first principles, not against the reference function it calls itself
(augment.reference_augment, which the DALI tests also compare with).

Its input here is a shard set whose images say where each pixel came from: red = column, green =
row, blue = the sample's number (3 n + 2), 256x256. A crop, a mirror and a sample can then be read
off the loader's output directly: the crop's top-left corner from the red and green ramps, the
mirror from the direction of the red one, the sample from the blue level. Lighting is off where
positions are read (it shifts each channel by a constant).

`train` and `eval` with `--loader baseline` on the CPU: tests/test_recipes.py (the torchvision
recipe's run) and tests/test_eval.py (the eval command's counts equal the DALI loader's)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_fast.pipeline.augment import CROP
from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

SIZE = 256
WNIDS = ["n00000001", "n00000002", "n00000003", "n00000004"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 16, 2          # 64 train samples: 2 ranks x 2 workers x 2 batches of 8
RAMP_TOLERANCE = 0.25                           # of a pixel, on a position averaged over a whole crop


def _coded_image(number: int) -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return Image.fromarray(np.stack([x, y, np.full_like(x, 3 * number + 2)], axis=-1).astype(np.uint8))


@pytest.fixture(scope="module")
def coded_set(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("coded_raw")
    number = 0
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for wnid in WNIDS:
            (raw / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                _coded_image(number).save(raw / split / wnid / f"{wnid}_{i}.JPEG", quality=95)
                number += 1
    out = tmp_path_factory.mktemp("coded_set")
    make_shards(raw, out, ShardOptions(per_shard=16), workers=1, progress=False, log=lambda msg: None)
    return out


@dataclasses.dataclass(frozen=True)
class View:
    x0: float           # the crop's left column in the 256x256 image
    y0: float           # its top row
    mirrored: bool
    number: int         # the sample


def read_view(image: torch.Tensor, std_255: np.ndarray, mean_255: np.ndarray) -> View:
    """Where a [3, 227, 227] output came from, read off its pixels (normalization undone)."""
    assert image.shape == (3, CROP, CROP)
    red, green, blue = image.double().numpy() * std_255[:, None, None] + mean_255[:, None, None]
    cols = np.arange(CROP, dtype=np.float64)
    mirrored = bool(np.mean(red[:, -1] - red[:, 0]) < 0)
    x0 = np.mean(red - (cols[::-1] if mirrored else cols)[None, :])
    y0 = np.mean(green - cols[:, None])
    assert abs(np.mean(green[-1] - green[0]) - (CROP - 1)) < 2, "rows are flipped or scaled"
    assert abs(abs(np.mean(red[:, -1] - red[:, 0])) - (CROP - 1)) < 2, "columns are scaled"
    return View(float(x0), float(y0), mirrored, int(round((np.mean(blue) - 2) / 3)))


def _views(loader) -> list[View]:
    stats = loader.stats
    views = []
    for images, _ in loader:
        flat = images.flatten(0, 1) if images.ndim == 5 else images
        views += [read_view(image, stats.std_255, stats.mean_255) for image in flat]
    return views


def _spec(data, **kw) -> LoaderSpec:
    return LoaderSpec(data=str(data), kind="baseline", batch_size=8, workers=2, seed=5, lighting_std=0.0, **kw)


def _integer(position: float) -> int:
    assert abs(position - round(position)) < RAMP_TOLERANCE, f"a crop between pixels: {position}"
    return int(round(position))


@pytest.fixture(scope="module")
def train_views(coded_set) -> dict[tuple[int, int], list[View]]:
    """{(epoch, rank): the views that rank's baseline loader hands out} for 2 epochs on 2 ranks."""
    out = {}
    for rank in (0, 1):
        loader = make_loader(_spec(coded_set, split="train", rank=rank, world_size=2))
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            out[epoch, rank] = _views(loader)
    return out


def test_train_crops_are_227_windows_inside_the_image_spread_over_every_position(train_views):
    views = [v for vs in train_views.values() for v in vs]
    assert len(views) == 2 * 64
    xs, ys = [_integer(v.x0) for v in views], [_integer(v.y0) for v in views]
    span = SIZE - CROP                                  # 29: the last left column a crop can start at
    assert 0 <= min(xs) and max(xs) <= span and 0 <= min(ys) and max(ys) <= span
    # drawn uniformly over 0..29 (128 draws): the range is reached at both ends, the mean is central
    assert min(xs) <= 2 and max(xs) >= span - 2 and min(ys) <= 2 and max(ys) >= span - 2
    sd_of_mean = math.sqrt(((span + 1) ** 2 - 1) / 12 / len(views))
    assert abs(np.mean(xs) - span / 2) < 4 * sd_of_mean and abs(np.mean(ys) - span / 2) < 4 * sd_of_mean
    assert len(set(zip(xs, ys))) > len(views) // 2        # not a few positions repeated


def test_train_mirrors_half_the_samples(train_views):
    flips = [v.mirrored for vs in train_views.values() for v in vs]
    n = len(flips)
    # a fair coin: within 4 standard deviations of the binomial (n = 128: 64 +- 22)
    assert abs(sum(flips) - n / 2) <= 4 * math.sqrt(n / 4), f"{sum(flips)} of {n} mirrored"


def test_train_samples_split_between_ranks_disjoint_and_covering(train_views, coded_set):
    train_numbers = set(range(len(WNIDS) * TRAIN_PER_CLASS))
    for epoch in (0, 1):
        ranks = [[v.number for v in train_views[epoch, rank]] for rank in (0, 1)]
        assert all(len(r) == len(set(r)) for r in ranks), "a sample twice in one rank's epoch"
        assert not set(ranks[0]) & set(ranks[1]), "a sample on both ranks"
        assert set(ranks[0]) | set(ranks[1]) == train_numbers       # 64 = 2 ranks x 2 workers x 2 batches of 8
    # and a new epoch is a new order
    assert [v.number for v in train_views[0, 0]] != [v.number for v in train_views[1, 0]]


def test_val_is_the_centre_crop_unmirrored_and_ten_crop_the_corners_and_centre(coded_set):
    val_numbers = set(range(len(WNIDS) * TRAIN_PER_CLASS, len(WNIDS) * (TRAIN_PER_CLASS + VAL_PER_CLASS)))
    views = [v for rank in (0, 1) for v in _views(make_loader(_spec(coded_set, split="val", rank=rank, world_size=2)))]
    assert sorted(v.number for v in views) == sorted(val_numbers)      # each val sample once over the 2 ranks
    for v in views:         # centred: (256 - 227) / 2 = 14.5 from each edge, to the half pixel
        assert abs(_integer(v.x0) - 14.5) == 0.5 and _integer(v.x0) == _integer(v.y0) and not v.mirrored, v

    ten = _views(make_loader(_spec(coded_set, split="val", ten_crop=True)))
    assert len(ten) == 10 * len(val_numbers)
    span = SIZE - CROP
    corners = [(0, 0, False), (span, 0, False), (0, span, False), (span, span, False)]
    for first in range(0, len(ten), 10):
        sample = ten[first:first + 10]
        assert len({v.number for v in sample}) == 1
        got = [(_integer(v.x0), _integer(v.y0), v.mirrored) for v in sample]
        centre = got[4]
        assert got[:4] == corners and got[5:9] == [(x, y, True) for x, y, _ in corners], got
        assert abs(centre[0] - 14.5) == 0.5 and centre[0] == centre[1] and got[9] == (*centre[:2], True)
