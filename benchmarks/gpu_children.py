"""The device check's child processes (benchmarks/gpu_check.py runs each as its own step):

    python gpu_children.py bench-set WORK DISTINCT REPEATS   # the loader benchmark's shard set
    python gpu_children.py decode DATA BATCH WARMUP BATCHES cuda,cpu|cpu   # is the decoder on the GPU?
    python gpu_children.py loader DATA BATCH WARMUP BATCHES full|roi DTYPE cuda|cpu

Each prints one JSON line last. They import alexnet_fast from the path gpu_check.py sets up.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_verdicts import mapped_nvjpeg  # noqa: E402


def bench_set(work: Path, distinct: int, repeats: int) -> dict:
    """DISTINCT JPEGs (one per class) in one train shard, then that shard hard-linked REPEATS times
    under new names: the decode cost of DISTINCT x REPEATS images for the drawing cost of DISTINCT."""
    from alexnet_fast.pipeline.host import usable_cores
    from alexnet_fast.pipeline.shardset import MANIFEST_NAME
    from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet
    from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

    shards = work / "shards"
    spec = SampleSpec(classes=distinct, train_per_class=1, val_per_class=1, odd_files=False, min_side=300,
                      max_side=500, val_layout=ValFormat.FLAT_DEVKIT)
    raw = write_raw_imagenet(work / "raw", spec, workers=usable_cores())
    make_shards(raw.root, shards, ShardOptions(per_shard=distinct), workers=usable_cores(), progress=False,
                log=lambda m: None)
    shutil.rmtree(raw.root)
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    train = manifest["splits"]["train"]
    assert len(train["shards"]) == 1, train["shards"]
    first = train["shards"][0]
    for copy in range(1, repeats):
        entry = {**first, "tar": f"train-{copy:06d}.tar", "index": f"train-{copy:06d}.idx"}
        os.link(shards / first["tar"], shards / entry["tar"])
        os.link(shards / first["index"], shards / entry["index"])
        train["shards"].append(entry)
    train["samples"] = first["samples"] * repeats
    (shards / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return {"shards": str(shards), "distinct_jpegs": first["samples"], "train_samples": train["samples"],
            "jpeg_kib_mean": round(first["bytes"] / first["samples"] / 1024, 1)}


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)        # every thread of this process: DALI's too
    return usage.ru_utime + usage.ru_stime


def _steady_batches(spec, warmup: int, batches: int) -> dict:
    """Host CPU-ms and wall time per image over BATCHES batches after WARMUP, inside one epoch:
    the pipeline build, set_epoch and the first fill are outside the window (so is any gc)."""
    import torch

    from alexnet_fast.pipeline.loaders import make_loader

    loader = make_loader(spec)
    loader.set_epoch(0)
    batches_iter = iter(loader)
    for _ in range(warmup):
        next(batches_iter)
    sync = torch.cuda.synchronize if spec.device == "cuda" else (lambda: None)
    sync()
    cpu, wall, images = _process_cpu_s(), time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(batches_iter)
        images += x.shape[0]
    sync()
    wall, cpu = time.perf_counter() - wall, _process_cpu_s() - cpu
    return {"cpu_ms_per_img": round(1000 * cpu / images, 4), "img_per_s": round(images / wall, 1),
            "images": images, "out_device": str(x.device), "workers": spec.workers}


def decode(data: str, batch: int, warmup: int, batches: int, devices: list[str]) -> dict:
    """The GPU loader (when asked) then the CPU twin, same data, same steady-state window; which
    libnvjpeg this process has mapped after the GPU run, and at the end."""
    import torch

    from alexnet_fast.pipeline.loader_spec import LoaderSpec, default_loader_workers

    out = {}
    for device in devices:
        spec = LoaderSpec(data=data, device=device, batch_size=batch, workers=default_loader_workers(device),
                          dtype=torch.float16, channels_last=True, borrow_buffers=True)
        out[device] = _steady_batches(spec, warmup, batches)
        if device == "cuda":
            out["libnvjpeg_mapped_after_gpu_run"] = mapped_nvjpeg(Path("/proc/self/maps").read_text())
    out.setdefault("libnvjpeg_mapped_after_gpu_run", None)
    out["libnvjpeg_mapped_at_end"] = mapped_nvjpeg(Path("/proc/self/maps").read_text())
    return out


def loader(data: str, batch: int, warmup: int, batches: int, decode_mode: str, dtype: str, device: str) -> dict:
    import torch

    from alexnet_fast.pipeline.loader_spec import LoaderSpec, default_loader_workers

    spec = LoaderSpec(data=data, device=device, batch_size=batch, workers=default_loader_workers(device),
                      dtype=getattr(torch, dtype), channels_last=True, borrow_buffers=True,
                      roi_decode=decode_mode == "roi")
    return {"device": device, **_steady_batches(spec, warmup, batches)}


def main(argv: list[str]) -> None:
    what, args = argv[0], argv[1:]
    if what == "bench-set":
        result = bench_set(Path(args[0]), int(args[1]), int(args[2]))
    elif what == "decode":
        result = decode(args[0], *map(int, args[1:4]), args[4].split(","))
    elif what == "loader":
        result = loader(args[0], *map(int, args[1:4]), args[4], args[5], args[6])
    else:
        raise SystemExit(f"gpu_children: unknown step {what!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
