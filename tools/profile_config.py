"""What `alexnet-fast profile` measures: the stages, and `ProfileConfig`, one field per flag of the
command (tools/flags.py generates them, as for train and eval).

    cfg = ProfileConfig(data=Path("shards/imagenet"), device="cuda").resolved()
    cfg.batch_size, cfg.workers        # 256, and the trainer's loader threads for one GPU

The profiled run is the trainer's on one device, in one process: `batch_size` is the global batch
of that one-device run, which is the batch the device steps on. Fields left None take the device's
default (`BY_DEVICE`): small on the CPU, so a profile ends in minutes on a few cores; on a GPU,
enough steps to reach a steady state (cuDNN autotuning happens in the warm-up).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from alexnet_fast.model.alexnet import ARCH_NAMES
from alexnet_fast.model.distributed import DistContext, resolve_device
from alexnet_fast.model.runtime import DECODE_HELP, DEVICES, FAST_IDCT_HELP, PRECISIONS, image_dtype, loader_workers, resolve_precision
from alexnet_fast.pipeline.loader_spec import DECODE_PLACEMENTS
from alexnet_fast.tools.profile_timing import TimingPlan

IMAGENET_CLASSES = 1000  # the profiled network's classifier: ImageNet's, whatever the shard set has


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


# The defaults of the fields left None, by resolved device.
BY_DEVICE: dict[str, dict[str, int]] = {
    "batch_size": {"cuda": 256, "cpu": 16},
    "steps": {"cuda": 20, "cpu": 2},
    "repeats": {"cuda": 5, "cpu": 3},
    "warmup": {"cuda": 10, "cpu": 1},
}


def _f(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ProfileConfig:
    data: Path | None = _f(None, "shard set directory (without it only the model stage runs)")
    device: str = _f("auto", "auto = cuda when a GPU is visible", choices=DEVICES)
    stages: tuple[Stage, ...] = ALL_STAGES
    arch: str = _f("alexnet-owt", "network", choices=ARCH_NAMES)
    precision: str = _f("auto", "auto = bf16 on GPU, fp32 on CPU (the trainer's rule)", choices=PRECISIONS)
    batch_size: int | None = _f(None, "images per training step: the GLOBAL batch of a one-device run, which is "
                                      "the batch that device steps on (profile runs one process on one device; "
                                      "train --batch-size N on one GPU steps on the same N)", min=1)
    warmup: int | None = _f(None, "untimed steps before each stage's timing", min=0)
    repeats: int | None = _f(None, "timed repetitions; the median is reported", min=1)
    steps: int | None = _f(None, "batches per timed repetition", min=1)
    workers: int = _f(0, "DALI threads / DataLoader workers; 0 = the trainer's default for one rank "
                         "(model.runtime.loader_workers)", min=0)
    decode: str = _f("gpu", DECODE_HELP + "; on a GPU the decode stage is also measured at the other "
                            "placement, to say which one the run needs", choices=DECODE_PLACEMENTS)
    fast_idct: bool = _f(False, FAST_IDCT_HELP)
    channels_last: bool = _f(True, "channels-last memory format, as train")
    num_classes: int = IMAGENET_CLASSES
    compile: bool = _f(False, "torch.compile the network for the model and end_to_end stages (as train "
                              "--compile); the warm-up, at least one step, absorbs the compile time")

    def resolved(self) -> "ProfileConfig":
        """This config with its device resolved ("auto" -> cuda or cpu), the fields left None set to
        that device's defaults, and `workers` 0 set to the trainer's default for one rank."""
        device = resolve_device(self.device)
        by_device = {name: table[device] for name, table in BY_DEVICE.items() if getattr(self, name) is None}
        cfg = replace(self, device=device, **by_device)
        return replace(cfg, workers=loader_workers(cfg.workers, cfg.context, cfg.decode))

    def at_placement(self, decode: str) -> "ProfileConfig":
        """This (resolved) config decoding at `decode` instead: the threads asked for, or when left
        to the default, that placement's default (a GPU run decoding on the CPU gets every core)."""
        defaulted = self.workers == loader_workers(0, self.context, self.decode)
        return replace(self, decode=decode, workers=loader_workers(0 if defaulted else self.workers, self.context, decode))

    @property
    def decode_placement(self) -> str:
        """Where this run decodes: `decode` on a GPU, "cpu" on the CPU (both values build the same
        graph there)."""
        return self.decode if self.device == "cuda" else "cpu"

    @property
    def placements(self) -> tuple[str, ...]:
        """The decode placements this device can measure, this run's first: on a GPU both, on the
        CPU only "cpu"."""
        if self.device != "cuda":
            return ("cpu",)
        return (self.decode,) + tuple(p for p in DECODE_PLACEMENTS if p != self.decode)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")

    @property
    def context(self) -> DistContext:
        """The one rank the profile runs as: a single process on the current device."""
        device = self.torch_device
        return DistContext(rank=0, local_rank=device.index or 0, world_size=1, device=device, local_world_size=1)

    @property
    def timing(self) -> TimingPlan:
        return TimingPlan(warmup=self.warmup, repeats=self.repeats, steps=self.steps)

    @property
    def resolved_precision(self) -> str:
        return resolve_precision(self.precision, self.device)

    @property
    def image_dtype(self) -> torch.dtype:
        """What the loader hands the model: the trainer's rule (model.runtime.image_dtype)."""
        return image_dtype(self.device, self.resolved_precision)
