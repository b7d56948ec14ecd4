"""The optimizer and the lr schedules of a run: SGD with momentum (optionally no weight decay on
biases, or a larger lr for them as Caffe's lr_mult 2), the paper's divide-by-10-on-plateau, and a
per-step warm-up + cosine/step factor (step every N epochs, or every N steps as Caffe's stepsize)."""
from __future__ import annotations

import math

import torch
from torch import nn

from alexnet_fast.model.config import TrainConfig


def make_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device | str = "cpu") -> torch.optim.SGD:
    """SGD with momentum; optionally no weight decay on biases/normalization weights (1-D tensors),
    which only shrinks them towards zero without regularizing anything useful. On a GPU torch's
    fused kernel: one launch updates every parameter instead of a few kernels per tensor."""
    if cfg.no_decay_bias_norm or cfg.bias_lr_mult != 1.0:
        weights = [p for p in model.parameters() if p.ndim > 1]
        biases = [p for p in model.parameters() if p.ndim <= 1]
        bias_decay = 0.0 if cfg.no_decay_bias_norm else cfg.weight_decay
        # the weights' group first: it is the one whose lr a run reports
        groups = [{"params": weights, "weight_decay": cfg.weight_decay},
                  {"params": biases, "weight_decay": bias_decay, "lr": cfg.effective_lr * cfg.bias_lr_mult}]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    fused = torch.device(device).type == "cuda"
    return torch.optim.SGD(groups, lr=cfg.effective_lr, momentum=cfg.momentum, fused=fused or None)


class StepLrFactor:
    """lr multiplier per optimizer step: linear warm-up, then cosine to 0 or /10 every step_epochs
    (every step_iters optimizer steps when that is set). A class (not a lambda) so LambdaLR's
    state_dict can hold it."""

    def __init__(self, schedule: str, steps_per_epoch: int, epochs: int, warmup_epochs: float,
                 step_epochs: int, step_iters: int = 0) -> None:
        self.schedule = schedule
        self.warmup = int(round(warmup_epochs * steps_per_epoch))
        self.total = max(1, epochs * steps_per_epoch)
        self.step_every = step_iters or max(1, step_epochs * steps_per_epoch)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "cosine":
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 0.1 ** (step // self.step_every)


def make_schedulers(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """(per-step scheduler or None, per-epoch plateau scheduler or None)."""
    if cfg.schedule == "plateau":
        # The paper: divide by 10 when the val error stops improving, at most `max_lr_drops` times.
        # min_lr is the lr after exactly that many drops, computed as the scheduler computes it
        # (old * 0.1 in floats), and eps=0, so a further drop changes nothing.
        # One floor per parameter group (biases may start at a multiple of the lr).
        floors = []
        for group in optimizer.param_groups:
            floor = group["lr"]
            for _ in range(cfg.max_lr_drops):
                floor *= 0.1
            floors.append(floor)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=cfg.plateau_patience, min_lr=floors, eps=0.0)
        return None, plateau
    factor = StepLrFactor(cfg.schedule, steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.step_epochs,
                          cfg.step_iters)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), None
