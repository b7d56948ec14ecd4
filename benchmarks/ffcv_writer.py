"""The FFCV side of `benchmarks/make_shards.py --peer ffcv`: FFCV 1.0.2's DatasetWriter on a raw tree.
Runs in FFCV's own venv (benchmarks/ffcv_setup.sh), never in ours; imports nothing from this project.

    .ffcv-venv/bin/python benchmarks/ffcv_writer.py --raw RAW --beton OUT.beton --workers 2

What it does is FFCV's documented ImageNet recipe (its examples/imagenet write_imagenet.py, minus the
torchvision ImageFolder): every `RAW/train/<wnid>/*` file in sorted order, read with PIL
(`Image.open(path).convert("RGB")`, label = the wnid's sorted position), written by
`DatasetWriter(..., num_workers=W)` with `RGBImageField(write_mode="jpg", max_resolution=256,
jpeg_quality=90)` (OpenCV INTER_AREA resize so the LONGER side is at most 256, OpenCV JPEG encode)
and `IntField()`. Timed (wall clock, and the CPU time of the process and its joined workers)
in-process around the writer alone (imports and interpreter start are not
charged); the work it did is reported beside the time so the comparison can be judged: stored
pixels (FFCV keeps e.g. 256x192 for a 500x375 photo; make_shards keeps a 256x256 centre crop of the
shorter side at 256) and the .beton's size. One JSON line on stdout.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from window_harness import finished_cpu_seconds  # noqa: E402  (stdlib only)


def raw_train_files(raw: Path) -> list[tuple[Path, int]]:
    """(path, label) of every train image: class folders in sorted order, files sorted inside each."""
    train = raw / "train"
    if not train.is_dir():
        sys.exit(f"ffcv_writer: {raw} has no train/ folder (expected train/<wnid>/*.JPEG)")
    classes = sorted(p for p in train.iterdir() if p.is_dir())
    files = [(f, label) for label, folder in enumerate(classes) for f in sorted(folder.iterdir()) if f.is_file()]
    if not files:
        sys.exit(f"ffcv_writer: no image files under {train}")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--beton", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--max-resolution", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--chunksize", type=int, default=100, help="FFCV's default")
    args = parser.parse_args()

    import numpy as np
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from PIL import Image

    files = raw_train_files(args.raw)

    class Items:
        """FFCV's indexed dataset: a (PIL image, label) per index, as torchvision's ImageFolder gives."""

        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            path, label = files[i]
            return Image.open(path).convert("RGB"), label

    args.beton.parent.mkdir(parents=True, exist_ok=True)
    writer = DatasetWriter(str(args.beton), {
        "image": RGBImageField(write_mode="jpg", max_resolution=args.max_resolution, jpeg_quality=args.quality),
        "label": IntField(),
    }, num_workers=args.workers)
    devnull = open(os.devnull, "w")
    stderr, sys.stderr = sys.stderr, devnull       # its tqdm bar
    started, cpu_started = time.perf_counter(), finished_cpu_seconds()
    try:
        writer.from_indexed_dataset(Items(), chunksize=args.chunksize)
    finally:
        seconds = time.perf_counter() - started
        # FFCV leaves its worker processes to exit on their own (joined at interpreter exit): join
        # them here, so that their CPU time is counted.
        for worker in multiprocessing.active_children():
            worker.join()
        cpu_seconds = finished_cpu_seconds() - cpu_started
        sys.stderr = stderr
    # What it stored: the per-sample metadata FFCV wrote (height, width of each stored image).
    from ffcv.reader import Reader
    meta = Reader(str(args.beton), custom_handlers={"image": RGBImageField}).metadata
    pixels = int(np.sum(meta["f0"]["height"].astype(np.int64) * meta["f0"]["width"].astype(np.int64)))
    print(json.dumps({"images": len(files), "seconds": seconds, "img_per_s": len(files) / seconds,
                      "cpu_seconds": cpu_seconds,
                      "stored_pixels": pixels, "output_bytes": args.beton.stat().st_size,
                      "workers": args.workers}), flush=True)


if __name__ == "__main__":
    main()
