"""Where the CPU loader's time per image goes, stage by stage, and how far a path outside DALI's CPU
operators gets towards the JPEG decode floor (issue 30). Equal interleaved windows on the same cores
(window_harness.py); the figure is CPU-ms per image (process CPU time / images), which a shared
machine distorts less than img/s.

    python benchmarks/cpu_floor.py --data SHARDS [--contender NAME ...] [--json FILE]

Batch 64, as many threads as cores, NHWC float32 unless the name says chw, the reader's shuffle as in
training, our glibc heap tuning; each contender one process, one pipeline for the whole run except
`loader`. Cumulative stages of the product's CPU graph (dali_pipelines.py), each the one before plus
one step, so each difference is that step's cost:

    read          fn.readers.webdataset alone (encoded bytes + labels)
    decode        + the CPU decoder on the 227 window (fn.decoders.image_crop: the product's ROI decode)
    normalize     + crop_mirror_normalize to float32 HWC: constant mean, no mirror
    mirror        + the coin-flip mirror
    lighting      + PCA lighting (a per-sample mean): the train graph's image path
    lighting-chw  the same written CHW (the layout step)
    graph         the train graph itself (labels cast, source_info), without DALI checkpointing
    graph-ckpt    with it (as the loader builds it)
    loader        our loader as the trainer runs it: a pipeline per epoch, batches as torch views (hand-off)

and a path that leaves DALI's CPU decode and crop_mirror_normalize (`fused_*` below):

    draws         the reader and the train graph's random operators (crop position, mirror, lighting
                  alpha), handed to Python per sample: what the fused path starts from
    turbo         + libjpeg-turbo called directly (simplejpeg, exact IDCT, whole image) on a thread pool
                  whose threads release the GIL
    fused         + one Numba kernel per sample on the same threads, right after its decode (the image
                  still in cache): crop, mirror, lighting and normalize into the batch, NHWC
    fused-chw     the same writing CHW

With `--peer ffcv`, FFCV 1.0.2 (benchmarks/ffcv_loader.py, its own venv) in the same windows, stock
and with our glibc heap tuning (`-tuned`):

    ffcv          FFCV's closest CPU-only pipeline to ours, NHWC float32 (loaders.py's `ffcv-nhwc`)
    ffcv-feed     the CPU half of FFCV's stock GPU pipeline: decode, crop, flip, uint8 NHWC (what its
                  ToDevice copies; it normalizes on the GPU)
    ffcv-feed-whole  FFCV's cheapest feed: SimpleRGBImageDecoder, the whole 256 image decoded and
                  nothing else (uint8; the GPU would crop and flip)

`decode` is, in the same terms, the CPU half of our `--decode cpu`: the reader and the CPU decoder on
the 227 window, uint8 HWC, the rest of the graph (mirror, lighting, normalize) on the GPU. So
`decode` against `ffcv-feed` is what each stack's CPU cores spend per image to feed a GPU, and
`graph`/`fused` against `ffcv` what they spend when the CPU does everything. `decode-fast` is
`decode` with libjpeg-turbo's fast integer IDCT, the DCT FFCV decodes with (LoaderSpec.fast_idct).

`--check` first compares the fused path's output with the train graph's for the same samples and
draws (max |difference|, normalized units): the decoders are the same library with the same IDCT,
so only float rounding may differ.
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
from nhwc_bound import _setup, require_ffcv, require_shard_set, train_window  # noqa: E402  (the same shard set, reader, statistics, graph)
from window_harness import WindowRule, run_contenders, serve_or_run  # noqa: E402  (stdlib only)

DALI_STAGES = ("read", "decode", "decode-fast", "normalize", "mirror", "lighting", "lighting-chw", "graph", "graph-ckpt", "loader")
FUSED_STAGES = ("draws", "turbo", "fused", "fused-chw")
CONTENDERS = DALI_STAGES + FUSED_STAGES
FFCV_CONTENDERS = {"ffcv": ("float32", False, "crop"), "ffcv-tuned": ("float32", True, "crop"),
                   "ffcv-feed": ("uint8", False, "crop"), "ffcv-feed-tuned": ("uint8", True, "crop"),
                   "ffcv-feed-whole": ("uint8", False, "whole"), "ffcv-feed-whole-tuned": ("uint8", True, "whole")}
# name: (dtype, our heap tuning, FFCV decoder: crop = its crop decoder + flip, whole = decode only)
NOT_CUMULATIVE = ("decode-fast", "lighting-chw", "draws", "fused-chw", *FFCV_CONTENDERS)
BATCH = 64


# -- the fused path's kernels (Numba, nogil: the pool's threads run them in parallel) ---------------
def _kernels():
    """(normalize into HWC, normalize into CHW), compiled once per process (cached on disk)."""
    from numba import njit

    @njit(nogil=True, cache=True)
    def into_hwc(src, out, x0, y0, mirror, mean, inv_std):
        """out[y, x, c] = (src[y0 + y, x0 + x', c] - mean[c]) * inv_std[c], x' = x or crop-1-x. Each
        row is one contiguous run of crop*3 values against a per-position pattern of the channels'
        constants, so the inner loop vectorises; a mirrored row's pixels are reversed into a small
        buffer first."""
        crop, width = out.shape[0], src.shape[1]
        n = crop * 3
        mean_row, scale_row, row = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.uint8)
        for i in range(n):
            mean_row[i], scale_row[i] = mean[i % 3], inv_std[i % 3]
        flat_src, flat_out = src.reshape(-1), out.reshape(-1)
        for y in range(crop):
            base, at = ((y0 + y) * width + x0) * 3, y * n
            if mirror:
                for x in range(crop):
                    s, d = base + (crop - 1 - x) * 3, x * 3
                    row[d], row[d + 1], row[d + 2] = flat_src[s], flat_src[s + 1], flat_src[s + 2]
                for i in range(n):
                    flat_out[at + i] = (np.float32(row[i]) - mean_row[i]) * scale_row[i]
            else:
                for i in range(n):
                    flat_out[at + i] = (np.float32(flat_src[base + i]) - mean_row[i]) * scale_row[i]

    @njit(nogil=True, cache=True)
    def into_chw(src, out, x0, y0, mirror, mean, inv_std):
        crop = out.shape[1]
        for c in range(3):
            m, s = np.float32(mean[c]), np.float32(inv_std[c])
            for y in range(crop):
                row = src[y0 + y]
                if mirror:
                    for x in range(crop):
                        out[c, y, x] = (np.float32(row[x0 + crop - 1 - x, c]) - m) * s
                else:
                    for x in range(crop):
                        out[c, y, x] = (np.float32(row[x0 + x, c]) - m) * s

    return into_hwc, into_chw


def _offset(position: float, size: int, crop: int) -> int:
    from alexnet_fast.pipeline.augment import crop_offset

    return crop_offset(position, size, crop)


class FusedBatches:
    """The fused path: DALI's reader and random operators (the train graph's draws), then per sample
    on a pool of threads: simplejpeg decode into the thread's scratch image, and (with `kernel`) the
    Numba crop/mirror/lighting/normalize into row i of a float32 batch. Batches come from a ring of
    4 buffers (the consumer holds one while the next fills)."""

    def __init__(self, dp, reader, stats, threads: int, kernel: str | None, crop: int = 227, seed: int = 1):
        from nvidia.dali import pipeline_def

        @pipeline_def
        def draws():
            jpg, label = dp.read_shards(reader)
            crop_x, crop_y, mirror = dp.random_window()
            mean, _alpha = dp.lighting_mean(stats, 0.1)
            return jpg, label, crop_x, crop_y, mirror, mean

        self.pipe = draws(batch_size=BATCH, num_threads=1, device_id=None, seed=seed, prefetch_queue_depth=2)
        self.pipe.build()
        self.threads, self.crop, self.kernel = threads, crop, kernel
        self.pool = ThreadPoolExecutor(threads)
        self.inv_std = (1.0 / stats.std_255).astype(np.float32)
        self.normalize = None if kernel is None else dict(zip(("hwc", "chw"), _kernels()))[kernel]
        shape = (BATCH, crop, crop, 3) if kernel == "hwc" else (BATCH, 3, crop, crop)
        self.ring = [np.empty(shape, np.float32) for _ in range(4)] if kernel else None
        self.turn = 0

    def _part(self, samples, out, lo: int, hi: int) -> None:
        import simplejpeg

        scratch = None
        for i in range(lo, hi):
            jpg, crop_x, crop_y, mirror, mean = samples[i]
            if scratch is None:
                h, w = simplejpeg.decode_jpeg_header(jpg)[:2]
                scratch = np.empty((h, w, 3), np.uint8)
            image = simplejpeg.decode_jpeg(jpg, buffer=scratch)        # releases the GIL while it decodes
            if self.normalize is not None:
                h, w = image.shape[:2]
                self.normalize(image, out[i], _offset(crop_x, w, self.crop), _offset(crop_y, h, self.crop),
                               mirror, mean, self.inv_std)

    def next(self, decode: bool = True):
        jpg, label, crop_x, crop_y, mirror, mean = self.pipe.run()
        samples = [(np.asarray(jpg[i]), float(np.asarray(crop_x[i])), float(np.asarray(crop_y[i])),
                    bool(np.asarray(mirror[i])), np.asarray(mean[i])) for i in range(len(jpg))]
        out = None
        if self.ring is not None:
            out, self.turn = self.ring[self.turn % 4], self.turn + 1
        if decode:
            step = -(-len(samples) // self.threads)
            for f in [self.pool.submit(self._part, samples, out, lo, min(lo + step, len(samples)))
                      for lo in range(0, len(samples), step)]:
                f.result()
        return out, np.asarray(label.as_tensor())


# -- the DALI stages ----------------------------------------------------------------------------------
def _stage_graph(name: str, dp, reader, stats):
    """The outputs of DALI stage `name` (cumulative: see the module docstring)."""
    from nvidia.dali import types

    jpg, label = dp.read_shards(reader)
    if name == "read":
        return jpg, label
    crop_x, crop_y, mirror = dp.random_window()
    images = dp.decode(jpg, dp.DecodeConfig(roi=True, fast_idct=name == "decode-fast"), (227, crop_x, crop_y))
    if name in ("decode", "decode-fast"):
        return images, label
    out = dp.OutputConfig(channels_last=name != "lighting-chw")
    mean = types.Constant(np.float32(stats.mean_255))
    if name in ("lighting", "lighting-chw"):
        mean = dp.lighting_mean(stats, 0.1)[0]
    flip = 0 if name == "normalize" else mirror
    return dp.normalize(images, out, mean, list(stats.std_255), crop_x, crop_y, flip, cropped=True), label


def _batches(name: str, data: str, threads: int):
    """Endless batch sizes from contender `name` (the child's side of window_harness.serve)."""
    from nvidia.dali import pipeline_def

    from alexnet_fast.pipeline.host import keep_batch_buffers_mapped

    keep_batch_buffers_mapped()         # as our loader's process (pipeline/loaders.py)
    dp, reader, stats = _setup(data)
    if name in FUSED_STAGES:
        fused = FusedBatches(dp, reader, stats, threads, {"fused": "hwc", "fused-chw": "chw"}.get(name))
        while True:
            fused.next(decode=name != "draws")
            yield BATCH
    args = dict(batch_size=BATCH, num_threads=threads, device_id=None, seed=1, prefetch_queue_depth=2)
    if name in ("graph", "graph-ckpt"):
        pipe = dp.train_pipeline(reader, dp.DecodeConfig(roi=True), dp.OutputConfig(channels_last=True), stats,
                                 enable_checkpointing=name == "graph-ckpt", **args)
    else:
        pipe = pipeline_def(lambda: _stage_graph(name, dp, reader, stats))(**args)
    pipe.build()
    while True:
        pipe.run()
        yield BATCH


def check_decode_stages(data: str, batches: int = 2) -> dict:
    """max |stage - train graph| in 0..255 levels between the decoded 227 windows of `decode` and
    `decode-fast` and the train graph's own decoded windows, same seed (the same draws: the
    operators are created in the same order). `decode` is the CPU half of `--decode cpu` only if
    it hands out exactly what the train graph decodes."""
    from nvidia.dali import pipeline_def

    dp, reader, stats = _setup(data)
    graphs = {"train": lambda: train_window(dp, reader, stats, dp.OutputConfig(channels_last=True))[5],
              "decode": lambda: _stage_graph("decode", dp, reader, stats)[0],
              "decode-fast": lambda: _stage_graph("decode-fast", dp, reader, stats)[0]}
    pipes = {name: pipeline_def(graph)(batch_size=BATCH, num_threads=1, device_id=None, seed=3)
             for name, graph in graphs.items()}
    worst = {"decode": 0, "decode-fast": 0}
    for pipe in pipes.values():
        pipe.build()
    for _ in range(batches):
        windows = {name: np.asarray(pipe.run()[0].as_tensor()).astype(int) for name, pipe in pipes.items()}
        for name in worst:
            worst[name] = max(worst[name], int(np.abs(windows[name] - windows["train"]).max()))
    return worst


def check_fused(data: str, batches: int = 2) -> dict:
    """max |fused - train graph| over `batches` batches, same samples and draws, both layouts; and
    the max difference between simplejpeg's and DALI's decoded windows in 0..255 levels."""
    from nvidia.dali import pipeline_def

    dp, reader, stats = _setup(data)
    out = dp.OutputConfig(channels_last=True)

    @pipeline_def
    def graph():
        return train_window(dp, reader, stats, out)

    pipe = graph(batch_size=BATCH, num_threads=1, device_id=None, seed=3)
    pipe.build()
    fused = {k: FusedBatches.__new__(FusedBatches) for k in ("hwc", "chw")}
    for kernel, f in fused.items():         # the kernels alone, fed the graph's own samples and draws
        f.threads, f.crop, f.kernel, f.inv_std = 1, 227, kernel, (1.0 / stats.std_255).astype(np.float32)
        f.normalize = dict(zip(("hwc", "chw"), _kernels()))[kernel]
    worst = {"hwc": 0.0, "chw": 0.0, "decode_levels": 0}
    import simplejpeg

    for _ in range(batches):
        jpg, crop_x, crop_y, mirror, mean, windows, normalized = pipe.run()
        samples = [(np.asarray(jpg[i]), float(np.asarray(crop_x[i])), float(np.asarray(crop_y[i])),
                    bool(np.asarray(mirror[i])), np.asarray(mean[i])) for i in range(len(jpg))]
        want = np.asarray(normalized.as_tensor())
        for i, (data_i, cx, cy, _m, _mean) in enumerate(samples):
            full = simplejpeg.decode_jpeg(data_i)
            h, w = full.shape[:2]
            x0, y0 = _offset(cx, w, 227), _offset(cy, h, 227)
            diff = np.abs(full[y0:y0 + 227, x0:x0 + 227].astype(int) - np.asarray(windows[i]).astype(int)).max()
            worst["decode_levels"] = max(worst["decode_levels"], int(diff))
        for kernel, f in fused.items():
            got = np.empty((BATCH, 227, 227, 3) if kernel == "hwc" else (BATCH, 3, 227, 227), np.float32)
            f._part(samples, got, 0, len(samples))
            got = got if kernel == "hwc" else got.transpose(0, 2, 3, 1)
            worst[kernel] = max(worst[kernel], float(np.abs(got - want).max()))
    return worst


# -- the parent -------------------------------------------------------------------------------------
# (ours, FFCV's): the CPU half of feeding a GPU, and the CPU doing everything
PAIRS = {"feed-gpu": (("decode", "decode-fast"), ("ffcv-feed", "ffcv-feed-whole")),
         "cpu-only": (("graph", "loader", "fused"), ("ffcv",))}


def _versus_ffcv(contenders: dict) -> dict:
    """For each PAIRS mode measured: our best contender against FFCV's best, stock and tuned, in
    img/s and in CPU-ms per image (FFCV's / ours: above 1 means ours spends less)."""
    def best(names):
        measured = [n for n in names if n in contenders]
        return max(measured, key=lambda n: contenders[n]["img_per_s"]) if measured else None

    out = {}
    for mode, (ours, theirs) in PAIRS.items():
        mine = best(ours)
        if mine is None:
            continue
        entry = {"ours": mine, "img_per_s": contenders[mine]["img_per_s"],
                 "cpu_ms_per_img": contenders[mine]["cpu_ms_per_img"]}
        for tuning, suffix in (("stock", ""), ("tuned", "-tuned")):
            peer = best([f"{name}{suffix}" for name in theirs])
            if peer is not None:
                entry[tuning] = {"ffcv": peer, "img_per_s_ratio": entry["img_per_s"] / contenders[peer]["img_per_s"],
                                 "cpu_ms_ratio": contenders[peer]["cpu_ms_per_img"] / entry["cpu_ms_per_img"]}
        out[mode] = entry
    return out


def _versus_lines(versus: dict) -> list[str]:
    lines = []
    for mode, entry in versus.items():
        peers = "; ".join(f"{r['img_per_s_ratio']:.2f}x FFCV {tuning} at its best ({r['ffcv']}) in img/s, "
                          f"{r['cpu_ms_ratio']:.2f}x in CPU-ms" for tuning, r in entry.items() if isinstance(r, dict))
        lines.append(f"{mode}: ours best = {entry['ours']} ({entry['cpu_ms_per_img']:.3f} CPU-ms/img): {peers}")
    return lines


def main() -> None:
    import click

    from loaders import _ffcv_argv, _ours_argv

    @click.command()
    @click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="shard set directory")
    @click.option("--contender", "names", type=click.Choice(CONTENDERS), multiple=True,
                  help="run only these (repeat) [default: all]")
    @click.option("--seconds", type=float, default=10.0, show_default=True, help="each window lasts at least this")
    @click.option("--min-batches", type=int, default=100, show_default=True, help="... and at least this many batches")
    @click.option("--rounds", type=int, default=3, show_default=True, help="windows per contender, interleaved")
    @click.option("--warmup", type=int, default=10, show_default=True, help="batches before the first window")
    @click.option("--check/--no-check", default=True, show_default=True,
                  help="first compare the fused path's output with the train graph's")
    @click.option("--peer", "peers", type=click.Choice(["ffcv"]), multiple=True,
                  help="also FFCV's contenders (FFCV_CONTENDERS: ffcv, ffcv-feed, ffcv-feed-whole, each also -tuned)")
    @click.option("--ffcv-venv", type=click.Path(file_okay=False), default=str(HERE.parent / ".ffcv-venv"),
                  show_default=True, help="made by benchmarks/ffcv_setup.sh")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the results here")
    def cli(data, names, seconds, min_batches, rounds, warmup, check, peers, ffcv_venv, json_path):
        require_shard_set(data)
        beton = require_ffcv(data, ffcv_venv) if "ffcv" in peers else None
        cores = os.sched_getaffinity(0)
        threads = len(cores)
        results = {"config": {"data": str(data), "batch_size": BATCH, "threads": threads, "cpus": sorted(cores),
                              "rounds": rounds, "window_s": seconds, "window_min_batches": min_batches},
                   "load_avg_1m_before": os.getloadavg()[0]}
        if check:
            results["fused_vs_graph"] = check_fused(data)
            print(f"fused vs the train graph, same samples and draws: {results['fused_vs_graph']}", flush=True)
        loader = {"data": str(data), "split": "train", "batch_size": BATCH, "workers": threads,
                  "borrow_buffers": True, "channels_last": True}
        plan = [(n, _ours_argv(loader, warmup) if n == "loader" else
                 [sys.executable, str(Path(__file__).resolve()), "--serve", n, str(data), str(threads), str(warmup)])
                for n in (names or CONTENDERS)]
        if "ffcv" in peers:
            plan += [(name, _ffcv_argv(Path(ffcv_venv), beton, Path(data), "nhwc", tuned, BATCH, threads, dtype, warmup,
                                       decoder)) for name, (dtype, tuned, decoder) in FFCV_CONTENDERS.items()]
        results["contenders"] = run_contenders(plan, cores, rounds, WindowRule(seconds, min_batches),
                                               log=lambda line: print(line, flush=True))
        results["load_avg_1m_after"] = os.getloadavg()[0]
        print(f"\nmedians over {rounds} windows; load {results['load_avg_1m_before']:.1f} -> "
              f"{results['load_avg_1m_after']:.1f}")
        previous = None
        for name, s in results["contenders"].items():
            step = "" if previous is None or name in NOT_CUMULATIVE else f"  (+{s['cpu_ms_per_img'] - previous:.3f})"
            print(f"{name:>15}: {s['cpu_ms_per_img']:.3f} CPU-ms/img{step}  {s['img_per_s']:8.1f} img/s "
                  f"({s['min']:.0f}-{s['max']:.0f})")
            if name not in NOT_CUMULATIVE or name == "draws":
                previous = s["cpu_ms_per_img"]
        results["vs_ffcv"] = _versus_ffcv(results["contenders"])
        for line in _versus_lines(results["vs_ffcv"]):
            print(line)
        if json_path:
            Path(json_path).write_text(json.dumps(results, indent=2))

    cli()


if __name__ == "__main__":
    serve_or_run(_batches, main)
