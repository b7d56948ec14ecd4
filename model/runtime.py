"""How a process runs the network, written once for train, eval and profile: which precision and
device flags, which seed, how the network is placed, and what loader it is fed by.

    precision = resolve_precision("auto", "cuda")            # "bf16"
    with autocast(device, precision): logits = model(images)
    spec = loader_spec("train", data=..., kind="dali", batch_size=64, ctx=ctx, precision=precision, ...)

Every command that touches the network goes through these functions, so the profiler measures the
loader and the model the trainer runs, and eval scores a checkpoint the way the trainer evaluated it.
"""
from __future__ import annotations

import contextlib
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from alexnet_fast.model.alexnet import build_model

if TYPE_CHECKING:
    from alexnet_fast.model.distributed import DistContext
    from alexnet_fast.pipeline.loader_spec import LoaderSpec

DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# --decode's help, the same for train, eval and profile
DECODE_HELP = ("where a GPU run decodes JPEGs: gpu = the GPU's decoders (nvJPEG, hardware decoder), cpu = DALI's "
               "CPU decoder on the loader threads, then the same augmentation on the GPU (for a GPU that trains "
               "faster than it decodes; `alexnet-fast profile` says which the run needs); a CPU run decodes on "
               "the CPU either way")
# --fast-idct's help, the same for train, eval and profile
FAST_IDCT_HELP = ("DALI's CPU decoder (a CPU run, or --decode cpu) with libjpeg-turbo's fast integer IDCT, FFCV's "
                  "stock DCT: pixels within 8 levels of the exact decode; on real photos 0-14% less CPU per decoded "
                  "image (benchmarks/RESULTS.md); no effect on the GPU decoder")

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(precision: str, device_type: str) -> str:
    """'auto' -> bf16 autocast on a GPU (tensor cores, fp32's exponent range: no loss scaling),
    fp32 on the CPU (CPU bf16 kernels are slower than fp32 ones for these convolutions)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def image_dtype(device_type: str, precision: str) -> torch.dtype:
    """What the loader hands the model: on a GPU, images in the autocast dtype (half the bytes out
    of DALI and through the copy; autocast would cast them anyway); fp32 on the CPU."""
    return (AUTOCAST_DTYPES[precision] or torch.float32) if device_type == "cuda" else torch.float32


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast context for a resolved `precision` (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def set_backend_flags(device: torch.device) -> None:
    """On a GPU: cuDNN autotuning (the input shape never changes, so the search pays once) and TF32
    matmuls/convolutions for whatever runs outside autocast. Nothing to set on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every GPU) generators from one integer."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def place_network(arch: str, num_classes: int, device: torch.device, *, channels_last: bool,
                  dropout: float = 0.5, init: str = "default") -> nn.Module:
    """The network on `device`, in channels-last layout when asked (what cuDNN's fastest
    convolutions read; the loader then hands images in the same layout)."""
    model = build_model(arch, num_classes, dropout, init).to(device)
    return model.to(memory_format=memory_format(channels_last))


def loader_workers(requested: int, ctx: "DistContext", decode: str = "gpu") -> int:
    """Loader threads/workers of one rank: `requested`, or with 0 the pipeline's default for the
    cores this rank has (the node's cores shared by its ranks) and where it decodes (`decode`,
    LoaderSpec.decode) -- one rule for train, eval, profile."""
    from alexnet_fast.pipeline.loader_spec import default_loader_workers

    return requested or default_loader_workers(ctx.device.type, ctx.local_world_size, decode=decode)


def loader_spec(split: str, *, data: str, kind: str, batch_size: int, ctx: "DistContext", precision: str,
                channels_last: bool, scale_by_std: bool, on_corrupt: str, workers: int, seed: int = 0,
                lighting_std: float = 0.1, ten_crop: bool = False, decode: str = "gpu",
                fast_idct: bool = False) -> "LoaderSpec":
    """The loader spec of this rank, built the same way for train, eval and profile.

    `batch_size` is this rank's batch; `workers` 0 takes `loader_workers`' default; `decode`: where a
    GPU run decodes (LoaderSpec.decode); `fast_idct`: the CPU decoder's IDCT (LoaderSpec.fast_idct).
    Images come in the network's dtype and layout (`image_dtype`, `channels_last`) on this rank's
    device (its index, not the local rank: the two differ when ranks share a GPU, as in
    tests/gpu/test_two_ranks_gpu.py); `borrow_buffers`: each consumer (a train step, an eval batch, a
    profiled step) is done with a batch before it asks for the next."""
    from alexnet_fast.pipeline.loader_spec import LoaderSpec

    return LoaderSpec(
        data=data, split=split, kind=kind, batch_size=batch_size, rank=ctx.rank, world_size=ctx.world_size,
        device=ctx.device.type, device_id=ctx.device.index or 0, seed=seed, workers=loader_workers(workers, ctx, decode),
        dtype=image_dtype(ctx.device.type, precision), channels_last=channels_last, ten_crop=ten_crop,
        lighting_std=lighting_std, scale_by_std=scale_by_std,
        on_corrupt=on_corrupt, borrow_buffers=True, decode=decode, fast_idct=fast_idct,
    )
