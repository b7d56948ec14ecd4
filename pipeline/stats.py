"""Dataset colour statistics for normalization and PCA lighting (`stats.json`), computed with Numba.

    stats = compute_stats(train_tars, max_images=None, seed=0, workers=8)
    write_stats(shard_dir, stats)

Over the decoded train pixels scaled to [0,1]: per-channel mean and std, the 3x3 RGB covariance and
its eigen-decomposition (what the 2012 paper's PCA lighting perturbs along). Schema of stats.json:

    {"images": int, "pixels": int,
     "mean": [r, g, b], "std": [r, g, b],              # population std (divides by the pixel count)
     "covariance": [[3x3]],
     "eigval": [3] descending, "eigvec": [[3x3]],      # COLUMNS are eigenvectors: eigvec[:, i] <-> eigval[i]
     "pixel_scale": "0-1",
     "sample": {"max_images": int | null, "seed": int}}

Why the sums are integers: a Numba kernel sums r, g, b and the six products rr, rg, rb, gg, gb, bb
of each image's uint8 pixels in int64 (exact: 255^2 x 2^47 pixels would still fit), and the parts
are added as Python ints. Integer sums are exact and associative, so the result does not depend on
how images are split over workers or in which order parts come back: the same shards and seed give
a byte-identical stats.json (make_shards relies on that after a resumed run). The covariance is then
formed as (n*P - S*S^T) / (255^2 n^2) in exact integer arithmetic and rounded once to float64, so
there is no catastrophic cancellation either.

Two ways to the same file: `compute_stats` decodes the stored JPEGs back out of the train shards
(`alexnet-fast stats`); make_shards gets the same moments in its conversion pass instead
(`image_moments` of each stored JPEG right after encoding it, summed per shard in its resume
sidecar, then `stats_from_moments`), without reading the shards again. Same decoder (`decode_rgb`),
same integer sums: the same bytes.

Eigenvector signs are fixed (each column's largest-magnitude component is positive) so that the
file does not depend on the LAPACK build's sign choice.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numba
import numpy as np
import simplejpeg
from PIL import Image

from alexnet_fast.pipeline.procpool import fork_pool
from alexnet_fast.pipeline.shardset import STATS_NAME

PIXEL_MAX = 255
# Moment vector layout: [pixels, r, g, b, rr, rg, rb, gg, gb, bb]
_PRODUCT_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
_MOMENTS = 10


class StatsError(Exception):
    """The train shards cannot give statistics (missing, empty, an image that does not decode); one line."""


@numba.njit(cache=True, nogil=True)
def _add_pixel_moments(rgb: np.ndarray, acc: np.ndarray) -> None:
    """acc += [pixels, sum r, sum g, sum b, sum rr, rg, rb, gg, gb, bb] (int64) of flat interleaved
    uint8 RGB (an HxWx3 image's `reshape(-1)`: one flat loop runs ~3.5x faster than a 3-D one)."""
    n = rgb.shape[0] // 3
    s0 = s1 = s2 = p00 = p01 = p02 = p11 = p12 = p22 = 0
    for i in range(n):
        r = np.int64(rgb[3 * i])
        g = np.int64(rgb[3 * i + 1])
        b = np.int64(rgb[3 * i + 2])
        s0 += r
        s1 += g
        s2 += b
        p00 += r * r
        p01 += r * g
        p02 += r * b
        p11 += g * g
        p12 += g * b
        p22 += b * b
    acc[0] += n
    acc[1] += s0
    acc[2] += s1
    acc[3] += s2
    acc[4] += p00
    acc[5] += p01
    acc[6] += p02
    acc[7] += p11
    acc[8] += p12
    acc[9] += p22


def decode_rgb(data: bytes, where: str) -> np.ndarray:
    """A JPEG's pixels as uint8 HxWx3 (RGB), or StatsError naming `where`.

    libjpeg-turbo through simplejpeg (half the CPU of Pillow's decode of a 256x256 JPEG), with
    Pillow as the fallback for what simplejpeg refuses: both run libjpeg-turbo's exact integer IDCT
    and fancy upsampling, so the pixels are the same (tests/test_convert.py compares them)."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - whatever simplejpeg refuses, Pillow decodes or names the problem
        pass
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for bad data; the caller needs one clear line
        raise StatsError(f"{where}: cannot decode image: {e}") from None


def iter_tar_images(tar_path: Path, wanted: frozenset[str] | None = None) -> Iterable[tuple[str, bytes]]:
    """(member name, bytes) of each `<key>.jpg` in a shard tar, in tar order (only `wanted` names if given)."""
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".jpg"):
                    continue
                if wanted is not None and member.name not in wanted:
                    continue
                yield member.name, tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as e:
        raise StatsError(f"cannot read shard {str(tar_path)!r}: {e}") from None


def list_tar_images(tar_path: Path) -> list[str]:
    """Names of the `<key>.jpg` members of a shard tar, in tar order (headers only, no image bytes)."""
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            return [m.name for m in tar if m.isfile() and m.name.endswith(".jpg")]
    except (OSError, tarfile.TarError) as e:
        raise StatsError(f"cannot read shard {str(tar_path)!r}: {e}") from None


def warm_up() -> None:
    """Compile (or load from Numba's cache) the moments kernel now, so forked workers inherit it."""
    _add_pixel_moments(np.zeros(3, np.uint8), np.zeros(_MOMENTS, np.int64))


def image_moments(jpeg: bytes, where: str) -> tuple[int, ...]:
    """The moment vector [pixels, r, g, b, rr, rg, rb, gg, gb, bb] of one stored JPEG's decoded
    pixels, exactly what `compute_stats` adds for it (same decode, same kernel)."""
    acc = np.zeros(_MOMENTS, dtype=np.int64)
    _add_pixel_moments(decode_rgb(jpeg, where).reshape(-1), acc)
    return tuple(int(v) for v in acc)


def add_moments(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> list[int]:
    """Element-wise sum as Python ints: exact, so the order of additions never matters."""
    return [int(x) + int(y) for x, y in zip(a, b)]


def zero_moments() -> list[int]:
    return [0] * _MOMENTS


def sum_moments(vectors: Iterable[list[int] | tuple[int, ...]]) -> list[int]:
    """The element-wise sum of moment vectors (zeros for none), exact and order-free (add_moments)."""
    total = zero_moments()
    for vector in vectors:
        total = add_moments(total, vector)
    return total


@dataclass(frozen=True)
class _Task:
    tar: Path
    members: tuple[str, ...] | None   # None: every image in the tar


def _task_moments(task: _Task) -> tuple[int, list[int]]:
    """(images, moment vector as Python ints) of one task; runs in a worker process."""
    acc = np.zeros(_MOMENTS, dtype=np.int64)
    images = 0
    wanted = None if task.members is None else frozenset(task.members)
    for name, data in iter_tar_images(task.tar, wanted):
        _add_pixel_moments(decode_rgb(data, f"{task.tar.name}:{name}").reshape(-1), acc)
        images += 1
    if task.members is not None and images != len(task.members):
        raise StatsError(f"{task.tar.name}: {len(task.members) - images} sampled image(s) vanished while reading")
    return images, [int(v) for v in acc]


def _make_tasks(train_tars: list[Path], max_images: int | None, seed: int) -> list[_Task]:
    if max_images is None:
        return [_Task(Path(t), None) for t in train_tars]
    names = [list_tar_images(Path(t)) for t in train_tars]
    total = sum(len(n) for n in names)
    if max_images >= total:
        return [_Task(Path(t), None) for t in train_tars]
    # One global seeded draw over all train images, so the sample does not depend on the shard sizes' split.
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=max_images, replace=False))
    tasks, start = [], 0
    for tar, tar_names in zip(train_tars, names):
        stop = start + len(tar_names)
        picked = chosen[(chosen >= start) & (chosen < stop)] - start
        if len(picked):
            tasks.append(_Task(Path(tar), tuple(tar_names[i] for i in picked)))
        start = stop
    return tasks


def moments_to_stats(moments: list[int], images: int) -> dict:
    """The stats.json numbers from the exact integer moments [n, S_r, S_g, S_b, P_rr, P_rg, ...]."""
    n, sums = moments[0], moments[1:4]
    products = dict(zip(_PRODUCT_PAIRS, moments[4:]))
    scale2 = PIXEL_MAX * PIXEL_MAX
    mean = [s / (PIXEL_MAX * n) for s in sums]   # int / int: correctly rounded
    cov = np.empty((3, 3), dtype=np.float64)
    for (i, j), p in products.items():
        # Exact integer numerator: no cancellation between E[xy] and E[x]E[y].
        cov[i, j] = cov[j, i] = (n * p - sums[i] * sums[j]) / (scale2 * n * n)
    std = np.sqrt(np.maximum(np.diag(cov), 0.0))
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    signs = np.sign(eigvec[np.argmax(np.abs(eigvec), axis=0), np.arange(3)])
    eigvec = eigvec * np.where(signs == 0, 1.0, signs)
    return {
        "images": int(images),
        "pixels": int(n),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "covariance": cov.tolist(),
        "eigval": [float(v) for v in eigval],
        "eigvec": eigvec.tolist(),
        "pixel_scale": "0-1",
    }


def compute_stats(train_tars: list[Path], *, max_images: int | None = None, seed: int = 0,
                  workers: int | None = None, progress: bool = False) -> dict:
    """Statistics of the train images in `train_tars` (all, or a seeded sample of `max_images`).

    Deterministic: the same tars and seed give the same dict whatever `workers` is."""
    if not train_tars:
        raise StatsError("no train shards to compute statistics from")
    if max_images is not None and max_images < 1:
        raise StatsError(f"max_images must be at least 1, got {max_images}")
    tasks = _make_tasks([Path(t) for t in train_tars], max_images, seed)
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    warm_up()  # compile once here; forked workers inherit the machine code

    images, total = 0, zero_moments()
    with _task_results(tasks, workers) as results:
        bar = _progress_bar(tasks, progress)  # after the fork: no tqdm monitor thread in the workers
        for task_images, moments in results:
            images += task_images
            total = add_moments(total, moments)
            bar(task_images)
        bar(None)
    return stats_from_moments(total, images, max_images=max_images, seed=seed)


def stats_from_moments(moments: list[int], images: int, *, max_images: int | None, seed: int) -> dict:
    """stats.json's dict from the summed moments of `images` images (the sample they were drawn as)."""
    if images == 0 or moments[0] == 0:
        raise StatsError("the train shards hold no images")
    stats = moments_to_stats(moments, images)
    stats["sample"] = {"max_images": max_images, "seed": seed}
    return stats


@contextlib.contextmanager
def _task_results(tasks: list[_Task], workers: int) -> Iterator[Iterable[tuple[int, list[int]]]]:
    """The tasks' results in task order, from `workers` forked processes (or this one)."""
    if workers == 1:
        yield map(_task_moments, tasks)
        return
    with fork_pool(workers) as pool:
        yield pool.imap(_task_moments, tasks)


def _progress_bar(tasks: list[_Task], enabled: bool) -> Callable[[int | None], None]:
    """update(n images) / update(None) to close; a no-op when disabled."""
    if not enabled:
        return lambda n: None
    from tqdm import tqdm

    # Whole tars: count their images from the headers (cheap next to decoding) so the bar has an ETA.
    total = sum(len(t.members) if t.members is not None else len(list_tar_images(t.tar)) for t in tasks)
    bar = tqdm(total=total, unit="img", desc="stats",
               dynamic_ncols=True, mininterval=0.5)

    def update(n: int | None) -> None:
        if n is None:
            bar.close()
        else:
            bar.update(n)
    return update


def write_stats(root: Path, stats: dict) -> None:
    """Write `root/stats.json` atomically (temp file, fsync, os.replace): a reader never sees half a file."""
    root = Path(root)
    path = root / STATS_NAME
    tmp = root / f".{STATS_NAME}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(stats, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
