"""Top-1 / top-5 accuracy over a validation loader, every image counted exactly once across ranks.

The val loader gives each rank a disjoint part of the split with no padding (`Loader.num_samples`
is exact), so summing the per-rank hit counts and image counts with one all-reduce gives the
accuracy over the whole split: no image dropped, none counted twice.

Ten-crop batches ([B, 10, 3, H, W]: four corners + centre, each also flipped) are scored by
averaging the ten softmax distributions per image, as in the paper.

`run_evaluation(EvalConfig(...))` scores a checkpoint the way `alexnet-fast eval` does, over the
same ranks as training: one process per GPU (or `nproc` CPU processes over gloo) started through
model.distributed's launcher, or the ranks of an outer torchrun. Each rank reads its own part of
the val split and `evaluate` sums the counts, so every rank ends with the whole split's accuracy.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from alexnet_fast.model import distributed as D
from alexnet_fast.model.errors import EvalError
from alexnet_fast.model.runtime import DECODE_HELP, DEVICES, FAST_IDCT_HELP, autocast, memory_format
from alexnet_fast.pipeline.loader_spec import DECODE_PLACEMENTS, LOADER_KINDS, ON_CORRUPT_MODES


@dataclass(frozen=True)
class EvalResult:
    top1: float
    top5: float
    images: int

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "images": self.images}


def class_scores(model: nn.Module, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """[B, C] scores: softmax probabilities (averaged over the crops for [B, n, 3, H, W] input)."""
    layout = memory_format(channels_last)
    if images.ndim == 5:
        batch, crops = images.shape[:2]
        logits = model(images.flatten(0, 1).contiguous(memory_format=layout))
        return logits.float().softmax(dim=1).view(batch, crops, -1).mean(dim=1)
    return model(images.contiguous(memory_format=layout)).float().softmax(dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | str = "cpu", precision: str = "fp32",
             channels_last: bool = False) -> EvalResult:
    """Accuracy of `model` (unwrapped: no DDP collectives, so ranks may see unequal batch counts)
    over `batches`, summed over every rank. Counts stay on the device until the end: one sync.

    Collective: every rank must call it. A rank whose batches fail (a corrupt sample) still joins
    the final all-reduce, flagging the failure, so the other ranks raise the same error instead of
    waiting for it forever."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    hits1 = torch.zeros((), dtype=torch.int64, device=device)
    hits5 = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    failure: Exception | None = None
    try:
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True).long()
            with autocast(device, precision):
                scores = class_scores(model, images, channels_last)
            k = min(5, scores.shape[1])
            hit = scores.topk(k, dim=1).indices == labels[:, None]
            hits1 += hit[:, 0].sum()
            hits5 += hit.any(dim=1).sum()
            seen += labels.numel()
    except Exception as e:
        if not D.dist.is_initialized():
            raise
        failure = e
    finally:
        model.train(was_training)
    failed = torch.tensor(int(failure is not None), dtype=torch.int64, device=device)
    counts = D.all_reduce_sum(torch.stack([hits1, hits5, seen, failed])).tolist()
    if counts[3]:
        raise _first_failure(failure)
    images_total = int(counts[2])
    if images_total == 0:
        return EvalResult(0.0, 0.0, 0)
    return EvalResult(counts[0] / images_total, counts[1] / images_total, images_total)


def _first_failure(own: Exception | None) -> Exception:
    """This rank's own error, or (on a rank whose batches were fine) the lowest failing rank's,
    sent over as a pickle and tagged with that rank (`origin_rank`, which the launcher's one-line
    report names). Collective: called by every rank once the all-reduce flagged a failure."""
    def portable(error: Exception) -> Exception:
        try:
            return pickle.loads(pickle.dumps(error))
        except Exception:       # an exception that cannot travel: its type and message do
            return RuntimeError(f"{type(error).__name__}: {error}")

    errors = D.all_gather_objects(None if own is None else portable(own))
    if own is not None:
        return own
    origin, error = next((rank, e) for rank, e in enumerate(errors) if e is not None)
    error.origin_rank = origin
    return error


# --------------------------------------------------------------------------------------------
# a checkpoint over the whole val split, on every rank (`alexnet-fast eval`)
# --------------------------------------------------------------------------------------------
def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class EvalConfig:
    """What `alexnet-fast eval` runs; every field is one of its flags (tools/flags.py)."""
    data: str = _f("", "shard set directory: its val split is scored")
    checkpoint: str = _f("", "a checkpoint file, or a run directory (its newest good checkpoint)")
    ten_crop: bool = _f(False, "average the softmax of 4 corner + centre crops and their flips (the paper's test)")
    batch_size: int = _f(64, "GLOBAL batch: images per step over all ranks, split evenly (must divide by "
                             "the number of ranks; accuracy does not depend on it)", min=1)
    device: str = _f("auto", "auto = cuda when a GPU is visible", choices=DEVICES)
    loader: str = _f("dali", "data loader", choices=LOADER_KINDS)
    workers: int = _f(0, "loader threads/workers per rank; 0 = the cores per rank (pipeline default)", min=0)
    decode: str = _f("gpu", DECODE_HELP, choices=DECODE_PLACEMENTS)
    fast_idct: bool = _f(False, FAST_IDCT_HELP)
    gpus: int = _f(0, "GPUs (one process each); 0 = every visible GPU", min=0)
    nproc: int = _f(1, "CPU mode: processes (gloo)", min=1)
    on_corrupt: str = _f("error", "a val image that does not decode: stop naming it, or skip it (and say how "
                                  "many)", choices=ON_CORRUPT_MODES)


@dataclass(frozen=True)
class EvalRun:
    """What rank 0 hands back: the whole split's accuracy."""
    result: EvalResult
    skipped: int = 0                # corrupt samples left out (on_corrupt="skip"), over every rank


def run_evaluation(cfg: EvalConfig) -> EvalRun:
    """Score cfg.checkpoint on the val split: in this process, in the workers this starts (one per
    GPU / `nproc` on the CPU), or as one rank of an outer torchrun. Returns rank 0's EvalRun (under
    an outer torchrun: this rank's, which holds the same all-reduced numbers)."""
    return D.run_ranks(evaluate_rank, cfg, device=cfg.device, gpus=cfg.gpus, nproc=cfg.nproc)


def val_loader_spec(cfg: EvalConfig, ctx: D.DistContext, scale_by_std: bool):
    """This rank's val loader spec: the trainer's rules (model/runtime.py loader_spec) for its
    precision and layout on this device, the checkpoint's input scaling."""
    from alexnet_fast.model.runtime import loader_spec, resolve_precision

    return loader_spec("val", data=cfg.data, kind=cfg.loader, batch_size=cfg.batch_size // ctx.world_size, ctx=ctx,
                       precision=resolve_precision("auto", ctx.device.type), channels_last=ctx.device.type == "cuda",
                       scale_by_std=scale_by_std, on_corrupt=cfg.on_corrupt, workers=cfg.workers,
                       ten_crop=cfg.ten_crop, decode=cfg.decode, fast_idct=cfg.fast_idct)


def evaluate_rank(cfg: EvalConfig, ctx: D.DistContext) -> EvalRun:
    """This rank's part of the evaluation, with the trainer's rules: the val loader's rank split,
    the trainer's precision and image layout on a GPU, `evaluate`'s all-reduce."""
    from tqdm import tqdm

    from alexnet_fast.model import checkpoint as ckpt
    from alexnet_fast.model.config import input_scaled_by_std
    from alexnet_fast.model.runtime import place_network, resolve_precision, set_backend_flags
    from alexnet_fast.pipeline.loaders import make_loader

    state, _ = ckpt.load_checkpoint(cfg.checkpoint)
    on_gpu = ctx.device.type == "cuda"
    model = place_network(state["arch"], state["num_classes"], ctx.device, channels_last=on_gpu)
    model.load_state_dict(state["model"])
    # the input scaling it was trained with (checkpoints from before the option: mean-std)
    trained = state.get("config", {})
    scale_by_std = input_scaled_by_std(state["arch"], trained.get("init", "default"),
                                       trained.get("normalize", "mean-std"))
    del state                       # the optimizer state can be as large as the weights
    precision = resolve_precision("auto", ctx.device.type)
    set_backend_flags(ctx.device)   # one input shape throughout, as in training
    if cfg.batch_size % ctx.world_size:
        raise EvalError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over "
                        f"{ctx.world_size} ranks")
    try:
        val = make_loader(val_loader_spec(cfg, ctx, scale_by_std))
    except ValueError as e:         # the loader's one-line complaints about the spec or the shard set
        raise EvalError(str(e)) from None
    progress = tqdm(total=val.num_samples, unit="img", disable=not ctx.is_main, dynamic_ncols=True,
                    leave=False, desc=f"eval (rank 0 of {ctx.world_size})" if ctx.is_distributed else "eval")

    def counted(batches):
        for images, labels in batches:
            yield images, labels
            progress.update(labels.shape[0])

    try:
        result = evaluate(model, counted(val), ctx.device, precision, channels_last=on_gpu)
    finally:
        progress.close()
    skipped = D.all_reduce_sum(torch.tensor(getattr(val, "num_skipped", 0), device=ctx.device)).item()
    return EvalRun(result, skipped=int(skipped))
