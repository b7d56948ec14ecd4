"""Top-1 / top-5 accuracy over a validation loader, every image counted exactly once across ranks.

The val loader gives each rank a disjoint part of the split with no padding (`Loader.num_samples`
is exact), so summing the per-rank hit counts and image counts with one all-reduce gives the
accuracy over the whole split: no image dropped, none counted twice.

Ten-crop batches ([B, 10, 3, H, W]: four corners + centre, each also flipped) are scored by
averaging the ten softmax distributions per image, as in the paper.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from alexnet_fast.model.distributed import all_reduce_sum


@dataclass(frozen=True)
class EvalResult:
    top1: float
    top5: float
    images: int

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "images": self.images}


def class_scores(model: nn.Module, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """[B, C] scores: softmax probabilities (averaged over the crops for [B, n, 3, H, W] input)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if images.ndim == 5:
        batch, crops = images.shape[:2]
        logits = model(images.flatten(0, 1).contiguous(memory_format=memory_format))
        return logits.float().softmax(dim=1).view(batch, crops, -1).mean(dim=1)
    return model(images.contiguous(memory_format=memory_format)).float().softmax(dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
             channels_last: bool = False) -> EvalResult:
    """Accuracy of `model` (unwrapped: no DDP collectives, so ranks may see unequal batch counts)
    over `batches`, summed over every rank. Counts stay on the device until the end: one sync."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    hits1 = torch.zeros((), dtype=torch.int64, device=device)
    hits5 = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True).long()
        with autocast:
            scores = class_scores(model, images, channels_last)
        k = min(5, scores.shape[1])
        hit = scores.topk(k, dim=1).indices == labels[:, None]
        hits1 += hit[:, 0].sum()
        hits5 += hit.any(dim=1).sum()
        seen += labels.numel()
    counts = all_reduce_sum(torch.stack([hits1, hits5, seen])).tolist()
    model.train(was_training)
    images_total = int(counts[2])
    if images_total == 0:
        return EvalResult(0.0, 0.0, 0)
    return EvalResult(counts[0] / images_total, counts[1] / images_total, images_total)
