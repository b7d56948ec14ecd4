"""Training AlexNet, top to bottom: set up the ranks, load the data, build the model and optimizer,
resume, then `train_one_epoch` / `evaluate` / checkpoint until done.

    run_training(cfg)   # launches --gpus N / --nproc N workers itself, or joins an outer torchrun

Speed rules on the GPU: bf16 autocast, channels-last, cudnn.benchmark, optional torch.compile,
and no host sync inside a step — the loss is accumulated on the device and read (`.item()`)
only every `log_every` steps. The price: a NaN/inf loss is noticed at the next log point, not at
once. The step it first appeared is recorded on the device, the run stops naming it, and no
checkpoint is written after it, so RUN/last.pt is the last good state.

Preemption: SIGTERM/SIGINT set a flag; the ranks agree on it at the next step (or the next
`STOP_CHECK_EVERY_GPU` steps on a GPU, where agreeing costs a sync), write RUN/last.pt and exit 0.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_fast.model import checkpoint as ckpt
from alexnet_fast.model import distributed as D
from alexnet_fast.model.alexnet import build_model
from alexnet_fast.model.config import TrainConfig, format_config, save_config
from alexnet_fast.model.evaluate import EvalResult, evaluate
from alexnet_fast.model.optim import make_optimizer, make_schedulers
from alexnet_fast.model.runlog import RunLog, write_curves

STOP_CHECK_EVERY_GPU = 10   # steps between the ranks' agreement on a stop request when it costs a sync


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss, unusable data); the message is one line."""


class Outcome(str, Enum):
    COMPLETED = "completed"          # every epoch ran
    MAX_STEPS = "max_steps"          # --max-steps reached
    STOPPED = "stopped"              # SIGTERM/SIGINT: checkpoint written, exit 0


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""
    epoch: int = 0                   # the epoch in progress (or the next one to start)
    step: int = 0                    # optimizer steps taken in the whole run
    step_in_epoch: int = 0           # batches of `epoch` already trained on (to resume mid-epoch)
    best_top1: float = -1.0


@dataclass
class Engine:
    """Everything one optimizer step needs."""
    model: nn.Module                 # DDP- and/or compile-wrapped network in train mode
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler     # enabled only for fp16
    step_scheduler: torch.optim.lr_scheduler.LRScheduler | None   # warm-up/cosine/step: per step
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    label_smoothing: float = 0.0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class StopFlag:
    """Set by SIGTERM/SIGINT; read by the loop between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put back the handlers `install` replaced. Left installed, a flag-setting SIGTERM handler
        outlives the run in the caller's process and is inherited by every process it forks later
        (a multiprocessing pool then can no longer terminate its workers)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


# --------------------------------------------------------------------------------------------
# one step, one epoch
# --------------------------------------------------------------------------------------------
def train_step(engine: Engine, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward, backward, optimizer step. Returns the loss as a device tensor (no host sync)."""
    memory_format = torch.channels_last if engine.channels_last else torch.contiguous_format
    images = images.to(engine.device, non_blocking=True).contiguous(memory_format=memory_format)
    labels = labels.to(engine.device, non_blocking=True).long()
    autocast = (torch.autocast(engine.device.type, dtype=engine.autocast_dtype)
                if engine.autocast_dtype is not None else contextlib.nullcontext())
    with autocast:
        logits = engine.model(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=engine.label_smoothing)
    engine.optimizer.zero_grad(set_to_none=True)
    engine.scaler.scale(loss).backward()
    engine.scaler.step(engine.optimizer)
    engine.scaler.update()
    if engine.step_scheduler is not None:
        engine.step_scheduler.step()
    return loss.detach()


@dataclass
class LoopHooks:
    """What the epoch loop calls out to; all optional so tests can drive it with plain tensors."""
    log: Callable[[dict], None] = lambda record: None
    checkpoint: Callable[[], None] = lambda: None
    stop_requested: Callable[[], bool] = lambda: False
    progress: Any = None             # a tqdm bar (rank 0) or None


@dataclass
class EpochResult:
    outcome: Outcome
    mean_loss: float
    images: int                      # images this rank trained on in this call
    seconds: float
    losses: list[float] = field(default_factory=list)   # the logged losses (one per log point)


def train_one_epoch(engine: Engine, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    state: TrainState, *, world_size: int = 1, max_steps: int = 0, log_every: int = 50,
                    ckpt_every: int = 0, stop_check_every: int = 1,
                    hooks: LoopHooks | None = None) -> EpochResult:
    """Train on `batches` (any iterable of (images, labels)): the rest of epoch `state.epoch`,
    from batch `state.step_in_epoch` on (a resumed epoch: the loader was positioned there with
    `resume`). Updates `state` as it goes."""
    hooks = hooks or LoopHooks()
    engine.model.train()
    device = engine.device
    # Device-side accumulators: read only at log points.
    loss_sum = torch.zeros((), device=device)
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    device_step = torch.full((), state.step, dtype=torch.int64, device=device)
    epoch_loss_sum, epoch_steps, images_seen, logged = 0.0, 0, 0, []
    window_steps, window_images, window_start = 0, 0, time.perf_counter()
    start = window_start
    outcome = Outcome.COMPLETED

    for index, (images, labels) in enumerate(batches, start=state.step_in_epoch):
        loss = train_step(engine, images, labels)
        state.step += 1
        state.step_in_epoch = index + 1
        device_step += 1
        loss_sum += loss
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), device_step, first_bad_step)
        window_steps += 1
        window_images += labels.shape[0]
        images_seen += labels.shape[0]
        if hooks.progress is not None:
            hooks.progress.update(1)

        at_end = bool(max_steps) and state.step >= max_steps
        if state.step % log_every == 0 or at_end:
            _raise_if_bad(first_bad_step)           # a host sync: once per log interval
            window_loss = D.all_reduce_sum(loss_sum.clone()).item() / world_size
            elapsed = time.perf_counter() - window_start
            record = {"step": state.step, "epoch": state.epoch, "loss": window_loss / window_steps,
                      "lr": engine.lr, "img_per_s": window_images * world_size / max(elapsed, 1e-9)}
            hooks.log(record)
            logged.append(record["loss"])
            epoch_loss_sum += window_loss
            epoch_steps += window_steps
            loss_sum.zero_()
            window_steps, window_images, window_start = 0, 0, time.perf_counter()

        if ckpt_every and state.step % ckpt_every == 0 and not at_end:
            _raise_if_bad(first_bad_step)
            hooks.checkpoint()
        if at_end:
            outcome = Outcome.MAX_STEPS
            break
        if state.step % stop_check_every == 0 and _agree(hooks.stop_requested(), device):
            outcome = Outcome.STOPPED
            break

    if window_steps:                 # the tail after the last log point
        totals = D.all_reduce_sum(loss_sum.clone())
        epoch_loss_sum += totals.item() / world_size
        epoch_steps += window_steps
    _raise_if_bad(first_bad_step)
    if outcome is Outcome.COMPLETED:
        state.epoch += 1
        state.step_in_epoch = 0
    return EpochResult(outcome, epoch_loss_sum / max(epoch_steps, 1), images_seen,
                       time.perf_counter() - start, logged)


def _raise_if_bad(first_bad_step: torch.Tensor) -> None:
    """Stop the run if any rank saw a non-finite loss; name the earliest such step. Collective."""
    big = 1 << 62
    # max over ranks of (big - step) is the earliest bad step; 0 means none
    flag = torch.where(first_bad_step >= 0, big - first_bad_step, torch.zeros_like(first_bad_step))
    if D.dist.is_initialized():
        D.dist.all_reduce(flag, op=D.dist.ReduceOp.MAX)
    worst = int(flag.item())
    if worst:
        raise TrainingError(f"loss became NaN/inf at step {big - worst}; stopped, and nothing from that "
                            f"step on was saved (RUN/last.pt, if any, is older)")


def _agree(requested: bool, device: torch.device) -> bool:
    """True on every rank if any rank was asked to stop (so all stop at the same step)."""
    if not D.dist.is_initialized():
        return requested
    flag = torch.tensor([1 if requested else 0], device=device)
    D.dist.all_reduce(flag, op=D.dist.ReduceOp.MAX)
    return bool(flag.item())


# --------------------------------------------------------------------------------------------
# building a run: precision, data, optimizer, schedules, logging
# --------------------------------------------------------------------------------------------
def resolve_precision(precision: str, device_type: str) -> str:
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def image_dtype(device_type: str, precision: str) -> torch.dtype:
    """What the loader hands the model: on a GPU, images in the autocast dtype (half the bytes out
    of DALI and through the copy; autocast would cast them anyway); fp32 on the CPU."""
    return (AUTOCAST_DTYPES[precision] or torch.float32) if device_type == "cuda" else torch.float32


def load_data(cfg: TrainConfig, ctx: D.DistContext, per_rank_batch: int, precision: str):
    """The train loader and (if the shard set has a val split) the val loader of this rank."""
    from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader
    from alexnet_fast.pipeline.shardset import ShardSet

    on_gpu = ctx.device.type == "cuda"
    common = dict(
        data=cfg.data, kind=cfg.loader, batch_size=per_rank_batch, rank=ctx.rank,
        world_size=ctx.world_size, device="cuda" if on_gpu else "cpu", device_id=ctx.local_rank,
        seed=cfg.seed, workers=cfg.workers, channels_last=cfg.channels_last,
        dtype=image_dtype(ctx.device.type, precision),
        on_corrupt=cfg.on_corrupt, scale_by_std=cfg.scale_by_std,
        borrow_buffers=True,    # each batch is consumed by one step before the next is asked for
    )
    try:
        train = make_loader(LoaderSpec(split="train", lighting_std=cfg.lighting_std, **common))
        val = make_loader(LoaderSpec(split="val", **common)) if ShardSet.open(cfg.data).has_split("val") else None
    except ValueError as e:     # the loader's one-line complaints about the spec or the shard set
        raise TrainingError(str(e)) from None
    return train, val


def exclude_changed_samples(cfg: TrainConfig, ctx: D.DistContext, shard_set, loaders: list) -> None:
    """--verify-shards: hash the shards against the manifest (each rank a share of them, then all
    ranks learn every finding); samples whose bytes changed stop the run, or with --on-corrupt skip
    are left out of `loaders` and counted like corrupt ones."""
    from alexnet_fast.pipeline.integrity import check_shards

    shards = [s for split in ("train", "val") if shard_set.has_split(split) for s in shard_set.shards(split)]
    started = time.perf_counter()
    mine = check_shards(shards[ctx.rank::ctx.world_size], workers=cfg.workers)
    checks = [c for share in D.all_gather_objects(mine) for c in share if not c.matches]
    say(ctx, f"--verify-shards: {len(shards)} shards hashed in {time.perf_counter() - started:.1f} s, "
             f"{len(checks)} differ from the manifest")
    changed = [f"{c.shard.tar}:{key}" for c in checks for key in c.changed]
    if changed and cfg.on_corrupt == "error":
        first = next(c for c in checks if c.changed)
        raise TrainingError(f"{first.describe()}: re-make that shard, or pass --on-corrupt skip to leave such "
                            f"samples out")
    for check in checks:
        if ctx.is_main:
            print(f"alexnet-fast train: warning: {check.describe()}"
                  + (": left out (--on-corrupt skip)" if check.changed else ""), file=sys.stderr, flush=True)
    if changed:
        for loader in loaders:
            loader.exclude(changed)


def say(ctx: D.DistContext, message: str) -> None:
    """One line on stdout from rank 0 (tqdm-safe)."""
    if ctx.is_main:
        from tqdm import tqdm
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run_training(cfg: TrainConfig) -> dict:
    """Train per `cfg`: in this process, in N workers this starts, or as one rank of an outer
    torchrun. Returns rank 0's result {"outcome", "step", "epoch", "val": {...} | None, "error"}."""
    device = D.resolve_device(cfg.device)
    if D.under_launcher():
        return train_worker(cfg)
    workers = D.local_world_size(device, cfg.gpus, cfg.nproc)
    if workers <= 1:
        return train_worker(cfg)
    return D.launch(launched_worker, workers, (cfg,))[0]


def launched_worker(cfg: TrainConfig) -> dict:
    """train_worker in a process our own launcher spawned. After a stop by signal the launcher is
    shutting down and waits for the workers to exit, not for their return values (the normal
    hand-back would block until its 30 s kill timeout): so, checkpoint written, leave at once."""
    result = train_worker(cfg)
    if result.get("outcome") == Outcome.STOPPED.value:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return result


def train_worker(cfg: TrainConfig) -> dict:
    """Entry point of every rank. Errors the user can act on come back as {"error": one line}
    instead of a traceback (the launcher would print the worker's traceback otherwise)."""
    from alexnet_fast.pipeline.loaders import CorruptSampleError
    from alexnet_fast.pipeline.shardset import ShardSetError

    ctx = D.setup(D.resolve_device(cfg.device))
    try:
        return _train(cfg, ctx)
    except (TrainingError, ShardSetError, ckpt.CheckpointError, CorruptSampleError) as e:
        if ctx.is_distributed:
            # The other ranks may be waiting in a collective this rank will never join (a corrupt
            # sample or a failed checkpoint write happens on one rank only): under NCCL they would
            # sit out the 10-minute watchdog timeout. A worker that exits non-zero makes the
            # launcher (ours or torchrun) stop the whole group now; its error file carries the
            # message to the command, which prints it in one line (cmd_train.worker_failure).
            D.exit_failed(f"rank {ctx.rank}: {e}")
        return {"outcome": "failed", "error": str(e)}     # one process: the command prints it
    finally:
        D.teardown()


def _train(cfg: TrainConfig, ctx: D.DistContext) -> dict:
    from tqdm import tqdm

    from alexnet_fast.pipeline.shardset import ShardSet

    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % ctx.world_size:
        raise TrainingError(f"--batch-size {cfg.batch_size} is the global batch and must divide "
                            f"evenly over {ctx.world_size} ranks")
    per_rank_batch = cfg.batch_size // ctx.world_size
    precision = resolve_precision(cfg.precision, ctx.device.type)
    on_gpu = ctx.device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True        # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- data
    shards = ShardSet.open(cfg.data)
    num_classes = cfg.num_classes or shards.num_classes
    train_loader, val_loader = load_data(cfg, ctx, per_rank_batch, precision)
    if ctx.is_main:     # --on-corrupt skip went on past damaged shards: say which, once
        for note in train_loader.notes + (val_loader.notes if val_loader is not None else []):
            print(f"alexnet-fast train: warning: {note}", file=sys.stderr, flush=True)
    if cfg.verify_shards:
        exclude_changed_samples(cfg, ctx, shards, [loader for loader in (train_loader, val_loader) if loader is not None])
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise TrainingError(f"the train split has fewer than {per_rank_batch} images per rank: "
                            f"no full batch of --batch-size {cfg.batch_size}")

    # --- model, optimizer, schedules (same seed on every rank: identical initial weights)
    seed_everything(cfg.seed)
    model = build_model(cfg.arch, num_classes, cfg.dropout, cfg.init).to(ctx.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    step_scheduler, plateau = make_schedulers(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision == "fp16")
    # Each rank its own dropout masks.
    seed_everything(cfg.seed + ctx.rank)

    # --- resume
    state, resumed_at, loader_state = TrainState(), None, None
    if cfg.resume and ckpt.has_checkpoint(run_dir):
        state, loader_state = resume_from_checkpoint(cfg, ctx, run_dir, num_classes, model, optimizer,
                                                     step_scheduler, plateau, scaler)
        resumed_at = state.step
    elif cfg.resume:
        say(ctx, f"--resume: no checkpoint in {run_dir} yet, starting from scratch")

    ddp_model = D.wrap_ddp(model, ctx, cfg.grad_compression)
    train_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    engine = Engine(train_model, optimizer, scaler, step_scheduler, ctx.device,
                    AUTOCAST_DTYPES[precision], cfg.channels_last, cfg.label_smoothing)

    derived = {"world_size": ctx.world_size, "per_rank_batch": per_rank_batch,
               "effective_lr": cfg.effective_lr, "resolved_precision": precision,
               "num_classes_resolved": num_classes, "steps_per_epoch": steps_per_epoch,
               "normalize_resolved": "mean-std" if cfg.scale_by_std else "mean"}
    if ctx.is_main:
        save_config(cfg, run_dir, derived)
        say(ctx, "config:\n" + format_config(cfg, derived))
    log = RunLog(run_dir, ctx.is_main, resumed_at)
    stop = StopFlag()
    stop.install()

    def save(is_best: bool = False) -> None:
        rng = D.all_gather_objects(ckpt.rng_state())     # collective: every rank calls save()
        loaders = D.all_gather_objects(train_loader.state_dict())
        if not ctx.is_main:
            return
        try:
            ckpt.save_checkpoint({
                "model": D.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": {"step": step_scheduler.state_dict() if step_scheduler else None,
                              "plateau": plateau.state_dict() if plateau else None},
                "scaler": scaler.state_dict(), "epoch": state.epoch, "step": state.step,
                "step_in_epoch": state.step_in_epoch, "best_top1": state.best_top1, "rng": rng,
                "loader": loaders,
                "config": cfg.to_dict(), "arch": cfg.arch, "num_classes": num_classes,
                "classes": shards.classes, "world_size": ctx.world_size,
            }, run_dir, is_best=is_best)
        except OSError as e:    # disk full, quota: save_checkpoint removed its temp file, the old ones stand
            kept = (f"{ckpt.LAST} still holds the previous one" if (run_dir / ckpt.LAST).exists()
                    else "no checkpoint was written")
            raise TrainingError(f"cannot write a checkpoint to {run_dir} at step {state.step}: "
                                f"{e.strerror or e}; {kept}") from None

    def run_eval() -> EvalResult | None:
        if val_loader is None:
            return None
        return evaluate(D.unwrap(model), val_loader, ctx.device, AUTOCAST_DTYPES[precision], cfg.channels_last)

    result: dict = {"outcome": Outcome.COMPLETED.value, "val": None}
    hooks = LoopHooks(log=log.write, checkpoint=save, stop_requested=lambda: stop.requested)
    stop_check_every = STOP_CHECK_EVERY_GPU if (on_gpu and ctx.is_distributed) else 1
    try:
        while state.epoch < cfg.epochs and not (cfg.max_steps and state.step >= cfg.max_steps):
            epoch = state.epoch
            if state.step_in_epoch:     # resumed mid-epoch: the loader continues at the next batch
                restored = train_loader.resume(epoch, state.step_in_epoch, loader_state)
                say(ctx, f"epoch {epoch + 1} continues at batch {state.step_in_epoch + 1}: "
                         + ("loader state restored" if restored else "the loader replays the batches before it"))
            else:
                train_loader.set_epoch(epoch)
            hooks.progress = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, unit="step",
                                  desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not ctx.is_main,
                                  dynamic_ncols=True, leave=False)
            hooks.log = _log_and_show(log, hooks.progress)
            epoch_result = train_one_epoch(
                engine, train_loader, state, world_size=ctx.world_size, max_steps=cfg.max_steps,
                log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, stop_check_every=stop_check_every,
                hooks=hooks)
            hooks.progress.close()
            if epoch_result.outcome is Outcome.STOPPED:
                save()
                name = signal.Signals(stop.signal).name if stop.signal else "a stop request"
                say(ctx, f"stopped by {name} at step {state.step}: checkpoint written to {run_dir / ckpt.LAST}"
                         f" (continue with --resume)")
                result["outcome"] = Outcome.STOPPED.value
                break
            finished = epoch_result.outcome is Outcome.MAX_STEPS or state.epoch >= cfg.epochs
            val = run_eval() if (finished or state.epoch % cfg.eval_every == 0) else None
            record = {"step": state.step, "epoch": epoch, "loss": epoch_result.mean_loss, "lr": engine.lr,
                      "img_per_s": epoch_result.images * ctx.world_size / max(epoch_result.seconds, 1e-9)}
            skipped = getattr(train_loader, "num_skipped", 0)
            if skipped:     # --on-corrupt skip: say how many samples this rank left out so far
                record["skipped_samples"] = skipped
            if val is not None:
                record.update(val_top1=val.top1, val_top5=val.top5, val_images=val.images)
                result["val"] = val.as_dict()
            log.write(record)
            say(ctx, f"epoch {epoch + 1}: loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
                     f"{record['img_per_s']:.1f} img/s"
                     + (f"  ({skipped} sample(s) skipped so far on rank {ctx.rank})" if skipped else "")
                     + (f"  val top-1 {val.top1:.2%} top-5 {val.top5:.2%} ({val.images} images)" if val else ""))
            if plateau is not None and epoch_result.outcome is Outcome.COMPLETED:
                # the paper watched the validation error; without a val split, the training loss
                plateau.step(1.0 - val.top1 if val is not None else epoch_result.mean_loss)
            is_best = val is not None and val.top1 > state.best_top1
            if is_best:
                state.best_top1 = val.top1
            save(is_best)
            if ctx.is_main:
                write_curves([run_dir], run_dir / "curves.png")
            if epoch_result.outcome is Outcome.MAX_STEPS:
                result["outcome"] = Outcome.MAX_STEPS.value
                break
    finally:
        stop.uninstall()
        log.close()
    result.update(step=state.step, epoch=state.epoch)
    return result


def resume_from_checkpoint(cfg: TrainConfig, ctx: D.DistContext, run_dir: Path, num_classes: int,
                           model: nn.Module, optimizer, step_scheduler, plateau, scaler) -> tuple[TrainState, dict | None]:
    """Load the newest good checkpoint of `run_dir` into the run's objects; returns where the run
    stands and this rank's train loader state (None when the world size changed)."""
    def warn(message: str) -> None:     # a damaged last.pt: one plain line, from rank 0
        if ctx.is_main:
            print(f"alexnet-fast train: warning: {message}", file=sys.stderr, flush=True)

    saved, path = ckpt.load_checkpoint(run_dir, warn)
    if saved["arch"] != cfg.arch or saved["num_classes"] != num_classes:
        raise TrainingError(f"{path} holds {saved['arch']} with {saved['num_classes']} classes, "
                            f"not {cfg.arch} with {num_classes}")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if step_scheduler is not None and saved["scheduler"].get("step"):
        step_scheduler.load_state_dict(saved["scheduler"]["step"])
    if plateau is not None and saved["scheduler"].get("plateau"):
        plateau.load_state_dict(saved["scheduler"]["plateau"])
    scaler.load_state_dict(saved["scaler"])
    state = TrainState(saved["epoch"], saved["step"], saved["step_in_epoch"], saved["best_top1"])
    saved_loaders = saved.get("loader")
    loader_state = saved_loaders[ctx.rank] if saved_loaders and len(saved_loaders) == ctx.world_size else None
    rng = saved["rng"]
    if len(rng) == ctx.world_size:
        ckpt.set_rng_state(rng[ctx.rank])
    else:   # another world size: continue, but dropout masks cannot replay exactly
        seed_everything(cfg.seed + ctx.rank + 1_000_003 * state.step)
    say(ctx, f"resumed from {path}: epoch {state.epoch}, step {state.step}")
    return state, loader_state


def _log_and_show(log: RunLog, bar: Any) -> Callable[[dict], None]:
    def write(record: dict) -> None:
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}", refresh=False)
    return write
