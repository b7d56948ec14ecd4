"""One entry point for every data loader the trainer, evaluator and profiler use.

    loader = make_loader(LoaderSpec(data="shards/imagenet", split="train", batch_size=128, ...))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # images: [B,3,227,227] on spec.device, labels: int64 [B]
            ...

`kind="dali"` is the DALI pipeline (GPU decode with device="cuda", its CPU twin with "cpu");
`kind="baseline"` is webdataset + PIL + torch DataLoader doing the same augmentation math.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Protocol

import torch


@dataclass(frozen=True)
class LoaderSpec:
    data: str                                   # shard set directory (has manifest.json)
    split: Literal["train", "val"] = "train"
    kind: Literal["dali", "baseline"] = "dali"
    batch_size: int = 128                       # per rank
    rank: int = 0
    world_size: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    device_id: int = 0                          # CUDA device index when device == "cuda"
    seed: int = 0
    workers: int = 2                            # DALI threads / DataLoader workers
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    crop: int = 227
    ten_crop: bool = False                      # val only: images [B,10,3,crop,crop]
    lighting_std: float = 0.1                   # PCA lighting alpha ~ N(0, lighting_std); 0 disables
    on_corrupt: Literal["error", "skip"] = "error"


class Loader(Protocol):
    num_samples: int                            # samples this rank sees per epoch (val: exact, no padding)

    def __len__(self) -> int: ...              # batches per epoch on this rank (same on every rank for train)

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def make_loader(spec: LoaderSpec) -> Loader:
    raise NotImplementedError("pipeline loaders are not written yet")
