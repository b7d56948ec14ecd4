"""stats.json: the Numba statistics agree with a float64 NumPy computation on the same pixels."""
from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet_fast.pipeline.shardset import ShardSet
from alexnet_fast.pipeline.stats import StatsError, compute_stats, write_stats
from alexnet_fast.tools.cli import run_command
from alexnet_fast.tools.cmd_stats import stats_command
from alexnet_fast.tools.sharding import resume
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards
from alexnet_fast.tools.sharding.local_executor import LocalExecutor

RTOL = 1e-6


def _tar_pixels(tars: list[Path]) -> list[np.ndarray]:
    """Every `.jpg` member of the tars decoded independently of the code under test (PIL, tar order)."""
    images = []
    for path in tars:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
    return images


def _numpy_stats(images: list[np.ndarray]) -> dict:
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255.0
    cov = np.cov(pixels, rowvar=False, bias=True)
    eigval, eigvec = np.linalg.eigh(cov)
    return {"mean": pixels.mean(axis=0), "std": pixels.std(axis=0), "covariance": cov,
            "eigval": eigval[::-1], "eigvec": eigvec[:, ::-1], "pixels": len(pixels)}


def _assert_agrees(stats: dict, ref: dict) -> None:
    assert stats["pixels"] == ref["pixels"]
    for key in ("mean", "std", "covariance", "eigval"):
        np.testing.assert_allclose(np.array(stats[key]), ref[key], rtol=RTOL, atol=0, err_msg=key)
    ours = np.array(stats["eigvec"])
    for i in range(3):  # eigenvectors are defined up to sign
        sign = np.sign(ours[:, i] @ ref["eigvec"][:, i])
        np.testing.assert_allclose(ours[:, i], sign * ref["eigvec"][:, i], rtol=RTOL, atol=1e-9, err_msg=f"eigvec {i}")


def _write_tar(path: Path, images: list[np.ndarray], fmt: str = "PNG") -> Path:
    """A shard-like tar of `<key>.jpg` members (+ a .cls each); PNG payloads keep the pixels exact."""
    with tarfile.open(path, "w") as tar:
        for key, image in enumerate(images):
            for suffix, data in ((".jpg", _encode(image, fmt)), (".cls", b"0")):
                info = tarfile.TarInfo(f"{key:06d}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def noise_tars(tmp_path_factory) -> tuple[list[Path], list[np.ndarray]]:
    """Three tars of correlated random images of different sizes, with the exact pixels they hold."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("noise_tars")
    tars, all_images = [], []
    mix = np.array([[1.0, 0.6, 0.2], [0.0, 0.5, 0.4], [0.0, 0.0, 0.3]])  # correlated channels
    for t in range(3):
        images = []
        for _ in range(4):
            h, w = rng.integers(8, 40, size=2)
            base = rng.random((h, w, 3)) @ mix
            images.append(np.clip(base / mix.sum(axis=0) * 255, 0, 255).astype(np.uint8))
        tars.append(_write_tar(root / f"train-{t:06d}.tar", images))
        all_images += images
    return tars, all_images


def test_exact_pixels_agree_with_numpy(noise_tars):
    tars, images = noise_tars
    stats = compute_stats(tars, workers=1)
    assert stats["images"] == len(images)
    _assert_agrees(stats, _numpy_stats(images))


def test_shard_set_agrees_with_numpy_and_make_shards(shard_set):
    tars = [s.tar for s in ShardSet.open(shard_set).shards("train")]
    stats = compute_stats(tars, workers=2)
    _assert_agrees(stats, _numpy_stats(_tar_pixels(tars)))
    assert stats["images"] == ShardSet.open(shard_set).num_samples("train")
    # What make_shards wrote is what a recomputation gives, and the reader returns it.
    assert ShardSet.open(shard_set).stats() == json.loads(json.dumps(stats))


def test_eigendecomposition_reconstructs_covariance(shard_set):
    stats = ShardSet.open(shard_set).stats()
    cov, val, vec = (np.array(stats[k]) for k in ("covariance", "eigval", "eigvec"))
    assert list(val) == sorted(val, reverse=True) and val[-1] > 0
    np.testing.assert_allclose(vec @ np.diag(val) @ vec.T, cov, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(vec.T @ vec, np.eye(3), atol=1e-12)
    for i in range(3):  # columns, not rows, are the eigenvectors
        np.testing.assert_allclose(cov @ vec[:, i], val[i] * vec[:, i], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), stats["std"], rtol=1e-12)


def test_byte_identical_whatever_the_workers(noise_tars, tmp_path):
    tars, _ = noise_tars
    written = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        write_stats(out, compute_stats(tars, workers=workers, max_images=7, seed=5))
        written.append((out / "stats.json").read_bytes())
        assert [p.name for p in out.iterdir()] == ["stats.json"]  # no temp file left
    assert written[0] == written[1]


def test_sample_is_seeded(noise_tars):
    tars, images = noise_tars
    a = compute_stats(tars, max_images=5, seed=1, workers=1)
    assert a == compute_stats(tars, max_images=5, seed=1, workers=2)
    assert a["images"] == 5 and a["sample"] == {"max_images": 5, "seed": 1}
    sizes = {im.shape[0] * im.shape[1] for im in images}
    assert a["pixels"] < sum(im.shape[0] * im.shape[1] for im in images) and len(sizes) > 1
    others = [compute_stats(tars, max_images=5, seed=s, workers=1) for s in (2, 3)]
    assert any(o["mean"] != a["mean"] for o in others)
    # The sample is 5 whole images: exactly one 5-subset has its pixel count and channel sums, and
    # NumPy on that subset's pixels agrees with the sampled stats.
    sums = [(im.shape[0] * im.shape[1], *im.reshape(-1, 3).sum(axis=0, dtype=np.int64)) for im in images]
    target = (a["pixels"], *(round(m * 255 * a["pixels"]) for m in a["mean"]))
    subsets = [c for c in itertools.combinations(range(len(images)), 5)
               if tuple(map(sum, zip(*(sums[i] for i in c)))) == target]
    assert len(subsets) == 1
    _assert_agrees(a, _numpy_stats([images[i] for i in subsets[0]]))
    # A sample at least as large as the set is the whole set.
    full = compute_stats(tars, max_images=len(images) + 3, seed=1, workers=1)
    _assert_agrees(full, _numpy_stats(images))
    assert full["images"] == len(images)


def test_undecodable_image_is_a_clear_error(tmp_path):
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("000000.jpg")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"not a jpeg"))
    with pytest.raises(StatsError, match="train-000000.tar:000000.jpg: cannot decode"):
        compute_stats([path], workers=1)
    with pytest.raises(StatsError, match="cannot read shard"):
        compute_stats([tmp_path / "missing.tar"], workers=1)


class _StopAfter(Exception):
    pass


class _StoppingExecutor(LocalExecutor):
    """The real local executor, stopped (an exception out of its progress callback) once `images`
    images are converted: the shards finished by then stay, with their sidecars, as after a kill."""

    def __init__(self, workers: int, images: int):
        super().__init__(workers)
        self.images = images

    def write_shards(self, plan, advance):
        seen = 0

        def stop_at(n):
            nonlocal seen
            seen += n
            if seen >= self.images:
                raise _StopAfter

        super().write_shards(plan, stop_at)


def test_make_shards_statistics_from_its_conversion_pass(raw_imagenet, tmp_path):
    """stats.json from the moments computed while converting (every train image; reused shards'
    moments from their sidecars) is byte-identical to `compute_stats` decoding the shards again."""
    opts = ShardOptions(per_shard=16)
    out = tmp_path / "set"
    with pytest.raises(_StopAfter):
        make_shards(raw_imagenet.root, out, opts, workers=2, progress=False, log=lambda msg: None,
                    executor=_StoppingExecutor(2, 40))
    sidecars = sorted((out / resume.STATE_DIR).glob("train-*.json"))
    assert sidecars and not (out / "stats.json").exists()
    for sidecar in sidecars:  # the in-pass moments are kept with each finished shard
        body = json.loads(sidecar.read_text())
        assert body["moments"][0] == body["record"]["samples"] * 256 * 256
    report = make_shards(raw_imagenet.root, out, opts, workers=2, progress=False, log=lambda msg: None)
    assert report.reused_shards == len(sidecars)
    tars = [s.tar for s in ShardSet.open(out).shards("train")]
    recomputed = tmp_path / "recomputed"
    recomputed.mkdir()
    write_stats(recomputed, compute_stats(tars, workers=1))
    assert (out / "stats.json").read_bytes() == (recomputed / "stats.json").read_bytes()
    _assert_agrees(json.loads((out / "stats.json").read_text()), _numpy_stats(_tar_pixels(tars)))


def _cli(args: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_command(stats_command, "alexnet-fast stats", [*map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_recomputes_what_make_shards_wrote(shard_set, tmp_path, capsys):
    copy = tmp_path / "set"
    shutil.copytree(shard_set, copy)
    original = (copy / "stats.json").read_bytes()
    (copy / "stats.json").unlink()
    code, out, err = _cli([copy, "--workers", "2"], capsys)
    assert code == 0, err
    assert (copy / "stats.json").read_bytes() == original
    stats = json.loads(original)
    assert f"{stats['images']} images" in out and f"{stats['mean'][0]:+.6f}" in out
    code, out, err = _cli([copy, "--stats-images", "9", "--seed", "4", "--workers", "1"], capsys)
    assert code == 0, err
    assert json.loads((copy / "stats.json").read_text())["images"] == 9 and "sample of 9, seed 4" in out


@pytest.mark.parametrize("case", ["missing", "not_a_set", "missing_shard", "bad_flag"])
def test_cli_one_line_errors(case, shard_set, tmp_path, capsys):
    args: list = [tmp_path / "nope"]
    expect = "does not exist"
    if case == "not_a_set":
        args, expect = [tmp_path], "no manifest.json"
    elif case == "missing_shard":
        copy = tmp_path / "set"
        shutil.copytree(shard_set, copy)
        (copy / "train-000001.tar").unlink()
        args, expect = [copy], "missing 1 train shard(s)"
    elif case == "bad_flag":
        args, expect = [shard_set, "--stats-images", "0"], "--stats-images"
    code, out, err = _cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "error" in lines[0] and expect in lines[0], lines[0]
