"""Where tests/gpu's tolerances come from, measured on the CPU: what a GPU may change, bounded by the
same change made with CPU code.

    python benchmarks/gpu_bounds.py [--data SHARDS] [--json FILE]

- chroma: the mixed (GPU) decoder upsamples 4:2:0 chroma without libjpeg-turbo's "fancy" filter
  (dali_pipelines.py, `jpeg_fancy_upsampling=False`); the CPU twin decodes with it. libjpeg-turbo
  does both (simplejpeg's `fastupsample`), so decoding every JPEG of the shard set both ways gives
  the per-pixel difference in 0..255 levels that upsampling alone makes: max and mean (-> test_dali_gpu.py
  CHROMA_MAX_LEVELS / CHROMA_MEAN_LEVELS). Also with the fast integer IDCT (`fastdct`), a stand-in for
  a decoder whose IDCT is not libjpeg-turbo's exact one (nvJPEG's).
- flips: trains alexnet-owt as test_torch_gpu.py's eval test does (2 epochs, batch 64, lr 0.01,
  the baseline loader) on the CPU, then scores every val image with fp32 and with bf16 autocast (what
  the GPU eval runs) and counts the images whose top-1 class differs, with the fp32 top-1/top-2 logit
  margins and how far bf16 moved them (-> test_torch_gpu.py EVAL_TOP1_FLIPS).

Without --data it builds the shard set of tests/gpu/conftest.py (GPU_SHARD_SPEC) in a temp dir.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

BATCH = 32          # test_dali_gpu.py's batch: its mean bound is per batch


def gpu_test_shards(root: Path) -> Path:
    """The shard set tests/gpu builds (8 classes x 64 train, 16 val each, 64 per shard)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gpu"))
    from conftest import GPU_PER_SHARD, GPU_SHARD_SPEC

    from alexnet_fast.pipeline.host import usable_cores
    from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet
    from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

    raw = write_raw_imagenet(root / "raw", SampleSpec(**GPU_SHARD_SPEC, val_layout=ValFormat.FLAT_DEVKIT),
                             workers=usable_cores())
    make_shards(raw.root, root / "shards", ShardOptions(per_shard=GPU_PER_SHARD), workers=usable_cores(),
                progress=False, log=lambda msg: None)
    return root / "shards"


def chroma(data: Path) -> dict:
    """Per-pixel |fancy - plain chroma upsampling| over every JPEG of the shard set, in levels."""
    import simplejpeg
    import webdataset as wds

    from alexnet_fast.pipeline.shardset import ShardSet

    shards = ShardSet.open(data)
    worst, worst_fast_idct, means, images = 0, 0, [], 0
    for split in ("train", "val"):
        for shard in shards.shards(split):
            for sample in wds.WebDataset(str(shard.tar), shardshuffle=False, empty_check=False):
                jpg = sample["jpg"]
                fancy = simplejpeg.decode_jpeg(jpg, colorspace="RGB").astype(np.int16)
                plain = simplejpeg.decode_jpeg(jpg, colorspace="RGB", fastupsample=True).astype(np.int16)
                plain_fast = simplejpeg.decode_jpeg(jpg, colorspace="RGB", fastupsample=True,
                                                    fastdct=True).astype(np.int16)
                diff = np.abs(fancy - plain)
                worst = max(worst, int(diff.max()))
                worst_fast_idct = max(worst_fast_idct, int(np.abs(fancy - plain_fast).max()))
                means.append(float(diff.mean()))
                images += 1
    batches = [np.mean(means[i:i + BATCH]) for i in range(0, len(means) - BATCH + 1, BATCH)]
    return {"images": images, "max_levels": worst, "max_levels_with_fast_idct": worst_fast_idct,
            "mean_levels_worst_image": max(means), "mean_levels": float(np.mean(means)),
            f"mean_levels_worst_batch_of_{BATCH}": float(max(batches))}


def train(data: Path, run: Path) -> None:
    """Train as test_torch_gpu.py's eval test does, on the CPU."""
    command = [sys.executable, "-m", "alexnet_fast.tools.cli", "train", "--data", str(data), "--out", str(run),
               "--device", "cpu", "--loader", "baseline", "--arch", "alexnet-owt", "--batch-size", "64",
               "--epochs", "2", "--lr", "0.01", "--log-every", "4"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"training failed: {done.stderr.strip().splitlines()[-1:]}")


def flips(data: Path, run: Path) -> dict:
    """fp32 vs bf16-autocast top-1 of the run's network on every val image."""
    import torch

    from alexnet_fast.model import checkpoint as ckpt
    from alexnet_fast.model.runtime import autocast, place_network
    from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader

    saved, _ = ckpt.load_checkpoint(run)
    model = place_network("alexnet-owt", saved["num_classes"], torch.device("cpu"), channels_last=False, dropout=0.0)
    model.load_state_dict(saved["model"])
    model.eval()
    logits = {"fp32": [], "bf16": []}
    spec = LoaderSpec(data=str(data), split="val", kind="baseline", batch_size=48, workers=2)
    with torch.no_grad():
        for x, _ in make_loader(spec):
            for precision in logits:
                with autocast(torch.device("cpu"), precision):
                    logits[precision].append(model(x).float())
    fp32, bf16 = torch.cat(logits["fp32"]), torch.cat(logits["bf16"])
    top2 = fp32.topk(2, dim=1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    # how far bf16 moved each image's fp32 top-1/top-2 margin
    moved = ((bf16.gather(1, top2.indices[:, :1]) - bf16.gather(1, top2.indices[:, 1:])).squeeze(1) - margin).abs()
    return {"network": f"step {saved['step']}, epoch {saved['epoch']}", "val_images": len(fp32), "top1_flips": int((fp32.argmax(1) != bf16.argmax(1)).sum()),
            "largest_margin_move": float(moved.max()),
            "images_within_2x_largest_move": int((margin <= 2 * moved.max()).sum()),
            "smallest_margins": sorted(margin.tolist())[:5]}


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--run", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="score this run's network instead of training one (a run on the same --data)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(data: Path | None, run: Path | None, json_path: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="gpu-bounds-") as tmp:
        data = data or gpu_test_shards(Path(tmp))
        if run is None:
            run = Path(tmp) / "run"
            train(data, run)
        report = {"chroma": chroma(data), "flips": flips(data, run), "load_average": os.getloadavg()}
    click.echo(json.dumps(report, indent=2))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
