"""What a caller asks a data loader for (`LoaderSpec`), what every loader gives back (the `Loader`
protocol), the choices a spec may take, and the default worker count per rank.

Both loaders (dali_loader.py, baseline.py) and `loaders.make_loader` import this module; it imports
neither, so the contract sits below the implementations (no import cycle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Protocol, get_args

import torch

from alexnet_fast.pipeline.augment import ColorStats
from alexnet_fast.pipeline.host import usable_cores
from alexnet_fast.pipeline.shardset import SPLITS, ShardSet

LoaderKind = Literal["dali", "baseline"]
OnCorrupt = Literal["error", "skip"]
LoaderDevice = Literal["cpu", "cuda"]
DecodePlacement = Literal["gpu", "cpu"]

LOADER_KINDS: tuple[str, ...] = get_args(LoaderKind)           # ("dali", "baseline")
ON_CORRUPT_MODES: tuple[str, ...] = get_args(OnCorrupt)        # ("error", "skip")
LOADER_DEVICES: tuple[str, ...] = get_args(LoaderDevice)       # ("cpu", "cuda")
DECODE_PLACEMENTS: tuple[str, ...] = get_args(DecodePlacement)  # ("gpu", "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LoaderSpec:
    data: str                                   # shard set directory (has manifest.json)
    split: Literal["train", "val"] = "train"
    kind: LoaderKind = "dali"
    batch_size: int = 128                       # per rank
    rank: int = 0
    world_size: int = 1
    device: LoaderDevice = "cpu"
    device_id: int = 0                          # CUDA device index when device == "cuda"
    seed: int = 0
    workers: int = 2                            # DALI threads / DataLoader workers (default_loader_workers)
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    crop: int = 227
    ten_crop: bool = False                      # val only: images [B,10,3,crop,crop]
    lighting_std: float = 0.1                   # PCA lighting alpha ~ N(0, lighting_std); 0 disables
    # (x - mean) / std per channel; False: x - mean only, the paper's centred raw RGB values
    # (0..255 scale), which its N(0, 0.01) init was tuned for (model/config.py `normalize`)
    scale_by_std: bool = True
    on_corrupt: OnCorrupt = "error"
    shuffle_buffer: int = 4096                  # train: per-rank shuffle buffer (samples)
    prefetch: int = 2                           # DALI prefetch queue depth / DataLoader prefetch_factor
    # DALI: hand out each image batch as DALI's own output buffer (shared through DLPack, on the
    # CPU and on a GPU) instead of a copy. DALI's dynamic executor does not reuse a buffer while a
    # tensor refers to it (dali_loader._dali_to_torch), so the batch stays valid as long as it is
    # held; the trainer, evaluator and profiler, which drop each batch before the next, borrow;
    # code that keeps many (tests, list(loader)) leaves it off and gets copies, so as not to hold
    # DALI's memory pool. Saves a ~40 MB copy per batch of 64 on the CPU (measured: ~9 of ~37 ms
    # per batch on 2 cores) and a device-to-device copy on a GPU; the baseline loader ignores it.
    borrow_buffers: bool = False
    # DALI: decode only the crop window (train's random crop, val's centre crop; ten-crop decodes the
    # whole image) -- the same pixels as the full decode. None: the device's default, ROI_DECODE_DEFAULT.
    roi_decode: bool | None = None
    # DALI, CPU decoder: libjpeg-turbo's fast integer IDCT; pixels within FAST_IDCT_MAX_LEVELS of the
    # exact decode (tests/test_pipeline.py), so off unless asked for. No effect on the GPU decoder.
    fast_idct: bool = False
    # Where a GPU run's JPEGs are decoded: "gpu" = nvJPEG and the hardware decoder (DALI's "mixed"
    # decoder); "cpu" = DALI's CPU decoder (libjpeg-turbo) on the loader's threads, then the same
    # crop/mirror/lighting/normalize on the GPU (DALI's ResNet-50 example's --dali_cpu): for a GPU
    # that trains faster than its decoders decode, on a node with cores to spare. A CPU run decodes
    # on the CPU either way: both values build the same graph there (its CPU twin).
    decode: DecodePlacement = "gpu"

    @property
    def decodes_on_gpu(self) -> bool:
        """Whether the JPEG decoder runs on the GPU (a GPU run with decode="gpu")."""
        return self.device == "cuda" and self.decode == "gpu"

    @property
    def decode_roi(self) -> bool:
        """Whether the DALI loader decodes only the crop window (roi_decode, or the decoder's default)."""
        if self.roi_decode is not None:
            return self.roi_decode
        return ROI_DECODE_DEFAULT["cuda" if self.decodes_on_gpu else "cpu"]


# ROI decoding per decoder when LoaderSpec.roi_decode is None ("cpu": the CPU decoder, of a CPU run
# or of a GPU run with decode="cpu"; "cuda": the GPU decoder). CPU: on -- identical pixels, and the
# decode + normalize stages measured ~7% less CPU per image (0.54 vs 0.58 ms, overlapping ranges;
# end to end no difference within the noise, benchmarks/RESULTS.md issue 17): libjpeg-turbo still
# entropy-decodes the whole image and a 227 window of 256 skips only ~21% of the IDCT and colour
# work. CUDA: off until measured -- whether the A100/H100
# hardware JPEG decoder takes ROI requests or falls back to the slower CUDA path is not known here
# (benchmarks/gpu_check.py measures both settings).
ROI_DECODE_DEFAULT = {"cpu": True, "cuda": False}
# The most a fast-IDCT pixel may differ from the exact decode, in 0..255 levels (measured max on
# the issue-17 benchmark images: 5, mean ~1 on the test images; the bound leaves room for other
# image content). Measured no faster than the exact IDCT on the 2-core VM (libjpeg-turbo's SIMD).
FAST_IDCT_MAX_LEVELS = 8


class Loader(Protocol):
    num_samples: int                            # samples this rank sees per epoch (val: exact, no padding)
    skipped: list[str]                          # "<tar>:<key>" of the samples left out so far (on_corrupt="skip")
    notes: list[str]                            # damaged shards the loader works around (on_corrupt="skip")

    def __len__(self) -> int: ...              # batches per epoch on this rank (same on every rank for train)

    def set_epoch(self, epoch: int) -> None: ...   # the next iteration is epoch `epoch` from its first batch

    def prepare(self, epoch: int) -> None: ...     # set_epoch, and start that epoch now, in the background
    # (the DALI loader builds its pipeline and decodes the first batch while the caller does other work)

    def resume(self, epoch: int, batches_done: int, state: dict | None = None) -> bool: ...
    # the next iteration yields epoch `epoch` from batch `batches_done` on; True if `state` (from
    # state_dict) restored the loader there, False if it replays the batches before it

    def state_dict(self) -> dict: ...          # where this rank is in its epoch, between two batches

    def exclude(self, names: list[str]) -> None: ...   # leave these "<tar>:<key>" samples out, skipped and counted

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class CorruptSampleError(RuntimeError):
    """A sample inside a shard cannot be decoded; the message names the shard and the key."""


def _either(choices: tuple[str, ...]) -> str:
    return " or ".join(repr(c) for c in choices)


def check_spec(spec: LoaderSpec) -> None:
    """Raise ValueError naming the first field of `spec` no loader can honour."""
    if spec.kind not in LOADER_KINDS:
        raise ValueError(f"loader kind must be {_either(LOADER_KINDS)}, not {spec.kind!r}")
    if spec.split not in SPLITS:
        raise ValueError(f"split must be {_either(SPLITS)}, not {spec.split!r}")
    if spec.ten_crop and spec.split != "val":
        raise ValueError("ten_crop is for the val split only")
    if not 0 <= spec.rank < spec.world_size:
        raise ValueError(f"rank {spec.rank} is outside world size {spec.world_size}")
    if spec.batch_size < 1 or spec.workers < 1:
        raise ValueError("batch_size and workers must be at least 1")
    if spec.dtype not in DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {spec.dtype}")
    if spec.on_corrupt not in ON_CORRUPT_MODES:
        raise ValueError(f"on_corrupt must be {_either(ON_CORRUPT_MODES)}, not {spec.on_corrupt!r}")
    if spec.decode not in DECODE_PLACEMENTS:
        raise ValueError(f"decode must be {_either(DECODE_PLACEMENTS)}, not {spec.decode!r}")


# Not measured on a GPU yet: a ceiling, not a tuned value. With device="cuda" and decode="gpu" the
# JPEGs are decoded on the GPU (mixed decoder); DALI's host threads read the tars, parse JPEG headers and run the
# host half of nvJPEG for the share the hardware decoder does not take (hw_decoder_load=0.75), a
# few threads' work per GPU. Past that, more threads per rank only compete with the training
# process's own host threads (Python, the CUDA launch queue, NCCL) on a node whose cores are shared
# by all its GPUs' ranks.
GPU_LOADER_WORKERS_CAP = 8


def default_loader_workers(device: str, local_ranks: int = 1, *, cores: int | None = None,
                           decode: str = "gpu") -> int:
    """DALI threads / DataLoader workers for one rank when the user names none: the cores this
    process may use (`cores`, default `usable_cores()`) shared evenly by the `local_ranks` ranks on
    this machine, at least 1. Where the loader decodes every image on these cores (device="cpu",
    or a GPU run with decode="cpu") it gets its whole share; where the GPU decodes, the share is
    capped at GPU_LOADER_WORKERS_CAP (see there)."""
    if device not in LOADER_DEVICES:
        raise ValueError(f"device must be {_either(LOADER_DEVICES)}, not {device!r}")
    if local_ranks < 1:
        raise ValueError(f"local_ranks must be at least 1, not {local_ranks}")
    if decode not in DECODE_PLACEMENTS:
        raise ValueError(f"decode must be {_either(DECODE_PLACEMENTS)}, not {decode!r}")
    share = max(1, (usable_cores() if cores is None else cores) // local_ranks)
    return min(share, GPU_LOADER_WORKERS_CAP) if device == "cuda" and decode == "gpu" else share


def color_stats(spec: LoaderSpec, shard_set: ShardSet) -> ColorStats:
    """The ColorStats a loader normalizes and lights with: stats.json, or with scale_by_std off
    its mean-only variant."""
    stats = ColorStats.from_dict(shard_set.stats())
    return stats if spec.scale_by_std else stats.centred_only()
