"""Training AlexNet, top to bottom: set up the rank, load the data, build the model and optimizer,
resume, then `train_one_epoch` / `evaluate` / checkpoint until done.

    run_training(cfg)   # launches --gpus N / --nproc N workers itself, or joins an outer torchrun
    # the same from a shell, on every GPU of the node:
    #   alexnet-fast train --data shards/imagenet --out runs/paper

The step and the epoch loop are in model/loop.py, the rules shared with eval and profile
(precision, device flags, the loader spec) in model/runtime.py, what a checkpoint holds in
model/checkpoint.py. Preemption: SIGTERM/SIGINT set a flag; the ranks agree on it within a few
steps (model/loop.py StopAgreement), write RUN/last.pt and exit 0.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from alexnet_fast.model import checkpoint as ckpt
from alexnet_fast.model import distributed as D
from alexnet_fast.model.background import Background, Redrawer
from alexnet_fast.model.boundary import EpochBoundary
from alexnet_fast.model.config import TrainConfig, format_config, save_config
from alexnet_fast.model.errors import TrainingError
from alexnet_fast.model.evaluate import EvalResult, evaluate
from alexnet_fast.model.loop import (STOP_CHECK_EVERY_GPU, Engine, EpochResult, LoopHooks, Outcome, StopAgreement,
                                     StopFlag, TrainState, train_one_epoch)
from alexnet_fast.model.optim import make_optimizer, make_schedulers
from alexnet_fast.model.runlog import RunLog, write_curves
from alexnet_fast.model.runtime import (loader_spec, loader_workers, place_network, resolve_precision, seed_everything,
                                        set_backend_flags)
from alexnet_fast.pipeline.loaders import make_loader
from alexnet_fast.pipeline.shardset import ShardSet


def run_training(cfg: TrainConfig) -> dict:
    """Train per `cfg`: in this process, in N workers this starts, or as one rank of an outer
    torchrun. Returns rank 0's result {"outcome", "step", "epoch", "val": {...} | None}; a user
    error raises (one process) or ends the run with its one line (several)."""
    return D.run_ranks(train_rank, cfg, device=cfg.device, gpus=cfg.gpus, nproc=cfg.nproc)


def train_rank(cfg: TrainConfig, ctx: D.DistContext) -> dict:
    """The whole run, as one rank sees it."""
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    per_rank_batch = per_rank_batch_size(cfg.batch_size, ctx.world_size)
    precision = resolve_precision(cfg.precision, ctx.device.type)
    set_backend_flags(ctx.device)

    # --- data: the manifest is read once; both loaders share it
    shards = ShardSet.open(cfg.data)
    num_classes = cfg.num_classes or shards.num_classes
    train_loader, val_loader = load_data(cfg, ctx, shards, per_rank_batch, precision)
    loaders = [loader for loader in (train_loader, val_loader) if loader is not None]
    for note in (note for loader in loaders for note in loader.notes):   # --on-corrupt skip went on past damage
        warn(ctx, note)
    if cfg.verify_shards:
        exclude_changed_samples(cfg, ctx, shards, loaders)
    steps_per_epoch = len(train_loader)

    # --- model, optimizer, schedules (the same seed on every rank: identical initial weights)
    seed_everything(cfg.seed)
    model = place_network(cfg.arch, num_classes, ctx.device, channels_last=cfg.channels_last,
                          dropout=cfg.dropout, init=cfg.init)
    optimizer = make_optimizer(cfg, model, ctx.device)
    objects = ckpt.RunObjects(model, optimizer, *make_schedulers(cfg, optimizer, steps_per_epoch),
                              scaler=torch.amp.GradScaler(ctx.device.type, enabled=precision == "fp16"))
    identity = ckpt.RunIdentity(cfg.to_dict(), cfg.arch, num_classes, shards.classes, ctx.world_size)
    seed_everything(cfg.seed + ctx.rank)     # each rank its own dropout masks

    # --- resume
    state, loader_state, resumed_at = resume_or_start(cfg, ctx, objects, identity)
    ddp_model = D.wrap_ddp(model, ctx, cfg.grad_compression)
    engine = Engine(torch.compile(ddp_model) if cfg.compile else ddp_model, optimizer, objects.scaler,
                    objects.step_scheduler, ctx.device, precision, cfg.channels_last, cfg.label_smoothing)

    derived = {"world_size": ctx.world_size, "per_rank_batch": per_rank_batch,
               "effective_lr": cfg.effective_lr, "resolved_precision": precision,
               "num_classes_resolved": num_classes, "steps_per_epoch": steps_per_epoch,
               "normalize_resolved": "mean-std" if cfg.scale_by_std else "mean"}
    if ctx.is_main:
        save_config(cfg, run_dir, derived)
        say(ctx, f"config: every value as this run uses it ({run_dir / 'config.json'} has them as given too)\n"
                 + format_config(cfg, shown_resolved(cfg, ctx, derived)))

    # --- the epochs
    checkpoints = Checkpointer(ctx, run_dir, objects, identity, train_loader)
    log = RunLog(run_dir, ctx.is_main, resumed_at)
    stop = StopFlag()
    stop.install()
    # Agreeing on a stop is a collective; on a GPU it is posted every few steps and read a check
    # later, so it never makes the host wait (model/loop.py StopAgreement).
    agreement = StopAgreement(ctx.device, STOP_CHECK_EVERY_GPU if ctx.device.type == "cuda" else 1)
    hooks = LoopHooks(checkpoint=lambda: checkpoints.save(state), stop_requested=lambda: stop.requested,
                      stop_agreement=agreement)
    result: dict = {"outcome": Outcome.COMPLETED.value, "val": None}
    started, first_step = time.perf_counter(), state.step
    boundary = EpochBoundary()      # the stall between two epochs, by part (model/boundary.py)
    curves = Redrawer(lambda: write_curves([run_dir], run_dir / "curves.png"), "curves") if ctx.is_main else None
    try:
        while state.epoch < cfg.epochs and not (cfg.max_steps and state.step >= cfg.max_steps):
            epoch = state.epoch
            with boundary.part("pipeline"):
                position_loader(ctx, train_loader, state, loader_state)
            epoch_result = run_epoch(cfg, ctx, engine, train_loader, state, hooks, log, steps_per_epoch)
            stall_before = {**boundary.fields(epoch_result), **checkpoints.timings()}
            boundary.begin(epoch_result.last_step_at)
            if epoch_result.outcome is Outcome.STOPPED:
                checkpoints.save(state)
                checkpoints.finish()
                name = signal.Signals(stop.signal).name if stop.signal else "a stop request"
                say(ctx, f"stopped by {name} at step {state.step}: checkpoint written to {run_dir / ckpt.LAST}"
                         f" (continue with --resume)")
                result["outcome"] = Outcome.STOPPED.value
                break
            finished = epoch_result.outcome is Outcome.MAX_STEPS or state.epoch >= cfg.epochs
            if not finished:        # the next epoch's pipeline builds while this boundary's work runs
                with boundary.part("pipeline"):
                    train_loader.prepare(state.epoch)
            with boundary.part("eval"):
                val = (evaluate_val(model, val_loader, ctx, precision, cfg.channels_last)
                       if finished or state.epoch % cfg.eval_every == 0 else None)
            end_epoch(ctx, epoch, epoch_result, val, engine, train_loader, state, objects, log, stall_before,
                      val_split=val_loader is not None)
            if val is not None:
                result["val"] = val.as_dict()
            is_best = val is not None and val.top1 > state.best_top1
            if is_best:
                state.best_top1 = val.top1
            with boundary.part("checkpoint"):
                checkpoints.save(state, is_best)
            if curves is not None:
                with boundary.part("plot"):
                    curves.request()         # drawn on a thread of its own: never blocks a step
            if epoch_result.outcome is Outcome.MAX_STEPS:
                result["outcome"] = Outcome.MAX_STEPS.value
                break
        checkpoints.finish()
    finally:
        stop.uninstall()
        log.close()
        if curves is not None:
            curves.flush()
            for error in curves.errors[:1]:
                warn(ctx, f"could not draw {run_dir / 'curves.png'}: {error}")
        with contextlib.suppress(Exception):    # a run that failed: still let a good write land whole
            checkpoints.finish()
    agreement.drain()
    say(ctx, run_summary(result["outcome"], state, state.step - first_step, cfg.batch_size,
                         time.perf_counter() - started, run_dir))
    if result["outcome"] == Outcome.STOPPED.value:
        D.leave_after_stop()
    result.update(step=state.step, epoch=state.epoch)
    return result


# --------------------------------------------------------------------------------------------
# the steps of the run, in the order it takes them
# --------------------------------------------------------------------------------------------
def per_rank_batch_size(global_batch: int, world_size: int) -> int:
    """--batch-size is the global batch (every command): each rank takes an equal share."""
    if global_batch % world_size:
        raise TrainingError(f"--batch-size {global_batch} is the global batch and must divide "
                            f"evenly over {world_size} ranks")
    return global_batch // world_size


def load_data(cfg: TrainConfig, ctx: D.DistContext, shards: ShardSet, per_rank_batch: int, precision: str):
    """The train loader and (if the shard set has a val split) the val loader of this rank."""
    def spec(split: str):
        return loader_spec(split, data=cfg.data, kind=cfg.loader, batch_size=per_rank_batch, ctx=ctx,
                           precision=precision, channels_last=cfg.channels_last, scale_by_std=cfg.scale_by_std,
                           on_corrupt=cfg.on_corrupt, workers=cfg.workers, seed=cfg.seed,
                           lighting_std=cfg.lighting_std, ten_crop=cfg.ten_crop and split == "val")
    try:
        train = make_loader(spec("train"), shards)
        val = make_loader(spec("val"), shards) if shards.has_split("val") else None
    except ValueError as e:     # the loader's one-line complaints about the spec or the shard set
        raise TrainingError(str(e)) from None
    if len(train) == 0:
        raise TrainingError(f"the train split has fewer than {per_rank_batch} images per rank: "
                            f"no full batch of --batch-size {cfg.batch_size}")
    return train, val


def exclude_changed_samples(cfg: TrainConfig, ctx: D.DistContext, shard_set: ShardSet, loaders: list) -> None:
    """--verify-shards: hash the shards against the manifest (each rank a share of them, then all
    ranks learn every finding); samples whose bytes changed stop the run, or with --on-corrupt skip
    are left out of `loaders` and counted like corrupt ones."""
    from alexnet_fast.pipeline.integrity import check_shards

    shards = [s for split in ("train", "val") if shard_set.has_split(split) for s in shard_set.shards(split)]
    started = time.perf_counter()
    mine = check_shards(shards[ctx.rank::ctx.world_size], workers=loader_workers(cfg.workers, ctx))
    checks = [c for share in D.all_gather_objects(mine) for c in share if not c.matches]
    say(ctx, f"--verify-shards: {len(shards)} shards hashed in {time.perf_counter() - started:.1f} s, "
             f"{len(checks)} differ from the manifest")
    changed = [f"{c.shard.tar}:{key}" for c in checks for key in c.changed]
    if changed and cfg.on_corrupt == "error":
        first = next(c for c in checks if c.changed)
        raise TrainingError(f"{first.describe()}: re-make that shard, or pass --on-corrupt skip to leave such "
                            f"samples out")
    for check in checks:
        warn(ctx, check.describe() + (": left out (--on-corrupt skip)" if check.changed else ""))
    if changed:
        for loader in loaders:
            loader.exclude(changed)


def resume_or_start(cfg: TrainConfig, ctx: D.DistContext, objects: ckpt.RunObjects,
                    identity: ckpt.RunIdentity) -> tuple[TrainState, dict | None, int | None]:
    """With --resume and a checkpoint in the run directory: load it into `objects` (its newest good
    one: last.pt, else last.prev.pt with a warning) and return where the run stands, this rank's
    train loader state and the step it resumed at. Otherwise a fresh start (resumed at None)."""
    run_dir = Path(cfg.out)
    if not cfg.resume:
        return TrainState(), None, None
    if not ckpt.has_checkpoint(run_dir):
        say(ctx, f"--resume: no checkpoint in {run_dir} yet, starting from scratch")
        return TrainState(), None, None
    saved, path = ckpt.load_checkpoint(run_dir, lambda message: warn(ctx, message))
    restored = ckpt.restore(saved, objects, identity, ctx.rank, path)
    if restored.rng is not None:
        ckpt.set_rng_state(restored.rng)
    else:   # another world size: continue, but dropout masks cannot replay exactly
        seed_everything(cfg.seed + ctx.rank + 1_000_003 * restored.state.step)
    say(ctx, f"resumed from {path}: epoch {restored.state.epoch}, step {restored.state.step}")
    return restored.state, restored.loader, restored.state.step


def position_loader(ctx: D.DistContext, loader, state: TrainState, loader_state: dict | None) -> None:
    """Point the train loader at the batch the run continues with: the start of `state.epoch`, or
    (resumed mid-epoch) the batch after the last one trained on."""
    if not state.step_in_epoch:
        loader.set_epoch(state.epoch)
        return
    restored = loader.resume(state.epoch, state.step_in_epoch, loader_state)
    say(ctx, f"epoch {state.epoch + 1} continues at batch {state.step_in_epoch + 1}: "
             + ("loader state restored" if restored else "the loader replays the batches before it"))


def run_epoch(cfg: TrainConfig, ctx: D.DistContext, engine: Engine, loader, state: TrainState, hooks: LoopHooks,
              log: RunLog, steps_per_epoch: int) -> EpochResult:
    """The rest of epoch `state.epoch`, with a progress bar (img/s, ETA) on rank 0."""
    from tqdm import tqdm

    hooks.progress = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, unit="step",
                          desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not ctx.is_main,
                          dynamic_ncols=True, leave=False)
    hooks.log = _log_and_show(log, hooks.progress)
    try:
        return train_one_epoch(engine, loader, state, world_size=ctx.world_size, max_steps=cfg.max_steps,
                               log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, hooks=hooks)
    finally:
        hooks.progress.close()


def evaluate_val(model: torch.nn.Module, val_loader, ctx: D.DistContext, precision: str,
                 channels_last: bool) -> EvalResult | None:
    """The unwrapped network over the whole val split (every image once across ranks)."""
    if val_loader is None:
        return None
    return evaluate(model, val_loader, ctx.device, precision, channels_last)


def end_epoch(ctx: D.DistContext, epoch: int, epoch_result: EpochResult, val: EvalResult | None, engine: Engine,
              train_loader, state: TrainState, objects: ckpt.RunObjects, log: RunLog,
              stall_before: dict[str, float], val_split: bool) -> None:
    """The epoch's record (metrics.jsonl and one line), and the plateau schedule's step.
    `stall_before`: the boundary before the epoch's first step (model/boundary.py); `val_split`:
    whether the run has a val split (evaluated every --eval-every epochs)."""
    record = {"step": state.step, "epoch": epoch, "loss": epoch_result.mean_loss, "lr": engine.lr,
              "img_per_s": epoch_result.images * ctx.world_size / max(epoch_result.seconds, 1e-9), **stall_before}
    skipped = getattr(train_loader, "num_skipped", 0)
    if skipped:     # --on-corrupt skip: say how many samples this rank left out so far
        record["skipped_samples"] = skipped
    if val is not None:
        record.update(val_top1=val.top1, val_top5=val.top5, val_images=val.images)
    log.write(record)
    say(ctx, f"epoch {epoch + 1}: loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
             f"{record['img_per_s']:.1f} img/s"
             + (f"  ({skipped} sample(s) skipped so far on rank {ctx.rank})" if skipped else "")
             + (f"  val top-1 {val.top1:.2%} top-5 {val.top5:.2%} ({val.images} images)" if val else ""))
    if objects.plateau is not None and epoch_result.outcome is Outcome.COMPLETED:
        # The paper watched the validation error: step on the epochs that measured it (patience then
        # counts evaluations), never on the training loss in between (another scale: a loss of ~2
        # after a val error of 0.4 would read as a plateau). Without a val split, the training loss.
        if val is not None:
            objects.plateau.step(1.0 - val.top1)
        elif not val_split:
            objects.plateau.step(epoch_result.mean_loss)


class Checkpointer:
    """Writes the run's checkpoints without making the GPUs wait for the disk.

    `save` is collective: every rank's RNG and loader states are gathered at the step the
    checkpoint belongs to, and rank 0 copies the whole state to host memory (`ckpt.to_host`: the
    only part on the critical path). Writing, fsync and the renames then run on a background
    thread while training goes on (model/background.py); at most one write is in flight, so the
    next save, and the end of the run, wait for the previous one. Crash safety is the atomic
    save's (temp file, fsync, rename): a kill at any point of a background write leaves the
    previous last.pt (or last.prev.pt) whole. A write that fails (disk full) is raised by the next
    save or by `finish`, as the same one-line TrainingError a synchronous write gave."""

    def __init__(self, ctx: D.DistContext, run_dir: Path, objects: ckpt.RunObjects, identity: ckpt.RunIdentity,
                 train_loader) -> None:
        self.ctx, self.run_dir, self.objects, self.identity = ctx, run_dir, objects, identity
        self.train_loader = train_loader
        self.writer = Background("checkpoint writer")
        self._written_s: list[float] = []        # durations of the background writes finished so far
        self._waited_s: list[float] = []         # how long saves waited for the write before them
        self._snapshot: dict | None = None      # the last host copy: its memory is reused by the next one

    def save(self, state: TrainState, is_best: bool = False) -> None:
        rng = D.all_gather_objects(ckpt.rng_state())
        loaders = D.all_gather_objects(self.train_loader.state_dict())
        if not self.ctx.is_main:
            return
        # the previous write reads the host copy about to be overwritten (done long ago, normally)
        self._waited_s.append(self.writer.wait())
        snapshot = self._snapshot = ckpt.to_host(ckpt.capture(self.objects, state, self.identity, rng, loaders),
                                                 reuse=self._snapshot)
        step = state.step
        self.writer.submit(lambda: self._write(snapshot, step, is_best))

    def finish(self) -> None:
        """Wait for the write in flight: on return the last checkpoint is on disk (or its error raised)."""
        self.writer.wait()

    def timings(self) -> dict[str, float]:
        """For the epoch record, since the last call: `checkpoint_write_s`, the background writes
        that finished; `checkpoint_wait_s`, how long saves waited for a write still in flight (the
        part of the writing that was not overlapped with training)."""
        written, waited = sum(self._written_s), sum(self._waited_s)
        self._written_s, self._waited_s = [], []
        return {"checkpoint_write_s": written, "checkpoint_wait_s": waited} if written else {}

    def _write(self, snapshot: dict, step: int, is_best: bool) -> None:
        started = time.perf_counter()
        try:
            ckpt.save_checkpoint(snapshot, self.run_dir, is_best=is_best)
        except OSError as e:    # disk full, quota: save_checkpoint removed its temp file, the old ones stand
            kept = (f"{ckpt.LAST} still holds the previous one" if (self.run_dir / ckpt.LAST).exists()
                    else "no checkpoint was written")
            raise TrainingError(f"cannot write a checkpoint to {self.run_dir} at step {step}: "
                                f"{e.strerror or e}; {kept}") from None
        self._written_s.append(time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def shown_resolved(cfg: TrainConfig, ctx: D.DistContext, derived: dict[str, Any]) -> dict[str, Any]:
    """What the printed config shows in place of the fields whose value is a placeholder ("0 = as
    many as...", "auto"), then the derived values the run adds."""
    from alexnet_fast.model.alexnet import resolve_init

    return {"num_classes": derived["num_classes_resolved"], "init": resolve_init(cfg.arch, cfg.init),
            "workers": loader_workers(cfg.workers, ctx), "normalize": derived["normalize_resolved"],
            "device": ctx.device.type, "precision": derived["resolved_precision"],
            **{k: derived[k] for k in ("world_size", "per_rank_batch", "effective_lr", "steps_per_epoch")}}


def run_summary(outcome: str, state: TrainState, steps: int, batch_size: int, seconds: float, run_dir: Path) -> str:
    """The run's last line: how it ended, what this invocation did, the best val top-1 so far and
    where the checkpoints are."""
    ended = {Outcome.COMPLETED.value: "completed", Outcome.MAX_STEPS.value: "reached --max-steps",
             Outcome.STOPPED.value: "stopped"}.get(outcome, outcome)
    best = f"best val top-1 {state.best_top1:.1%}" if state.best_top1 >= 0 else "no val evaluation"
    kept = ", ".join(name for name in (ckpt.LAST, ckpt.BEST) if (run_dir / name).exists()) or "none"
    return (f"train {ended}: {steps} steps ({steps * batch_size} images) in {seconds:.0f} s, "
            f"{steps * batch_size / max(seconds, 1e-9):.1f} img/s overall; step {state.step}, epoch {state.epoch}; "
            f"{best}; checkpoints in {run_dir}: {kept}")


def say(ctx: D.DistContext, message: str) -> None:
    """One line on stdout from rank 0 (tqdm-safe)."""
    if ctx.is_main:
        from tqdm import tqdm
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def warn(ctx: D.DistContext, message: str) -> None:
    """One warning line on stderr from rank 0."""
    if ctx.is_main:
        print(f"alexnet-fast train: warning: {message}", file=sys.stderr, flush=True)


def _log_and_show(log: RunLog, bar: Any) -> Callable[[dict], None]:
    def write(record: dict) -> None:
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}", refresh=False)
    return write
