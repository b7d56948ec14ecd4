"""Measure images/sec of each stage of a training run, one small function per stage, and the
verdict: which stage bounds the run.

    cfg = ProfileConfig(data=Path("shards/imagenet"), device="cuda")
    result = profile(cfg)            # ProfileResult: stages, bound_by, efficiency
    result.as_dict()                 # the --json document

Stages (profile_config.Stage):
    read             raw shard bytes from disk (img/s and MB/s); the page cache is dropped first
    decode           the DALI pipeline alone (decode + augment), batches on the device, decoding where
                     --decode says; on a GPU also at the other placement (`decode_cpu` / `decode_gpu`),
                     and `decode_placement` says which one the run needs (`decode_advice`)
    baseline_decode  the reference loader alone (webdataset + PIL + DataLoader)
    model            training steps on synthetic device-resident data: no loader at all
    end_to_end       training steps fed by the DALI pipeline

What is measured is what the trainer runs: the profiled run is `trainer_config(cfg)`, train on
this one device with the profile's settings and train's defaults for the rest, and its loader,
network, backend flags and precision come from model/runtime.py, the functions the trainer uses
(so `--arch alexnet2012` is profiled on the input scaling train feeds it, with train's loader
threads). Timing: profile_timing.py (warm-up, repetitions, median; CUDA events for the training
stages on a GPU). `compile` wraps the network in torch.compile as `train --compile` does; the
compilation happens in the first warm-up step (at least one is run then), so no timed repetition
pays for it, and `warmup_s` reports what the warm-up took.
"""
from __future__ import annotations

import statistics
import time

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from alexnet_fast.model.alexnet import count_parameters
from alexnet_fast.model.config import TrainConfig
from alexnet_fast.model.flops import CROP, train_flops_per_image
from alexnet_fast.model.loop import Engine, train_step
from alexnet_fast.model.optim import make_optimizer
from alexnet_fast.model.runtime import (loader_spec, memory_format, place_network, seed_everything,
                                        set_backend_flags)
from alexnet_fast.tools.device_peaks import peak_tflops
from alexnet_fast.tools.profile_config import (ALL_STAGES, DATA_STAGES, PIPELINE_STAGES, ProfileConfig, ProfileError,
                                               Stage)
from alexnet_fast.tools.profile_timing import StageResult, measure


@dataclass
class ProfileResult:
    device: str
    config: dict
    stages: dict[str, StageResult]
    bound_by: str | None
    efficiency: float | None
    decode_placement: dict | None = None        # decode_advice's verdict, when the decode stage ran

    def as_dict(self) -> dict:
        return {"device": self.device, "config": self.config,
                "stages": {name: r.as_dict() for name, r in self.stages.items()},
                "bound_by": self.bound_by, "efficiency": self.efficiency, "decode_placement": self.decode_placement}


# --------------------------------------------------------------------------------------------
# the run being profiled: the trainer's, built by the trainer's functions
# --------------------------------------------------------------------------------------------
def trainer_config(cfg: ProfileConfig, loader: str = "dali") -> TrainConfig:
    """`alexnet-fast train` on this one device with the profile's settings (a resolved `cfg`) and
    train's defaults for everything else: seed, lighting, input normalization for the arch and its
    default init, corrupt-sample mode, dropout, optimizer."""
    return TrainConfig(data="" if cfg.data is None else str(cfg.data), arch=cfg.arch, num_classes=cfg.num_classes,
                       batch_size=cfg.batch_size, loader=loader, workers=cfg.workers, device=cfg.device,
                       precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile,
                       decode=cfg.decode, fast_idct=cfg.fast_idct)


def train_loader_spec(cfg: ProfileConfig, kind: str):
    """The LoaderSpec the trainer builds for its train split in `trainer_config(cfg, kind)` (model/train.py
    load_data: one rank, so the global batch is this device's batch)."""
    train = trainer_config(cfg, kind)
    return loader_spec("train", data=train.data, kind=train.loader, batch_size=train.batch_size, ctx=cfg.context,
                       precision=cfg.resolved_precision, channels_last=train.channels_last,
                       scale_by_std=train.scale_by_std, on_corrupt=train.on_corrupt, workers=train.workers,
                       seed=train.seed, lighting_std=train.lighting_std, decode=train.decode,
                       fast_idct=train.fast_idct)


def make_train_loader(cfg: ProfileConfig, kind: str, shard_set):
    from alexnet_fast.pipeline.loaders import make_loader

    try:
        return make_loader(train_loader_spec(cfg, kind), shard_set)
    except (NotImplementedError, ImportError) as e:   # a checkout without that loader
        raise ProfileError(f"the {kind} loader is not available: {e}") from None
    except ValueError as e:                           # e.g. fewer train images than one batch
        raise ProfileError(f"cannot build the {kind} loader: {e}") from None


def build_engine(cfg: ProfileConfig) -> Engine:
    """A single-process training engine as the trainer builds it (its network placement, SGD,
    autocast precision, channels-last; torch.compile when asked: it compiles at the first step,
    inside the warm-up)."""
    train = trainer_config(cfg)
    device, precision = cfg.torch_device, cfg.resolved_precision
    seed_everything(train.seed)
    model = place_network(train.arch, train.num_classes, device, channels_last=train.channels_last,
                          dropout=train.dropout, init=train.init)
    optimizer = make_optimizer(train, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step_model = torch.compile(model) if train.compile else model
    return Engine(step_model, optimizer, scaler, None, device, precision, train.channels_last, train.label_smoothing)


# --------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------
def measure_read(cfg: ProfileConfig, shards: list) -> StageResult:
    """Raw shard bytes from disk, whole tars in order (cycling), page cache dropped before each
    file where the OS allows it, so the number is the disk's, not memory's."""
    buffer = memoryview(bytearray(8 << 20))
    position, totals = [0], {"bytes": 0, "images": 0}
    can_drop = hasattr(os, "posix_fadvise")

    def read_one_shard() -> int:
        shard = shards[position[0] % len(shards)]
        position[0] += 1
        with open(shard.tar, "rb", buffering=0) as f:
            if can_drop:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while n := f.readinto(buffer):
                totals["bytes"] += n
        totals["images"] += shard.samples
        return shard.samples

    # One step reads whole shards holding about a batch of images (at least one shard).
    shards_per_step = max(1, round(cfg.batch_size / max(1, min(s.samples for s in shards))))

    def step() -> int:
        return sum(read_one_shard() for _ in range(shards_per_step))

    result = measure(step, cfg.torch_device, cfg.timing)
    result.extra = {"mb_per_s": result.img_per_s * totals["bytes"] / max(1, totals["images"]) / 1e6,
                    "page_cache": "dropped before each file" if can_drop else "may serve repeated reads"}
    return result


def _endless_batches(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ProfileError("the train loader yields no batches: fewer images than one batch?")
        epoch += 1


def measure_loader(cfg: ProfileConfig, kind: str, shard_set) -> StageResult:
    """The loader alone: batches pulled and dropped (on the device when device == cuda)."""
    batches = _endless_batches(make_train_loader(cfg, kind, shard_set))

    def step() -> int:
        images, _labels = next(batches)
        return images.shape[0]

    result = measure(step, cfg.torch_device, cfg.timing)
    result.extra = {"loader": kind, "batch_size": cfg.batch_size, "workers": cfg.workers,
                    **({"decode": cfg.decode_placement} if kind == "dali" else {})}
    return result


def measure_training(step: Callable[[], int], cfg: ProfileConfig) -> StageResult:
    """`measure` for the stages that train (device events on a GPU). With torch.compile at least
    one warm-up step, where the compilation happens; a compiler that fails is one line."""
    if not cfg.compile:
        return measure(step, cfg.torch_device, cfg.timing, device_events=True)
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        return measure(step, cfg.torch_device, cfg.timing, device_events=True, min_warmup=1)
    except BackendCompilerFailed as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProfileError(f"torch.compile failed ({reason[:300]}); profile without --compile") from None


def _flops_extra(cfg: ProfileConfig, img_per_s: float, engine: Engine) -> dict:
    flops = train_flops_per_image(cfg.arch, cfg.num_classes)
    achieved = img_per_s * flops / 1e12
    peak = peak_tflops(device_name(cfg), cfg.resolved_precision) if cfg.device == "cuda" else None
    return {
        "arch": cfg.arch, "precision": cfg.resolved_precision, "batch_size": cfg.batch_size, "compile": cfg.compile,
        "step_ms": cfg.batch_size / img_per_s * 1e3, "params": count_parameters(engine.model),
        "gflop_per_image": flops / 1e9, "tflop_per_s": achieved,
        "peak_tflop_per_s": peak, "fraction_of_peak": achieved / peak if peak else None,
    }


def measure_model(cfg: ProfileConfig) -> StageResult:
    """Training steps on one synthetic batch already on the device: the compute ceiling."""
    engine = build_engine(cfg)
    generator = torch.Generator().manual_seed(0)
    # The loader's dtype and memory layout, so the step does exactly what it does in a real run.
    images = (torch.randn(cfg.batch_size, 3, CROP, CROP, generator=generator)
              .to(cfg.torch_device, cfg.image_dtype).contiguous(memory_format=memory_format(cfg.channels_last)))
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=generator).to(cfg.torch_device)

    issue_seconds: list[float] = []

    def step() -> int:
        started = time.perf_counter()
        train_step(engine, images, labels)
        issue_seconds.append(time.perf_counter() - started)
        return cfg.batch_size

    result = measure_training(step, cfg)
    result.extra = {**_flops_extra(cfg, result.img_per_s, engine),
                    **_host_overhead(cfg, issue_seconds[-cfg.repeats * cfg.steps:], cfg.batch_size / result.img_per_s * 1e3)}
    return result


def _host_overhead(cfg: ProfileConfig, issue_seconds: list[float], step_ms: float) -> dict:
    """What the host spends per step: the time `train_step` takes to return, timed steps only.

    On a GPU the step only enqueues kernels and returns (no sync inside it), so this is the Python
    and launch overhead the GPU must hide; while it stays below the device's step time the host
    keeps ahead. Assuming the device time scales with the batch and the host time does not, the
    per-GPU batch below which the host bounds the step is batch x host_ms / step_ms
    (`host_bound_below_batch`): a small per-GPU batch (many GPUs, a fixed global batch) stops
    scaling there. On the CPU the step computes before it returns, so host time is the whole
    step and the figure says nothing (reported as null)."""
    host_ms = statistics.median(issue_seconds) * 1e3 if issue_seconds else None
    on_gpu = cfg.device == "cuda"
    return {"host_ms_per_step": host_ms,
            "host_bound_below_batch": (cfg.batch_size * host_ms / step_ms) if on_gpu and host_ms else None}


def measure_end_to_end(cfg: ProfileConfig, shard_set) -> StageResult:
    """Training steps fed by the DALI loader: what a run achieves."""
    engine = build_engine(cfg)
    batches = _endless_batches(make_train_loader(cfg, "dali", shard_set))

    def step() -> int:
        images, labels = next(batches)
        train_step(engine, images, labels)
        return images.shape[0]

    result = measure_training(step, cfg)
    result.extra = {"loader": "dali", **_flops_extra(cfg, result.img_per_s, engine)}
    return result


# --------------------------------------------------------------------------------------------
# the whole profile
# --------------------------------------------------------------------------------------------
def device_name(cfg: ProfileConfig) -> str:
    if cfg.device == "cuda":
        return torch.cuda.get_device_name(cfg.torch_device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def verdict(stages: dict[str, StageResult]) -> tuple[str | None, float | None]:
    """(the slowest of the pipeline's stages, end_to_end / min(decode, model))."""
    rates = {s.value: stages[s.value].img_per_s for s in PIPELINE_STAGES if s.value in stages}
    bound_by = min(rates, key=rates.get) if rates else None
    parts = [stages[s].img_per_s for s in (Stage.DECODE.value, Stage.MODEL.value) if s in stages]
    efficiency = None
    if Stage.END_TO_END.value in stages and len(parts) == 2:
        efficiency = stages[Stage.END_TO_END.value].img_per_s / min(parts)
    return bound_by, efficiency


def decode_stage_name(cfg: ProfileConfig, placement: str) -> str:
    """The stage entry of the decode stage at `placement`: "decode" for this run's own, which the
    verdict uses; "decode_cpu" / "decode_gpu" for the other one."""
    return Stage.DECODE.value if placement == cfg.decode_placement else f"{Stage.DECODE.value}_{placement}"


def decode_advice(cfg: ProfileConfig, stages: dict[str, StageResult]) -> dict | None:
    """Which decode placement the run needs, from the decode stage's img/s at each placement
    measured against the model stage's: this run's own if it keeps up with the model; else one
    that does (the fastest); else none does and the run is decode-bound at the fastest. None
    without a decode stage."""
    rates = {p: stages[decode_stage_name(cfg, p)].img_per_s for p in cfg.placements
             if decode_stage_name(cfg, p) in stages}
    if not rates:
        return None
    model = stages[Stage.MODEL.value].img_per_s if Stage.MODEL.value in stages else None
    own, fastest = cfg.decode_placement, max(rates, key=rates.get)
    keeping_up = [p for p in rates if model is not None and rates[p] >= model]
    measured = ", ".join(f"{p} {r:,.0f} img/s" for p, r in rates.items())
    if model is None:
        needs, why = fastest, f"the fastest placement measured ({measured}); the model stage was not measured"
    elif own in keeping_up:
        needs, why = own, f"--decode {own} keeps up with the model ({measured}; model {model:,.0f} img/s)"
    elif keeping_up:
        needs = max(keeping_up, key=rates.get)
        why = f"--decode {own} falls behind the model and {needs} keeps up ({measured}; model {model:,.0f} img/s)"
    else:
        needs = fastest
        why = (f"no placement measured keeps up with the model ({measured}; model {model:,.0f} img/s): "
               f"the run is bound by decode, least at {needs}")
    if len(rates) == 1 and cfg.device != "cuda":
        why += "; a CPU run decodes on the CPU either way"
    return {"needs": needs, "img_per_s": rates, "model_img_per_s": model, "keeps_up": model is not None
            and rates[needs] >= model, "why": why}


def profile(cfg: ProfileConfig, log: Callable[[str], None] = lambda msg: None) -> ProfileResult:
    """Run the configured stages in pipeline order and give the verdict."""
    from alexnet_fast.pipeline.shardset import ShardSet

    cfg = cfg.resolved()
    wanted = set(cfg.stages)
    if wanted & DATA_STAGES and cfg.data is None:
        raise ProfileError("stages " + ", ".join(s.value for s in ALL_STAGES if s in wanted & DATA_STAGES)
                           + " need a shard set: pass --data SHARDS")
    set_backend_flags(cfg.torch_device)
    shard_set = None
    if cfg.data is not None:
        shard_set = ShardSet.open(cfg.data)   # ShardSetError: the caller's one-line error
        if not shard_set.has_split("train"):
            raise ProfileError(f"shard set {str(cfg.data)!r} has no train split to profile")
        if shard_set.num_classes > cfg.num_classes:
            raise ProfileError(f"the shard set has {shard_set.num_classes} classes, more than the "
                               f"model's {cfg.num_classes}")

    runners: dict[Stage, Callable[[], StageResult]] = {
        Stage.READ: lambda: measure_read(cfg, shard_set.shards("train")),
        Stage.DECODE: lambda: {decode_stage_name(cfg, p): measure_loader(cfg.at_placement(p), "dali", shard_set)
                               for p in cfg.placements},
        Stage.BASELINE_DECODE: lambda: measure_loader(cfg, "baseline", shard_set),
        Stage.MODEL: lambda: measure_model(cfg),
        Stage.END_TO_END: lambda: measure_end_to_end(cfg, shard_set),
    }
    results: dict[str, StageResult] = {}
    for stage in ALL_STAGES:
        if stage in wanted:
            log(f"profiling {stage.value} ...")
            measured = runners[stage]()
            for name, result in (measured.items() if isinstance(measured, dict) else [(stage.value, measured)]):
                results[name] = result
                log(f"  {name}: {result.img_per_s:,.1f} img/s")
    bound_by, efficiency = verdict(results)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items() if k != "stages"}
    config["stages"] = [s.value for s in cfg.stages]
    config["precision"] = cfg.resolved_precision
    return ProfileResult(device_name(cfg), config, results, bound_by, efficiency, decode_advice(cfg, results))
