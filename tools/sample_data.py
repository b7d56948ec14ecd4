"""A small raw ImageNet, drawn procedurally, in any layout make_shards reads (tests, demo, benchmark).

Each class has its own hue and stripe orientation, so a small network can tell classes apart;
every image gets a random size, phase, colour jitter and noise. Optional odd files reproduce
real ImageNet's dirt: a CMYK JPEG, a grayscale JPEG, a PNG named .JPEG and a large JPEG (all must
be kept), and a truncated JPEG, an empty file and random bytes (all must be rejected).

The devkit layout reproduces the devkit's trap: ILSVRC2012_IDs are a seeded permutation of the
sorted wnids, never the identity, so a reader that takes ID-1 as the class index gets it wrong.

    tree = write_raw_imagenet(tmp / "raw", SampleSpec(classes=4, val_layout=ValFormat.FLAT_DEVKIT))
    tree.train   # {source path as make_shards reports it: wnid} for every image that must be kept

Parallel: `write_raw_imagenet(root, spec, workers=16)` draws and encodes the images in a process
pool. Each image has its own seed, drawn in file order from the spec's seed before any image is
drawn, so the tree is byte-identical whatever the worker count.
"""
from __future__ import annotations

import enum
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet_fast.pipeline.procpool import fork_pool
from alexnet_fast.tools.sharding.labels import DEVKIT_DIR, GROUND_TRUTH, KAGGLE_CSV, META_MAT
from alexnet_fast.tools.sharding.layout import KAGGLE_BASE, TRAIN_TAR, VAL_TAR, TrainLayout

# The first real ImageNet wnids (tench, goldfish, ...), then made-up wnid-shaped ones.
REAL_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
              "n01496331", "n01498041", "n01514668", "n01514859", "n01518878"]


class ValFormat(enum.Enum):
    NONE = "none"
    FOLDERS = "folders"  # val/<wnid>/*.JPEG
    FLAT_DEVKIT = "flat-devkit"  # val/ILSVRC2012_val_*.JPEG + ILSVRC2012_devkit_t12/
    TAR_DEVKIT = "tar-devkit"  # ILSVRC2012_img_val.tar + ILSVRC2012_devkit_t12/
    FLAT_KAGGLE = "flat-kaggle"  # Kaggle: ILSVRC/Data/CLS-LOC/{train,val} + LOC_val_solution.csv


@dataclass(frozen=True)
class SampleSpec:
    classes: int = 4
    train_per_class: int = 16
    val_per_class: int = 4
    train_layout: TrainLayout = TrainLayout.FOLDERS
    val_layout: ValFormat = ValFormat.FOLDERS
    odd_files: bool = True
    min_side: int = 160
    max_side: int = 400
    seed: int = 0


@dataclass
class RawTree:
    root: Path
    classes: list[str]  # sorted wnids = class index order
    train: dict[str, str] = field(default_factory=dict)  # source -> wnid, must be kept
    val: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # source -> split, must be rejected
    devkit_ids: dict[str, int] = field(default_factory=dict)  # wnid -> ILSVRC2012_ID (devkit layouts)


def class_wnids(n: int) -> list[str]:
    return (REAL_WNIDS + [f"n{90000000 + 7 * i:08d}" for i in range(max(0, n - len(REAL_WNIDS)))])[:n]


def draw_image(class_index: int, num_classes: int, rng: np.random.Generator,
               size: tuple[int, int] | None = None, min_side: int = 160, max_side: int = 400) -> Image.Image:
    """An RGB image whose hue and stripe angle say its class."""
    w, h = size or (int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1)))
    hue = class_index / num_classes + rng.normal(0, 0.01)
    angle = np.pi * class_index / num_classes
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(12, 24)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
    base = np.array(_hsv_to_rgb(hue % 1.0, 0.7, 0.9), dtype=np.float32)
    pixels = (0.35 + 0.65 * wave)[..., None] * base[None, None, :] * 255
    pixels += rng.normal(0, 8, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


@dataclass(frozen=True)
class ImageJob:
    """One plain sample image: everything `render` needs, so any process draws the same bytes."""
    class_index: int
    num_classes: int
    seed: int
    min_side: int
    max_side: int


def render(job: ImageJob) -> bytes:
    """The JPEG bytes of `job`'s image (a pure function of the job)."""
    rng = np.random.default_rng(job.seed)
    return _jpeg(draw_image(job.class_index, job.num_classes, rng, min_side=job.min_side, max_side=job.max_side))


class _Renderer:
    """Renders lists of ImageJobs in this process (workers=1) or in a fork pool kept for the whole tree."""

    def __init__(self, workers: int):
        self._workers = workers
        self._pool = fork_pool(workers) if workers > 1 else None

    def __call__(self, jobs: list[ImageJob]) -> list[bytes]:
        if self._pool is None:
            return [render(j) for j in jobs]
        return self._pool.map(render, jobs, chunksize=max(1, len(jobs) // (8 * self._workers)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()


def _jobs(classes: list[int], num_classes: int, spec: "SampleSpec", rng: np.random.Generator) -> list[ImageJob]:
    """One job per class index in `classes`, seeds drawn from `rng` in that order."""
    seeds = rng.integers(0, 2**63 - 1, size=len(classes))
    return [ImageJob(c, num_classes, int(seed), spec.min_side, spec.max_side) for c, seed in zip(classes, seeds)]


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _odd_files(wnids: list[str], rng: np.random.Generator) -> tuple[dict[tuple[str, str], bytes], dict[tuple[str, str], bytes]]:
    """({(wnid, name): bytes} to keep, {(wnid, name): bytes} to reject), spread over the classes."""
    n = len(wnids)
    good = draw_image(0, n, rng)
    keep = {
        (wnids[0], f"{wnids[0]}_cmyk.JPEG"): _jpeg(draw_image(0, n, rng).convert("CMYK")),
        (wnids[1 % n], f"{wnids[1 % n]}_gray.JPEG"): _jpeg(draw_image(1 % n, n, rng).convert("L")),
        (wnids[2 % n], f"{wnids[2 % n]}_png.JPEG"): _png(draw_image(2 % n, n, rng)),
        (wnids[3 % n], f"{wnids[3 % n]}_large.JPEG"): _jpeg(draw_image(3 % n, n, rng, size=(1400, 1100))),
    }
    whole = _jpeg(good)
    reject = {
        (wnids[0], f"{wnids[0]}_truncated.JPEG"): whole[: len(whole) // 2],
        (wnids[1 % n], f"{wnids[1 % n]}_empty.JPEG"): b"",
        (wnids[2 % n], f"{wnids[2 % n]}_garbage.JPEG"): rng.bytes(3000),
    }
    return keep, reject


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_train(root: Path, base: Path, spec: SampleSpec, wnids: list[str], rng, tree: RawTree,
                 render_all: _Renderer) -> None:
    names = [(wnid, f"{wnid}_{i}.JPEG") for wnid in wnids for i in range(spec.train_per_class)]
    jobs = _jobs([c for c in range(len(wnids)) for _ in range(spec.train_per_class)], len(wnids), spec, rng)
    files: dict[tuple[str, str], bytes] = dict(zip(names, render_all(jobs)))
    keep_names = set(files)
    if spec.odd_files:
        odd_keep, odd_reject = _odd_files(wnids, rng)
        files.update(odd_keep)
        files.update(odd_reject)
        keep_names |= set(odd_keep)

    def source(wnid: str, name: str) -> str:
        if spec.train_layout is TrainLayout.TAR:
            return f"{TRAIN_TAR}/{wnid}.tar/{name}"
        return (base / "train" / wnid / name).relative_to(root).as_posix()

    if spec.train_layout is TrainLayout.TAR:
        inner = {w: [(name, data) for (ww, name), data in sorted(files.items()) if ww == w] for w in wnids}
        _write(root / TRAIN_TAR, _tar_bytes([(f"{w}.tar", _tar_bytes(inner[w])) for w in wnids]))
    else:
        for (wnid, name), data in files.items():
            _write(base / "train" / wnid / name, data)
    for key in files:
        if key in keep_names:
            tree.train[source(*key)] = key[0]
        else:
            tree.rejected[source(*key)] = "train"


def _write_meta_mat(path: Path, wnids: list[str], ids: dict[str, int]) -> None:
    """meta.mat as the devkit has it: a `synsets` struct array, leaves (num_children 0) first."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(ids[w], w, f"class {w}", "procedural", 0, np.zeros((1, 0)), 0, 1300) for w in wnids]
    # Two inner (non-leaf) synsets, as the real table has 860 of them: they must not become classes.
    top = len(wnids)
    rows += [(top + 1, "n00001740", "entity", "", 2, np.array([1, 2]), 19, 0),
             (top + 2, "n00002137", "abstraction", "", 1, np.array([3]), 18, 0)]
    table = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        table[i, 0] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": table})


def _write_val(root: Path, base: Path, spec: SampleSpec, wnids: list[str], rng, tree: RawTree,
               render_all: _Renderer) -> None:
    n = len(wnids)
    if spec.val_layout is ValFormat.FOLDERS:
        classes = [c for c in range(n) for _ in range(spec.val_per_class)]
        for i, (c, data) in enumerate(zip(classes, render_all(_jobs(classes, n, spec, rng)))):
            path = base / "val" / wnids[c] / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            _write(path, data)
            tree.val[path.relative_to(root).as_posix()] = wnids[c]
        return
    # Flat: images numbered 1..N in a shuffled class order, labels in a separate file.
    classes = rng.permutation(np.repeat(np.arange(n), spec.val_per_class))
    images = [(f"ILSVRC2012_val_{i + 1:08d}", int(c)) for i, c in enumerate(classes)]
    rendered = render_all(_jobs([c for _, c in images], n, spec, rng))
    blobs = [(f"{stem}.JPEG", data) for (stem, _), data in zip(images, rendered)]
    if spec.val_layout is ValFormat.TAR_DEVKIT:
        _write(root / VAL_TAR, _tar_bytes(blobs))
        sources = [f"{VAL_TAR}/{name}" for name, _ in blobs]
    else:
        for name, data in blobs:
            _write(base / "val" / name, data)
        sources = [(base / "val" / name).relative_to(root).as_posix() for name, _ in blobs]
    for src, (_, c) in zip(sources, images):
        tree.val[src] = wnids[c]

    if spec.val_layout is ValFormat.FLAT_KAGGLE:
        rows = [f"{stem},{wnids[c]} 10 12 100 120 {wnids[c]} 5 5 50 60" for stem, c in images]
        rows = [rows[i] for i in rng.permutation(len(rows))]  # the real CSV is not in file order
        _write(root / KAGGLE_CSV, ("ImageId,PredictionString\n" + "\n".join(rows) + "\n").encode())
        return
    # Devkit: IDs are a permutation of 1..n over the sorted wnids, deliberately not the identity.
    perm = rng.permutation(n)
    if n > 1 and (perm == np.arange(n)).all():
        perm = np.roll(perm, 1)
    tree.devkit_ids = {w: int(perm[i]) + 1 for i, w in enumerate(wnids)}
    _write_meta_mat(root / DEVKIT_DIR / META_MAT, wnids, tree.devkit_ids)
    truth = "".join(f"{tree.devkit_ids[wnids[c]]}\n" for _, c in images)
    _write(root / DEVKIT_DIR / GROUND_TRUTH, truth.encode())


def write_raw_imagenet(root: Path, spec: SampleSpec = SampleSpec(), workers: int = 1) -> RawTree:
    """Write the tree `spec` describes under `root`; `workers` > 1 draws the images in that many
    processes (the same bytes as with 1: see the module docstring)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    wnids = sorted(class_wnids(spec.classes))
    base = root / KAGGLE_BASE if spec.val_layout is ValFormat.FLAT_KAGGLE else root
    tree = RawTree(root, wnids)
    render_all = _Renderer(workers)
    try:
        _write_train(root, base, spec, wnids, rng, tree, render_all)
        if spec.val_layout is not ValFormat.NONE:
            _write_val(root, base, spec, wnids, rng, tree, render_all)
    finally:
        render_all.close()
    return tree
