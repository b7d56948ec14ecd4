"""A raw train/<wnid>/ tree from a folder of real photos named `<wnid>_*.JPEG`, each listed
`--copies` times (hard links: no extra disk), so the loader benchmarks' epochs are long enough.
This is how benchmarks/RESULTS.md's "Real photos" set was made, from the public
EliSchwartz/imagenet-sample-images repository (1,000 ImageNet photos, one per class):

    git clone https://github.com/EliSchwartz/imagenet-sample-images photos
    python benchmarks/photo_tree.py photos raw --copies 5      # 5,000 train samples
    tools/make_shards raw shards                                  # 256x256 q90, the defaults
    python benchmarks/cpu_floor.py --data shards --peer ffcv      # after benchmarks/ffcv_setup.sh
    python benchmarks/loaders.py --data shards --peer ffcv        # writes shards.train.beton

A photo whose name does not start with a wnid (`n` and 8 digits) is left out and counted.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

WNID = re.compile(r"^(n\d{8})_")
PHOTO_SUFFIXES = {".jpeg", ".jpg"}


def build_tree(photos: Path, raw: Path, copies: int) -> tuple[int, list[str]]:
    """Write RAW/train/<wnid>/<stem>_<k><suffix> for k < copies, linked to each photo (copied where
    the two folders are on different file systems). Returns (samples written, names left out)."""
    written, left_out = 0, []
    for photo in sorted(p for p in photos.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES):
        match = WNID.match(photo.name)
        if match is None:
            left_out.append(photo.name)
            continue
        folder = raw / "train" / match.group(1)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            target = folder / f"{photo.stem}_{k}{photo.suffix}"
            if not target.exists():
                try:
                    os.link(photo, target)
                except OSError:
                    target.write_bytes(photo.read_bytes())
            written += 1
    return written, left_out


def main() -> None:
    import click

    @click.command(help=__doc__.split("\n\n")[0])
    @click.argument("photos", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.argument("raw", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--copies", type=click.IntRange(min=1), default=5, show_default=True,
                  help="how many times each photo is listed")
    def cli(photos: Path, raw: Path, copies: int) -> None:
        written, left_out = build_tree(photos, raw, copies)
        if written == 0:
            raise click.UsageError(f"no photo named <wnid>_*.JPEG in {photos}")
        classes = len(list((raw / "train").iterdir()))
        print(f"{raw}/train: {written} samples ({written // copies} photos x {copies}) in {classes} classes"
              + (f"; left out {len(left_out)} without a wnid prefix, e.g. {left_out[0]}" if left_out else ""))

    cli()


if __name__ == "__main__":
    sys.exit(main())
