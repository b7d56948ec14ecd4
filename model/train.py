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
from dataclasses import asdict, replace
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
from alexnet_fast.model.identity import DataIdentity, num_classes_mismatch, resume_refusal
from alexnet_fast.model.loop import (STOP_CHECK_EVERY_GPU, Engine, EpochResult, LoopHooks, Outcome, StopAgreement,
                                     StopFlag, TrainState, train_one_epoch)
from alexnet_fast.model.optim import make_optimizer, make_schedulers
from alexnet_fast.model.parallel import CheckpointOptimizer, Split, data_share, split_network
from alexnet_fast.model.runlog import RunLog, write_curves
from alexnet_fast.model.runtime import (loader_spec, loader_workers, place_network, resolve_precision, seed_everything,
                                        set_backend_flags)
from alexnet_fast.model.shard_check import BackgroundShardCheck, ShardCheckResult
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
    # the share of every global batch this rank reads (columns: both ranks of a pair read the same)
    data_rank, data_ranks = data_share(cfg.parallel, ctx.rank, ctx.world_size)
    per_rank_batch = per_rank_batch_size(cfg.batch_size, data_ranks)
    precision = resolve_precision(cfg.precision, ctx.device.type)
    set_backend_flags(ctx.device)

    # --- data: the manifest is read once; both loaders share it
    shards = ShardSet.open(cfg.data)
    num_classes = cfg.num_classes or shards.num_classes
    too_few = num_classes_mismatch(cfg.num_classes, shards)     # (the command said so before RUN existed)
    if too_few:
        raise TrainingError(too_few)
    train_loader, val_loader = load_data(cfg, ctx, shards, per_rank_batch, precision, (data_rank, data_ranks))
    loaders = [loader for loader in (train_loader, val_loader) if loader is not None]
    for note in (note for loader in loaders for note in loader.notes):   # --on-corrupt skip went on past damage
        warn(ctx, note)
    if cfg.verify_shards:
        exclude_changed_samples(cfg, ctx, shards, loaders)
        shard_check = None
    else:       # the same hashing, behind the first epoch's steps (model/shard_check.py)
        shard_check = BackgroundShardCheck(shards, ctx.rank, ctx.world_size)
    steps_per_epoch = len(train_loader)

    # --- model, optimizer, schedules (the same seed on every rank: identical initial weights)
    seed_everything(cfg.seed)
    model = place_network(cfg.arch, num_classes, ctx.device, channels_last=cfg.channels_last,
                          dropout=cfg.dropout, init=cfg.init)
    split = split_scheme(cfg, model, ctx)
    optimizer = make_optimizer(cfg, split.trainable, ctx.device)
    # checkpoints save and load the full network's optimizer state, whatever the scheme
    objects = ckpt.RunObjects(model, CheckpointOptimizer(split, optimizer),
                              *make_schedulers(cfg, optimizer, steps_per_epoch),
                              scaler=torch.amp.GradScaler(ctx.device.type, enabled=precision == "fp16"))
    identity = ckpt.RunIdentity(cfg.to_dict(), cfg.arch, num_classes, shards.classes, ctx.world_size,
                                DataIdentity.of(shards).as_dict())
    seed_everything(cfg.seed + ctx.rank)     # each rank its own dropout masks

    # --- resume
    state, loader_state, resumed_at, last_is_good = resume_or_start(cfg, ctx, objects, identity, shards)
    network = split.network
    engine = Engine(torch.compile(network) if cfg.compile else network, optimizer, objects.scaler,
                    objects.step_scheduler, ctx.device, precision, cfg.channels_last, cfg.label_smoothing)

    derived = {"world_size": ctx.world_size, "replicas": data_ranks, "per_rank_batch": per_rank_batch,
               "effective_lr": cfg.effective_lr, "resolved_precision": precision,
               "num_classes_resolved": num_classes, "steps_per_epoch": steps_per_epoch,
               "normalize_resolved": "mean-std" if cfg.scale_by_std else "mean"}
    if ctx.is_main:
        save_config(cfg, run_dir, derived)
        say(ctx, f"config: every value as this run uses it ({run_dir / 'config.json'} has them as given too)\n"
                 + format_config(cfg, shown_resolved(cfg, ctx, derived)))

    # --- the epochs
    checkpoints = Checkpointer(ctx, run_dir, objects, identity, train_loader, last_is_good,
                               gather=objects.optimizer.prepare)
    log = RunLog(run_dir, ctx.is_main, resumed_at)
    stop = StopFlag()
    stop.install()
    # Agreeing on a stop is a collective; on a GPU it is posted every few steps and read a check
    # later, so it never makes the host wait (model/loop.py StopAgreement). One process checks
    # every step, and every run at each epoch's end.
    agreement = StopAgreement(ctx.device, stop_check_interval(cfg, ctx))
    hooks = LoopHooks(checkpoint=lambda: checkpoints.save(state), stop_requested=lambda: stop.requested,
                      stop_agreement=agreement, settled=checkpoints.prepare)
    result: dict = {"outcome": Outcome.COMPLETED.value, "val": None}
    started, first_step = time.perf_counter(), state.step
    boundary = EpochBoundary()      # the stall between two epochs, by part (model/boundary.py)
    curves = Redrawer(lambda: write_curves([run_dir], run_dir / "curves.png"), "curves") if ctx.is_main else None
    if shard_check is not None:
        shard_check.start()
    try:
        while state.epoch < cfg.epochs and not (cfg.max_steps and state.step >= cfg.max_steps):
            epoch = state.epoch
            with boundary.part("pipeline"):
                position_loader(ctx, train_loader, state, loader_state)
            epoch_result = run_epoch(cfg, ctx, engine, train_loader, state, hooks, log, steps_per_epoch, data_ranks)
            stall_before = {**boundary.fields(epoch_result), **checkpoints.timings()}
            boundary.begin(epoch_result.last_step_at)
            if epoch_result.outcome is Outcome.STOPPED:
                checkpoints.save(state)
                stopped(ctx, stop, state, checkpoints, result)
                break
            finished = epoch_result.outcome is Outcome.MAX_STEPS or state.epoch >= cfg.epochs
            # before the next epoch is planned: changed samples it finds may have to be left out of it
            shards_changed = shard_check_outcome(cfg, ctx, shard_check, loaders, finished)
            # a stop agreed at the epoch's end: this boundary's work (record, eval if due,
            # checkpoint) is done as usual, then the run stops; a resume starts the next epoch
            stopping = epoch_result.stop_after and not finished
            if not finished and not stopping:   # the next epoch's pipeline builds while this boundary's work runs
                with boundary.part("pipeline"):
                    train_loader.prepare(state.epoch)
            with boundary.part("eval"):
                val = (evaluate_val(model, split, val_loader, ctx, precision, cfg.channels_last)
                       if finished or state.epoch % cfg.eval_every == 0 else None)
            end_epoch(ctx, epoch, epoch_result, val, engine, train_loader, state, objects, log,
                      {**stall_before, **(shards_changed.record() if shards_changed else {})},
                      val_split=val_loader is not None, replicas=data_ranks)
            if val is not None:
                result["val"] = val.as_dict()
            is_best = val is not None and val.top1 > state.best_top1
            if is_best:
                state.best_top1 = val.top1
            with boundary.part("checkpoint"):
                checkpoints.save(state, is_best)
            if shards_changed and shards_changed.differing and cfg.on_corrupt == "error":
                checkpoints.finish()
                raise TrainingError(f"{changed_shard_line(shards_changed)}; the checkpoint of epoch {epoch + 1} is "
                                    f"written: re-make that shard (tools/make_shards), then continue with --resume, "
                                    f"or pass --on-corrupt skip to leave such samples out")
            if curves is not None:
                with boundary.part("plot"):
                    curves.request()         # drawn on a thread of its own: never blocks a step
            if stopping:
                stopped(ctx, stop, state, checkpoints, result)
                break
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
    # a stop of workers our own launcher started is said once, by the launching command
    if not (result["outcome"] == Outcome.STOPPED.value and D.launched_by_us()):
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


def stop_check_interval(cfg: TrainConfig, ctx: D.DistContext) -> int:
    """Steps between two stop checks of a multi-rank run: --stop-check-every, else
    STOP_CHECK_EVERY_GPU on GPUs (each check posts one tiny all-reduce) and every step on the CPU.
    A single process checks every step whatever this says (model/loop.py StopAgreement.due)."""
    if cfg.stop_check_every:
        return cfg.stop_check_every
    return STOP_CHECK_EVERY_GPU if ctx.device.type == "cuda" else 1


def stopped(ctx: D.DistContext, stop: StopFlag, state: TrainState, checkpoints: "Checkpointer", result: dict) -> None:
    """The end of a run stopped by a signal, its checkpoint saved: wait for it to be on disk, say so."""
    checkpoints.finish()
    name = signal.Signals(stop.signal).name if stop.signal else "a stop request"
    if not D.launched_by_us():  # our launcher got the signal too: its command says it, once
        say(ctx, f"stopped by {name} at step {state.step}: checkpoint written to {checkpoints.run_dir / ckpt.LAST}"
                 f" (continue with --resume)")
    result["outcome"] = Outcome.STOPPED.value


def split_scheme(cfg: TrainConfig, model: torch.nn.Module, ctx: D.DistContext) -> Split:
    """`model` split across the ranks per --parallel (model/parallel: the one place that maps it)."""
    try:
        return split_network(cfg.parallel, model, ctx, cfg.grad_compression)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def load_data(cfg: TrainConfig, ctx: D.DistContext, shards: ShardSet, per_rank_batch: int, precision: str,
              share: tuple[int, int] | None = None):
    """The train loader and (if the shard set has a val split) the val loader of this rank. `share`:
    (which share of the train split this rank reads, of how many), default its rank of the world;
    the val split is always read one part per rank (evaluation runs the whole network on each)."""
    data_ctx = replace(ctx, rank=share[0], world_size=share[1]) if share else ctx

    def spec(split: str):
        return loader_spec(split, data=cfg.data, kind=cfg.loader, batch_size=per_rank_batch,
                           ctx=data_ctx if split == "train" else ctx,
                           precision=precision, channels_last=cfg.channels_last, scale_by_std=cfg.scale_by_std,
                           on_corrupt=cfg.on_corrupt, workers=cfg.workers, seed=cfg.seed,
                           lighting_std=cfg.lighting_std, ten_crop=cfg.ten_crop and split == "val", decode=cfg.decode,
                           fast_idct=cfg.fast_idct)
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
    mine = check_shards(shards[ctx.rank::ctx.world_size], workers=loader_workers(cfg.workers, ctx, cfg.decode))
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


def shard_check_outcome(cfg: TrainConfig, ctx: D.DistContext, shard_check: BackgroundShardCheck | None,
                        loaders: list, last_boundary: bool) -> ShardCheckResult | None:
    """At an epoch boundary: the background shard hash check's result, once every rank is done
    (collective; at the run's last boundary it waits for it). It is said in one line; with
    --on-corrupt skip the changed samples are left out of every later epoch (with error the caller
    stops the run after the checkpoint)."""
    result = shard_check.poll(ctx.device, wait=last_boundary) if shard_check is not None else None
    if result is None:
        return None
    if not result.differing:
        say(ctx, f"shard check: {result.shards} shards hashed in the background in {result.seconds:.1f} s, "
                 f"all match the manifest")
        return result
    if cfg.on_corrupt == "skip":
        # one line on stdout, not a warning per shard: a sample a loader already found corrupt (and
        # warned about) is among these too, and leaving it out again changes nothing
        say(ctx, f"shard check: {len(result.differing)} of {result.shards} shards differ from the manifest "
                 f"({changed_shard_line(result)}); {len(result.changed_samples)} changed sample(s) left out from "
                 f"now on (--on-corrupt skip)")
        for loader in loaders:
            loader.exclude(result.changed_samples)
    return result


def changed_shard_line(result: ShardCheckResult) -> str:
    first = next((c for c in result.differing if c.changed), result.differing[0])
    more = len(result.differing) - 1
    return first.describe() + (f" (and {more} more shard(s) differ from the manifest)" if more else "")


def resume_or_start(cfg: TrainConfig, ctx: D.DistContext, objects: ckpt.RunObjects, identity: ckpt.RunIdentity,
                    shards: ShardSet) -> tuple[TrainState, dict | None, int | None, bool]:
    """With --resume and a checkpoint in the run directory: load it into `objects` (its newest good
    one: last.pt, else last.prev.pt with a warning) and return where the run stands, this rank's
    train loader state, the step it resumed at and whether RUN/last.pt is good (False: the first
    save must replace it, not keep it as last.prev.pt). Otherwise a fresh start (resumed at None),
    from the weights of --init-from when given. A checkpoint of another network, class list or
    (without --allow-other-data) shard set is refused (the command checked it already, before
    touching RUN: this holds for API callers)."""
    run_dir = Path(cfg.out)
    if cfg.resume and ckpt.has_checkpoint(run_dir):
        try:
            saved, path = ckpt.load_checkpoint(run_dir, lambda message: warn(ctx, message))
        except ckpt.CheckpointError as e:
            if e.intact_best is None:
                raise
            raise ckpt.CheckpointError(f"{e}: start from its weights with --init-from {e.intact_best} "
                                       f"instead of --resume (the optimizer and lr schedule start afresh)") from None
        refusal = resume_refusal(saved, path, arch=identity.arch, num_classes=identity.num_classes, shard_set=shards,
                                 allow_other_data=cfg.allow_other_data)
        if refusal:
            raise TrainingError(refusal)
        restored = ckpt.restore(saved, objects, identity, ctx.rank, path)
        if saved.get("data", {}).get("fingerprint") not in (None, identity.data["fingerprint"]):
            # --allow-other-data: the saved loader position is one in the other shard set's order
            restored = replace(restored, loader=None)
            say(ctx, f"--allow-other-data: continuing on {cfg.data}, another shard set than the one in {path}")
        saved_parallel = saved.get("config", {}).get("parallel", "ddp")
        if saved_parallel != cfg.parallel:
            # the ranks read other shares of the data now: no loader state fits, the loader replays
            say(ctx, f"--resume: the checkpoint was written under --parallel {saved_parallel}, this run is "
                     f"--parallel {cfg.parallel}")
            restored = replace(restored, loader=None)
        if restored.rng is not None:
            ckpt.set_rng_state(restored.rng)
        else:   # another world size: continue, but dropout masks cannot replay exactly
            seed_everything(cfg.seed + ctx.rank + 1_000_003 * restored.state.step)
        say(ctx, f"resumed from {path}: epoch {restored.state.epoch}, step {restored.state.step}"
                 + (f" (--init-from {cfg.init_from} not used: a run that resumes keeps its own weights)"
                    if cfg.init_from else ""))
        return restored.state, restored.loader, restored.state.step, path.name == ckpt.LAST
    if cfg.resume:
        say(ctx, f"--resume: no checkpoint in {run_dir} yet, starting from scratch")
    if cfg.init_from:
        objects.model.load_state_dict(ckpt.load_weights(cfg.init_from, identity.arch, identity.num_classes,
                                                        identity.classes))
        say(ctx, f"weights from {cfg.init_from}; optimizer, lr schedule and step count start afresh")
    return TrainState(), None, None, True


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
              log: RunLog, steps_per_epoch: int, replicas: int) -> EpochResult:
    """The rest of epoch `state.epoch`, with a progress bar (img/s, ETA) on rank 0."""
    from tqdm import tqdm

    hooks.progress = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, unit="step",
                          desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not ctx.is_main,
                          dynamic_ncols=True, leave=False)
    hooks.log = _log_and_show(log, hooks.progress)
    try:
        return train_one_epoch(engine, loader, state, world_size=ctx.world_size, replicas=replicas,
                               max_steps=cfg.max_steps,
                               log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, hooks=hooks)
    finally:
        hooks.progress.close()


def evaluate_val(model: torch.nn.Module, split: Split, val_loader, ctx: D.DistContext, precision: str,
                 channels_last: bool) -> EvalResult | None:
    """The unwrapped network over the whole val split (every image once across ranks)."""
    if val_loader is None:
        return None
    split.sync_full_model()         # a split network: the other ranks' slices into `model`
    return evaluate(model, val_loader, ctx.device, precision, channels_last)


def end_epoch(ctx: D.DistContext, epoch: int, epoch_result: EpochResult, val: EvalResult | None, engine: Engine,
              train_loader, state: TrainState, objects: ckpt.RunObjects, log: RunLog,
              stall_before: dict[str, float], val_split: bool, replicas: int) -> None:
    """The epoch's record (metrics.jsonl and one line), and the plateau schedule's step.
    `stall_before`: the boundary before the epoch's first step (model/boundary.py), and any other
    fields the record carries (the background shard check's result); `val_split`:
    whether the run has a val split (evaluated every --eval-every epochs)."""
    record = {"step": state.step, "epoch": epoch, "loss": epoch_result.mean_loss, "lr": engine.lr,
              "img_per_s": epoch_result.images * replicas / max(epoch_result.seconds, 1e-9), **stall_before}
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
                 train_loader, last_is_good: bool = True, gather: Callable[[], None] = lambda: None) -> None:
        self.ctx, self.run_dir, self.objects, self.identity = ctx, run_dir, objects, identity
        # collective under --parallel columns/hybrid: the full network and optimizer state into the
        # unwrapped network that a checkpoint saves (CheckpointOptimizer.prepare)
        self.gather = gather
        self.train_loader = train_loader
        # False when the run resumed from last.prev.pt because last.pt was bad: the first write then
        # replaces last.pt instead of rotating it over the good last.prev.pt
        self._rotate = last_is_good
        self.writer = Background("checkpoint writer")
        self._written_s: list[float] = []        # durations of the background writes finished so far
        self._waited_s: list[float] = []         # how long saves waited for the write before them
        self._snapshot: dict | None = None      # the last host copy: its memory is reused by the next one
        self._prepared = False

    def prepare(self) -> bool:
        """Allocate the host copy's memory now, on the writer's thread, while the first epoch trains:
        made at the first save instead, pinned on a GPU, it stalled the first epoch boundary (~0.3 s
        there vs ~0.03 s at the later ones, measured on held-back photos). The model's and the
        optimizer's tensors are the bulk; the rest is small and made at the first save. Called
        after a few steps (LoopHooks.settled), when the optimizer's momentum exists, on every rank
        at the same step (the split schemes' gather is a collective); once per run. True when it
        gathered just now."""
        if self._prepared:
            return False
        self._prepared = True
        self.gather()
        if not self.ctx.is_main:
            return True
        shapes = {"model": self.objects.model.state_dict(), "optimizer": self.objects.optimizer.state_dict()}

        def allocate() -> None:
            if self._snapshot is None:          # a save may have come first (--ckpt-every 1)
                self._snapshot = ckpt.host_buffers(shapes)
        self.writer.submit(allocate)
        return True

    def save(self, state: TrainState, is_best: bool = False) -> None:
        if not self.prepare():
            self.gather()
        rng = D.all_gather_objects(ckpt.rng_state())
        loaders = D.all_gather_objects(self.train_loader.state_dict())
        tallies = D.all_gather_objects(asdict(state.tally))
        if not self.ctx.is_main:
            return
        # the previous write reads the host copy about to be overwritten (done long ago, normally)
        self._waited_s.append(self.writer.wait())
        captured = ckpt.capture(self.objects, state, self.identity, rng, loaders, tallies)
        snapshot = self._snapshot = ckpt.to_host(captured, reuse=self._snapshot)
        step, rotate = state.step, self._rotate
        self._rotate = True         # from the next write on, last.pt is one this run wrote
        self.writer.submit(lambda: self._write(snapshot, step, is_best, rotate))

    @property
    def host_copy(self) -> dict | None:
        """The host memory the next save copies into (None before `prepare` or the first save)."""
        self.writer.wait()
        return self._snapshot

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

    def _write(self, snapshot: dict, step: int, is_best: bool, rotate: bool) -> None:
        started = time.perf_counter()
        try:
            ckpt.save_checkpoint(snapshot, self.run_dir, is_best=is_best, rotate=rotate)
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
    """One warning line on stderr from rank 0 (tqdm-safe: never glued to a live progress bar)."""
    if ctx.is_main:
        from tqdm import tqdm
        tqdm.write(f"alexnet-fast train: warning: {message}", file=sys.stderr)
        sys.stderr.flush()


def _log_and_show(log: RunLog, bar: Any) -> Callable[[dict], None]:
    def write(record: dict) -> None:
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}", refresh=False)
    return write
