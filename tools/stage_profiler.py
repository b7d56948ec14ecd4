"""Measure images/sec of each stage of a training run, one small function per stage.

    cfg = ProfileConfig(data=Path("shards/imagenet"), device="cuda", batch_size=256)
    result = profile(cfg)            # ProfileResult: stages, bound_by, efficiency
    result.as_dict()                 # the --json document

Stages (`Stage`):
    read             raw shard bytes from disk (img/s and MB/s); the page cache is dropped first
    decode           the DALI pipeline alone (decode + augment), batches on the device
    baseline_decode  the reference loader alone (webdataset + PIL + DataLoader)
    model            training steps on synthetic device-resident data: no loader at all
    end_to_end       training steps fed by the DALI pipeline

Honest timing: every stage runs `warmup` untimed steps first (cuDNN autotuning, DALI prefetch
queues, allocator growth), then `repeats` timed repetitions of `steps` batches each; the median
repetition is reported and all of them are kept. On a GPU the model stages are timed with CUDA
events; loader stages with perf_counter and a device synchronize (they are host-driven).

`compile=True` wraps the network in torch.compile for the model and end_to_end stages, as
`train --compile` does. The compilation happens in the first warm-up step (at least one is run
then, whatever `warmup` says), so no timed repetition pays for it; `warmup_s` reports what the
warm-up took, compilation included.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from alexnet_fast.model.alexnet import build_model, count_parameters
from alexnet_fast.model.optim import make_optimizer
from alexnet_fast.model.loop import Engine, train_step
from alexnet_fast.model.runtime import image_dtype, resolve_precision

CROP = 227               # the network's input size (LoaderSpec.crop's default)
IMAGENET_CLASSES = 1000  # the model stage's classifier: ImageNet's, whatever the shard set has


class Stage(str, Enum):
    READ = "read"
    DECODE = "decode"
    BASELINE_DECODE = "baseline_decode"
    MODEL = "model"
    END_TO_END = "end_to_end"


ALL_STAGES: tuple[Stage, ...] = tuple(Stage)
DATA_STAGES = frozenset({Stage.READ, Stage.DECODE, Stage.BASELINE_DECODE, Stage.END_TO_END})
# The stages a real run passes through: the slowest of these bounds it (baseline_decode is a reference).
PIPELINE_STAGES: tuple[Stage, ...] = (Stage.READ, Stage.DECODE, Stage.MODEL)


class ProfileError(Exception):
    """A stage cannot be measured (no shard set, a loader that fails); the message is one line."""


@dataclass(frozen=True)
class ProfileConfig:
    data: Path | None                      # shard set; None: only the model stage can run
    device: str = "cpu"                    # "cpu" or "cuda"
    stages: tuple[Stage, ...] = ALL_STAGES
    arch: str = "alexnet-owt"
    precision: str = "auto"                # auto = bf16 on GPU, fp32 on CPU (the trainer's rule)
    batch_size: int = 16
    warmup: int = 1                        # untimed steps before each stage's timing
    repeats: int = 3                       # timed repetitions; the median is reported
    steps: int = 2                         # batches per timed repetition
    workers: int = 2                       # DALI threads / DataLoader workers
    channels_last: bool = True
    num_classes: int = IMAGENET_CLASSES
    compile: bool = False                  # torch.compile the network (model and end_to_end stages)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")

    @property
    def resolved_precision(self) -> str:
        return resolve_precision(self.precision, self.device)

    @property
    def image_dtype(self) -> torch.dtype:
        """What the loader hands the model: the trainer's rule (model.runtime.image_dtype)."""
        return image_dtype(self.device, self.resolved_precision)


@dataclass
class StageResult:
    img_per_s: float                       # median over the timed repetitions
    runs_img_per_s: list[float]            # every timed repetition
    images_per_run: int
    warmup_seconds: float = 0.0            # the untimed warm-up (a torch.compile included)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"img_per_s": self.img_per_s, "runs_img_per_s": self.runs_img_per_s,
                "images_per_run": self.images_per_run, "warmup_s": self.warmup_seconds, **self.extra}


@dataclass
class ProfileResult:
    device: str
    config: dict
    stages: dict[str, StageResult]
    bound_by: str | None
    efficiency: float | None

    def as_dict(self) -> dict:
        return {"device": self.device, "config": self.config,
                "stages": {name: r.as_dict() for name, r in self.stages.items()},
                "bound_by": self.bound_by, "efficiency": self.efficiency}


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_seconds(run: Callable[[], None], device: torch.device, device_events: bool) -> float:
    """Seconds `run()` takes, with the device idle before and finished after."""
    _synchronize(device)
    if device_events and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - t0


def measure(step: Callable[[], int], cfg: ProfileConfig, *, device_events: bool = False,
            min_warmup: int = 0) -> StageResult:
    """Warm up with `cfg.warmup` (at least `min_warmup`) calls of `step` (each returns the images
    it handled), then time `cfg.repeats` repetitions of `cfg.steps` calls; median img/s."""
    device = cfg.torch_device

    def warm_up() -> None:
        for _ in range(max(cfg.warmup, min_warmup)):
            step()

    warmup_seconds = time_seconds(warm_up, device, device_events=False)
    runs, images = [], 0
    for _ in range(cfg.repeats):
        counted = [0]

        def repetition() -> None:
            for _ in range(cfg.steps):
                counted[0] += step()

        seconds = time_seconds(repetition, device, device_events)
        images = counted[0]
        runs.append(images / seconds)
    return StageResult(statistics.median(runs), runs, images, warmup_seconds)


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

    result = measure(step, cfg)
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


def make_train_loader(cfg: ProfileConfig, kind: str):
    """The trainer's train loader for this config (same dtype/layout rules as model.train.load_data)."""
    from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader

    spec = LoaderSpec(
        data=str(cfg.data), split="train", kind=kind, batch_size=cfg.batch_size, device=cfg.device,
        device_id=cfg.torch_device.index or 0, workers=cfg.workers, channels_last=cfg.channels_last,
        dtype=cfg.image_dtype, borrow_buffers=True,   # as the trainer consumes batches
    )
    try:
        return make_loader(spec)
    except (NotImplementedError, ImportError) as e:   # a checkout without that loader
        raise ProfileError(f"the {kind} loader is not available: {e}") from None
    except ValueError as e:                           # e.g. fewer train images than one batch
        raise ProfileError(f"cannot build the {kind} loader: {e}") from None


def measure_loader(cfg: ProfileConfig, kind: str) -> StageResult:
    """The loader alone: batches pulled and dropped (on the device when device == cuda)."""
    batches = _endless_batches(make_train_loader(cfg, kind))

    def step() -> int:
        images, _labels = next(batches)
        return images.shape[0]

    result = measure(step, cfg)
    result.extra = {"loader": kind, "batch_size": cfg.batch_size}
    return result


def layer_flops(arch: str, num_classes: int, crop: int = CROP) -> list[tuple[str, int]]:
    """Forward FLOPs (multiply-add = 2) per image of each conv and linear layer, in forward order,
    from the layer shapes (a meta-device forward pass: nothing is computed). Pooling, ReLU, LRN and
    bias adds are left out: well under 1% of the total."""
    model = build_model(arch, num_classes).to("meta")
    counted: list[tuple[str, int]] = []

    def count(name: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kernel = module.kernel_size[0] * module.kernel_size[1]
                counted.append((name, 2 * output[0].numel() * module.in_channels // module.groups * kernel))
            else:
                counted.append((name, 2 * output[0].numel() * module.in_features))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(count(name))
    model(torch.empty(1, 3, crop, crop, device="meta"))
    return counted


@lru_cache(maxsize=None)
def train_flops_per_image(arch: str, num_classes: int, crop: int = CROP) -> float:
    """FLOPs of one training step per image: the forward pass, plus a backward pass that costs two
    forwards per layer (gradients of the inputs and of the weights), less the first layer's input
    gradient (the images need none). Counted by hand because torch.utils.flop_counter (torch 2.13)
    counts the backward of a grouped convolution as three forwards, not two (alexnet2012's grouped
    conv2/4/5: 4.96 instead of 4.14 GFLOP per image)."""
    layers = layer_flops(arch, num_classes, crop)
    forward = sum(f for _, f in layers)
    return float(3 * forward - layers[0][1])


# Dense peak TFLOP/s per precision (vendor datasheets; no sparsity). fp32 runs as TF32 on tensor
# cores because the trainer (and this profiler) allow TF32. Matched in order by device name.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),          # SXM (HBM3)
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    for key, table in PEAK_TFLOPS:
        if key in device_name:
            return table.get(precision)
    return None


def configure_backends(cfg: ProfileConfig) -> None:
    """The trainer's GPU speed settings (model/train.py `_train`): measure what training runs."""
    if cfg.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_engine(cfg: ProfileConfig) -> Engine:
    """A single-process training engine as the trainer builds it (SGD, autocast, channels-last,
    torch.compile when asked: it compiles at the first step, inside the warm-up)."""
    from alexnet_fast.model.config import TrainConfig

    device = cfg.torch_device
    precision = cfg.resolved_precision
    model = build_model(cfg.arch, cfg.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(TrainConfig(arch=cfg.arch), model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step_model = torch.compile(model) if cfg.compile else model
    return Engine(step_model, optimizer, scaler, None, device, precision, cfg.channels_last)


def measure_training(step: Callable[[], int], cfg: ProfileConfig) -> StageResult:
    """`measure` for the stages that train (device events on a GPU). With torch.compile at least
    one warm-up step, where the compilation happens; a compiler that fails is one line."""
    if not cfg.compile:
        return measure(step, cfg, device_events=True)
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        return measure(step, cfg, device_events=True, min_warmup=1)
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
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = (torch.randn(cfg.batch_size, 3, CROP, CROP, generator=generator)
              .to(cfg.torch_device, cfg.image_dtype).contiguous(memory_format=memory_format))
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=generator).to(cfg.torch_device)

    def step() -> int:
        train_step(engine, images, labels)
        return cfg.batch_size

    result = measure_training(step, cfg)
    result.extra = _flops_extra(cfg, result.img_per_s, engine)
    return result


def measure_end_to_end(cfg: ProfileConfig) -> StageResult:
    """Training steps fed by the DALI loader: what a run achieves."""
    engine = build_engine(cfg)
    batches = _endless_batches(make_train_loader(cfg, "dali"))

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


def profile(cfg: ProfileConfig, log: Callable[[str], None] = lambda msg: None) -> ProfileResult:
    """Run the configured stages in pipeline order and give the verdict."""
    from alexnet_fast.pipeline.shardset import ShardSet

    wanted = set(cfg.stages)
    if wanted & DATA_STAGES and cfg.data is None:
        raise ProfileError("stages " + ", ".join(s.value for s in ALL_STAGES if s in wanted & DATA_STAGES)
                           + " need a shard set: pass --data SHARDS")
    configure_backends(cfg)
    shards = None
    if cfg.data is not None:
        shard_set = ShardSet.open(cfg.data)   # ShardSetError: the caller's one-line error
        if not shard_set.has_split("train"):
            raise ProfileError(f"shard set {str(cfg.data)!r} has no train split to profile")
        if shard_set.num_classes > cfg.num_classes:
            raise ProfileError(f"the shard set has {shard_set.num_classes} classes, more than the "
                               f"model's {cfg.num_classes}")
        shards = shard_set.shards("train")

    runners: dict[Stage, Callable[[], StageResult]] = {
        Stage.READ: lambda: measure_read(cfg, shards),
        Stage.DECODE: lambda: measure_loader(cfg, "dali"),
        Stage.BASELINE_DECODE: lambda: measure_loader(cfg, "baseline"),
        Stage.MODEL: lambda: measure_model(cfg),
        Stage.END_TO_END: lambda: measure_end_to_end(cfg),
    }
    results: dict[str, StageResult] = {}
    for stage in ALL_STAGES:
        if stage in wanted:
            log(f"profiling {stage.value} ...")
            results[stage.value] = runners[stage]()
            log(f"  {stage.value}: {results[stage.value].img_per_s:,.1f} img/s")
    bound_by, efficiency = verdict(results)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items() if k != "stages"}
    config["stages"] = [s.value for s in cfg.stages]
    config["precision"] = cfg.resolved_precision
    return ProfileResult(device_name(cfg), config, results, bound_by, efficiency)


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _detail(name: str, r: dict) -> str:
    if name == Stage.READ.value:
        return f"{r['mb_per_s']:,.1f} MB/s, page cache {r['page_cache']}"
    if "tflop_per_s" in r:
        peak = (f"{r['fraction_of_peak']:.1%} of {r['peak_tflop_per_s']:g} peak" if r["fraction_of_peak"] is not None
                else "peak unknown")
        compiled = f", compiled (warm-up {r['warmup_s']:.0f} s)" if r.get("compile") else ""
        return (f"{r['arch']} {r['precision']}{compiled} batch {r['batch_size']}: {r['step_ms']:.1f} ms/step, "
                f"{r['tflop_per_s']:.3g} TFLOP/s ({peak})")
    return f"{r['loader']} loader, batch {r['batch_size']}"


def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}", f"{'stage':<16} {'img/s':>12}  {'runs (img/s)':<28} detail"]
    for name, r in report["stages"].items():
        runs = ", ".join(f"{v:,.1f}" for v in r["runs_img_per_s"])
        lines.append(f"{name:<16} {r['img_per_s']:>12,.1f}  {runs:<28} {_detail(name, r)}")
    efficiency = "n/a (needs decode, model and end_to_end)" if report["efficiency"] is None else f"{report['efficiency']:.1%}"
    lines.append(f"bound by: {report['bound_by'] or 'n/a'}; pipeline efficiency end_to_end / min(decode, model): {efficiency}")
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> None:
    """A PNG bar chart of img/s per stage; the bounding stage in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["stages"])
    values = [report["stages"][n]["img_per_s"] for n in names]
    colors = ["tab:red" if n == report["bound_by"] else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    bars = ax.bar(names, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_ylabel("images / s (median)")
    ax.set_yscale("log")
    title = f"{report['device']}: bound by {report['bound_by'] or 'n/a'}"
    if report["efficiency"] is not None:
        title += f", efficiency {report['efficiency']:.0%}"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
