"""What bounds our CPU loader at NHWC float32 (issue 17): the train graph's stages, and CPU-only
stand-ins for its two costly DALI operators, timed against each other (and FFCV) in equal,
interleaved windows on the same cores (window_harness.py: one process per contender, medians and
spread, CPU time per image).

    python benchmarks/nhwc_bound.py --data SHARDS [--peer ffcv] [--json FILE]

Contenders, batch 64, every one with as many threads as cores and our process's glibc heap tuning,
NHWC float32 out where they normalize, the reader's shuffle as in training; all but `loader` run
one pipeline for the whole run (no epoch rollover, no torch hand-off):

    loader        our DALI loader as the trainer runs it (benchmarks/loaders.py's contender): the train
                  pipeline with DALI checkpointing on, a new pipeline per epoch, batches as torch views
    train-dali    the train graph as the loader builds it (dali_pipelines.train_pipeline, checkpointing
                  on), one pipeline for every epoch: decode + crop_mirror_normalize with PCA lighting
    train-nockpt  the same without DALI's checkpointing (which mid-epoch resume needs)
    read          the webdataset reader alone (encoded bytes and labels)
    decode-dali   + the CPU twin's decoder, fn.decoders.image_crop (the 227 window: ROI decoding)
    decode-turbo  the reader, then libjpeg-turbo called directly (simplejpeg, exact IDCT, the whole
                  256 image: it has no ROI), one Python thread per core
    train-numba   train-nockpt's graph with a Numba kernel (fn.experimental.numba_function, per sample on
                  DALI's threads) in place of crop_mirror_normalize: mirror + lighting + normalize
    train-turbo   decode-turbo's images fed (external_source) to train-nockpt's crop_mirror_normalize
    ffcv-nhwc     FFCV 1.0.2 stock (benchmarks/ffcv_loader.py), with --peer ffcv

The stand-ins are not the product: the CPU pipeline is the GPU graph's twin (the same operators; only
the decoder's backend differs), which these would break. They measure how far the target (>= 1.3x
FFCV at NHWC) is from what DALI's CPU operators allow. Output: the table below, and --json.
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from window_harness import WindowRule, run_contenders, serve_or_run  # noqa: E402  (stdlib only)

CONTENDERS = ("loader", "train-dali", "train-nockpt", "read", "decode-dali", "decode-turbo", "train-numba", "train-turbo")
BATCH = 64


# -- the child side ---------------------------------------------------------------------------------
def _setup(data: str):
    from alexnet_fast.pipeline import dali_pipelines as dp
    from alexnet_fast.pipeline.augment import ColorStats
    from alexnet_fast.pipeline.shardset import ShardSet

    shard_set = ShardSet.open(data)
    shards = shard_set.shards("train")
    reader = dp.ReaderConfig(paths=tuple(str(s.tar) for s in shards), index_paths=tuple(str(s.index) for s in shards),
                             shuffle=True, initial_fill=min(4096, shard_set.num_samples("train")), seed=1)
    return dp, reader, ColorStats.from_dict(shard_set.stats())


def require_ffcv(data: str, venv: str) -> Path:
    """The .beton FFCV reads for `data`, or one usage line when it or FFCV's venv is missing."""
    import click

    beton = Path(f"{str(data).rstrip('/')}.train.beton")
    if not ((Path(venv) / "READY").exists() and beton.exists()):
        raise click.UsageError(f"--peer ffcv needs {venv} (benchmarks/ffcv_setup.sh) and {beton} "
                               f"(benchmarks/loaders.py --peer ffcv writes it)")
    return beton


def require_shard_set(data: str) -> None:
    """A folder that is no shard set (or has no stats.json) is one usage line, before any child starts."""
    import click

    from alexnet_fast.pipeline.shardset import ShardSet, ShardSetError

    try:
        ShardSet.open(data).stats()
    except ShardSetError as e:
        raise click.UsageError(str(e)) from None


def train_window(dp, reader, stats, out):
    """Inside a pipeline_def: the train graph's image path on one sample, as its parts (the two
    reference checks compare other paths against it): (jpg, crop_x, crop_y, mirror, lighting mean,
    the decoded 227 window, the normalized window)."""
    jpg, _ = dp.read_shards(reader)
    crop_x, crop_y, mirror = dp.random_window()
    images = dp.decode(jpg, dp.DecodeConfig(roi=True), (out.crop, crop_x, crop_y))
    mean = dp.lighting_mean(stats, 0.1)[0]
    normalized = dp.normalize(images, out, mean, list(stats.std_255), crop_x, crop_y, mirror, cropped=True)
    return jpg, crop_x, crop_y, mirror, mean, images, normalized


def normalize_hwc(out, image, mirror, mean, inv_std):
    """One sample: out[y, x, c] = (image[y, x', c] - mean[c]) * inv_std[c], x' mirrored or not. Rows as
    flat runs of W*3 values against a per-row pattern of the three channels' constants, so the inner
    loop is one contiguous multiply-add that LLVM vectorises; a mirrored row is reversed first."""
    height, width, _ = image.shape
    n = width * 3
    mean_row, scale_row, row = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.uint8)
    for i in range(n):
        mean_row[i] = mean[i % 3]
        scale_row[i] = inv_std[i % 3]
    src_rows, out_rows = image.reshape(height, n), out.reshape(height, n)
    for y in range(height):
        src = src_rows[y]
        if mirror[0]:
            for x in range(width):
                for c in range(3):
                    row[x * 3 + c] = src[(width - 1 - x) * 3 + c]
            src = row
        dst = out_rows[y]
        for i in range(n):
            dst[i] = (np.float32(src[i]) - mean_row[i]) * scale_row[i]


def _same_shape(outs, ins):
    for sample in range(len(outs[0])):
        for d in range(3):
            outs[0][sample][d] = ins[0][sample][d]


def _numba_normalize(images, mirror, mean, stats):
    """normalize_hwc on DALI's threads, one sample per task: what crop_mirror_normalize computes on an
    already cropped window (train's ROI decode), NHWC float32."""
    from nvidia.dali import fn, types
    from nvidia.dali.plugin.numba.fn.experimental import numba_function

    return numba_function(
        images, fn.reshape(fn.cast(mirror, dtype=types.UINT8), shape=[1]), mean,
        types.Constant(np.float32(1.0 / stats.std_255)), run_fn=normalize_hwc, setup_fn=_same_shape,
        out_types=[types.FLOAT], in_types=[types.UINT8, types.UINT8, types.FLOAT, types.FLOAT],
        outs_ndim=[3], ins_ndim=[3, 1, 1, 1])


def _turbo_batches(dp, reader, threads: int):
    """(decoded [B, 256, 256, 3] uint8 batch in one of 4 recycled buffers, labels), endlessly."""
    import simplejpeg
    from nvidia.dali import pipeline_def

    @pipeline_def
    def read_only():
        return dp.read_shards(reader)

    pipe = read_only(batch_size=BATCH, num_threads=1, device_id=None, seed=1)
    pipe.build()
    pool, ring, turn = ThreadPoolExecutor(threads), None, 0

    def decode_part(jpgs, out, lo, hi):
        for i in range(lo, hi):
            simplejpeg.decode_jpeg(jpgs[i], buffer=out[i])    # releases the GIL while it decodes

    while True:
        jpg, label = pipe.run()
        jpgs = [np.asarray(jpg[i]) for i in range(len(jpg))]
        if ring is None:
            h, w = simplejpeg.decode_jpeg_header(jpgs[0])[:2]
            ring = [np.empty((BATCH, h, w, 3), np.uint8) for _ in range(4)]
        out, turn = ring[turn % 4], turn + 1
        step = -(-len(jpgs) // threads)
        for f in [pool.submit(decode_part, jpgs, out, lo, min(lo + step, len(jpgs))) for lo in range(0, len(jpgs), step)]:
            f.result()
        yield out, np.asarray(label.as_tensor())


# Each DALI contender's graph: (dali_pipelines, reader config, ColorStats, OutputConfig, threads) -> outputs
def _read_graph(dp, reader, stats, out, threads):
    return dp.read_shards(reader)


def _decode_graph(dp, reader, stats, out, threads):
    jpg, label = dp.read_shards(reader)
    crop_x, crop_y, _ = dp.random_window()
    return dp.decode(jpg, dp.DecodeConfig(roi=True), (out.crop, crop_x, crop_y)), label


def _numba_graph(dp, reader, stats, out, threads):
    jpg, label = dp.read_shards(reader)
    crop_x, crop_y, mirror = dp.random_window()
    images = dp.decode(jpg, dp.DecodeConfig(roi=True), (out.crop, crop_x, crop_y))
    return _numba_normalize(images, mirror, dp.lighting_mean(stats, 0.1)[0], stats), label


def _turbo_graph(dp, reader, stats, out, threads):
    from nvidia.dali import fn

    images, label = fn.external_source(source=_turbo_batches(dp, reader, threads), num_outputs=2, batch=True,
                                       layout=["HWC", ""])
    crop_x, crop_y, mirror = dp.random_window()
    return dp.normalize(images, out, dp.lighting_mean(stats, 0.1)[0], list(stats.std_255), crop_x, crop_y, mirror), label


GRAPHS = {"read": _read_graph, "decode-dali": _decode_graph, "train-numba": _numba_graph, "train-turbo": _turbo_graph}


def _batches(name: str, data: str, threads: int):
    """Endless batch sizes from contender `name` (the child's side of window_harness.serve)."""
    from nvidia.dali import pipeline_def

    from alexnet_fast.pipeline.host import keep_batch_buffers_mapped

    keep_batch_buffers_mapped()         # as our loader's process (pipeline/loaders.py)
    dp, reader, stats = _setup(data)
    out = dp.OutputConfig(channels_last=True)
    if name == "decode-turbo":          # no DALI graph after the reader
        for _ in _turbo_batches(dp, reader, threads):
            yield BATCH
    args = dict(batch_size=BATCH, num_threads=threads, device_id=None, seed=1, prefetch_queue_depth=2)
    if name in ("train-dali", "train-nockpt"):
        pipe = dp.train_pipeline(reader, dp.DecodeConfig(roi=True), out, stats,
                                 enable_checkpointing=name == "train-dali", **args)
    else:
        pipe = pipeline_def(lambda: GRAPHS[name](dp, reader, stats, out, threads))(**args)
    pipe.build()
    while True:
        pipe.run()
        yield BATCH


def check_numba_normalize(data: str) -> float:
    """The largest difference between train-numba's and the train graph's normalize, same draws."""
    from nvidia.dali import pipeline_def

    dp, reader, stats = _setup(data)
    out = dp.OutputConfig(channels_last=True)

    @pipeline_def
    def both():
        _, _, _, mirror, mean, images, normalized = train_window(dp, reader, stats, out)
        return normalized, _numba_normalize(images, mirror, mean, stats)

    pipe = both(batch_size=8, num_threads=1, device_id=None, seed=3)
    pipe.build()
    by_dali, by_numba = pipe.run()
    return float(np.abs(np.asarray(by_dali.as_tensor()) - np.asarray(by_numba.as_tensor())).max())


# -- the parent -------------------------------------------------------------------------------------
def main() -> None:
    import click

    from loaders import _ffcv_argv, _ours_argv

    @click.command()
    @click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="shard set directory")
    @click.option("--contender", "names", type=click.Choice(CONTENDERS), multiple=True,
                  help="run only these (repeat) [default: all]")
    @click.option("--peer", "peers", type=click.Choice(["ffcv"]), multiple=True, help="also FFCV stock at nhwc")
    @click.option("--seconds", type=float, default=10.0, show_default=True, help="each window lasts at least this")
    @click.option("--min-batches", type=int, default=200, show_default=True, help="... and at least this many batches")
    @click.option("--rounds", type=int, default=3, show_default=True, help="windows per contender, interleaved")
    @click.option("--warmup", type=int, default=20, show_default=True, help="batches before the first window")
    @click.option("--ffcv-venv", type=click.Path(file_okay=False), default=str(HERE.parent / ".ffcv-venv"), show_default=True)
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the results here")
    def cli(data, names, peers, seconds, min_batches, rounds, warmup, ffcv_venv, json_path):
        require_shard_set(data)
        cores = os.sched_getaffinity(0)
        threads = len(cores)
        beton = require_ffcv(data, ffcv_venv) if "ffcv" in peers else None
        numba_vs_dali = None
        if "train-numba" in (names or CONTENDERS):
            numba_vs_dali = check_numba_normalize(data)
            print(f"train-numba vs the train graph's normalize, same draws: max |difference| {numba_vs_dali:.2e}",
                  flush=True)
        loader = {"data": str(data), "split": "train", "batch_size": BATCH, "workers": threads,
                  "borrow_buffers": True, "channels_last": True}
        plan = [(n, _ours_argv(loader, warmup) if n == "loader" else
                 [sys.executable, str(Path(__file__).resolve()), "--serve", n, str(data), str(threads), str(warmup)])
                for n in (names or CONTENDERS)]
        if "ffcv" in peers:
            plan.append(("ffcv-nhwc", _ffcv_argv(Path(ffcv_venv), beton, Path(data), "nhwc", False, BATCH, threads,
                                                 "float32", warmup)))
        results = {"config": {"data": str(data), "batch_size": BATCH, "threads": threads, "cpus": sorted(cores),
                              "rounds": rounds, "window_s": seconds, "window_min_batches": min_batches},
                   "numba_vs_dali_max_abs_diff": numba_vs_dali, "load_avg_1m_before": os.getloadavg()[0]}
        results["contenders"] = run_contenders(plan, cores, rounds, WindowRule(seconds, min_batches),
                                               log=lambda line: print(line, flush=True))
        results["load_avg_1m_after"] = os.getloadavg()[0]
        print(f"\nmedians over {rounds} windows (min-max); load {results['load_avg_1m_before']:.1f} -> "
              f"{results['load_avg_1m_after']:.1f}")
        ffcv = results["contenders"].get("ffcv-nhwc", {}).get("img_per_s")
        for name, s in results["contenders"].items():
            vs = f"  {s['img_per_s'] / ffcv:.2f}x FFCV" if ffcv else ""
            print(f"{name:>14}: {s['img_per_s']:8.1f} img/s ({s['min']:.0f}-{s['max']:.0f}); "
                  f"{s['cpu_ms_per_img']:.3f} CPU-ms/img{vs}")
        if json_path:
            Path(json_path).write_text(json.dumps(results, indent=2))

    cli()


if __name__ == "__main__":
    serve_or_run(_batches, main)
