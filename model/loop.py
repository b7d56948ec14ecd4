"""One optimizer step and one epoch of them: what runs between two epoch boundaries.

    engine = Engine(model, optimizer, scaler, step_scheduler, device, precision="bf16", channels_last=True)
    result = train_one_epoch(engine, loader, state, world_size=2, log_every=50, hooks=hooks)

No host sync inside a step: the loss is summed on the device and read (`.item()`) only every
`log_every` steps. The price: a NaN/inf loss is noticed at the next log point, not at once. The step
it first appeared is recorded on the device, the run stops naming it, and no checkpoint is written
after it.

Stopping (SIGTERM/SIGINT set a `StopFlag`): every rank must stop at the same step, so the ranks agree
on it with an all-reduce. `StopAgreement` does that without a host wait: the flag is all-reduced
asynchronously at one check and read at the next one, when the reduction has long finished.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_fast.model import distributed as D
from alexnet_fast.model.errors import TrainingError
from alexnet_fast.model.runtime import autocast, memory_format

# Steps between two stop checks of a multi-rank run on a GPU: each check posts one tiny all-reduce.
STOP_CHECK_EVERY_GPU = 10
# LoopHooks.settled is called after this many steps of an epoch (past the first step's one-off work:
# torch.compile, cuDNN autotuning, the optimizer's lazily made state)
SETTLED_AFTER = 2


class Outcome(str, Enum):
    COMPLETED = "completed"          # every epoch ran
    MAX_STEPS = "max_steps"          # --max-steps reached
    STOPPED = "stopped"              # SIGTERM/SIGINT: checkpoint written, exit 0


@dataclass
class EpochTally:
    """The running sums of the epoch in progress, on this rank: what its record (loss, img/s) and
    the plateau schedule without a val split are computed from. Saved in every checkpoint and
    continued on resume, so an epoch resumed mid-way reports the same numbers as one never stopped.
    The open window (steps since the last log point) is kept apart, as the loop sums it: folding it
    early would round differently from a run that was never stopped."""
    loss_sum: float = 0.0            # the closed windows' loss sums, mean over ranks per step
    steps: int = 0                   # the steps those windows hold
    images: int = 0                  # images this rank trained on in the epoch
    seconds: float = 0.0             # time spent in the epoch's training calls before this one
    window_loss: float = 0.0         # this rank's loss sum of the open window (a float32 value)
    window_steps: int = 0
    window_images: int = 0
    window_seconds: float = 0.0      # time the open window ran before this call


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""
    epoch: int = 0                   # the epoch in progress (or the next one to start)
    step: int = 0                    # optimizer steps taken in the whole run
    step_in_epoch: int = 0           # batches of `epoch` already trained on (to resume mid-epoch)
    best_top1: float = -1.0
    tally: EpochTally = field(default_factory=EpochTally)   # the epoch's sums so far


@dataclass
class Engine:
    """Everything one optimizer step needs."""
    model: nn.Module                 # DDP- and/or compile-wrapped network in train mode
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler     # enabled only for fp16
    step_scheduler: torch.optim.lr_scheduler.LRScheduler | None   # warm-up/cosine/step: per step
    device: torch.device
    precision: str = "fp32"          # resolved: bf16 | fp16 | fp32 (model.runtime.resolve_precision)
    channels_last: bool = False
    label_smoothing: float = 0.0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def train_step(engine: Engine, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward, backward, optimizer step. Returns the loss as a device tensor (no host sync)."""
    images = images.to(engine.device, non_blocking=True).contiguous(memory_format=memory_format(engine.channels_last))
    labels = labels.to(engine.device, non_blocking=True).long()
    with autocast(engine.device, engine.precision):
        logits = engine.model(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=engine.label_smoothing)
    engine.optimizer.zero_grad(set_to_none=True)
    engine.scaler.scale(loss).backward()
    engine.scaler.step(engine.optimizer)
    engine.scaler.update()
    if engine.step_scheduler is not None:
        engine.step_scheduler.step()
    return loss.detach()


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


class StopAgreement:
    """All ranks agree to stop at the same step, without making the host wait for the device.

    One process: the local request is the answer, at every step (no collective, nothing to wait
    for). Several: every `every` steps (`due`), `check(requested)` posts this rank's request in an
    asynchronous MAX all-reduce and answers with the result of the one posted at the previous
    check. Every rank posts and reads at the same steps, so all of them stop at the same step, one
    check after the first request. On a GPU the result is copied to pinned host memory behind an
    event recorded when it was posted; by the next check (`every` steps later) that event has long
    completed, so reading it does not wait for the steps queued since (a plain `.item()` would
    drain the whole stream). At an epoch's end `settle` agrees at once (the host waits there
    anyway), so an epoch shorter than `every` steps still sees a stop requested during it.

    The flag posted is one device tensor made once and filled in place (a kernel taking the value
    as an argument): `torch.tensor([...], device="cuda")` at each check would be a blocking
    host-to-device copy. The pinned host copy and the event are made once too. Reusing them is safe:
    each check first finishes the previous reduction (`_read_pending`) before it refills them."""

    def __init__(self, device: torch.device, every: int = 1) -> None:
        self.device, self.every = device, every
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)    # posted at every check
        on_gpu = device.type == "cuda"
        self._host = torch.zeros(1, dtype=torch.int32, pin_memory=True) if on_gpu else None
        self._event = torch.cuda.Event() if on_gpu else None
        self._pending: Any = None       # the posted reduction: its Work (CPU) or True (GPU: the event)

    def due(self, step: int) -> bool:
        """Is a stop check due after optimizer step `step`?"""
        return not D.dist.is_initialized() or step % self.every == 0

    def check(self, requested: bool) -> bool:
        if not D.dist.is_initialized():
            return requested
        agreed = self._read_pending()
        self._post(requested)
        return agreed

    def settle(self, requested: bool) -> bool:
        """Agree now, waiting for the answer: at the end of an epoch, where the host reads the
        epoch's loss anyway. Includes the answer to a check posted earlier."""
        if not D.dist.is_initialized():
            return requested
        earlier = self._read_pending()
        self._post(requested)
        return self._read_pending() or earlier

    def _post(self, requested: bool) -> None:
        self.flag.fill_(1 if requested else 0)
        work = D.dist.all_reduce(self.flag, op=D.dist.ReduceOp.MAX, async_op=True)
        if self._event is not None:
            work.wait()                       # orders the copy after the reduction on the stream (no host wait)
            self._host.copy_(self.flag, non_blocking=True)
            self._event.record()
            self._pending = True
        else:
            self._pending = work

    def _read_pending(self) -> bool:
        if self._pending is None:
            return False
        pending, self._pending = self._pending, None
        if self._event is not None:
            self._event.synchronize()
            return bool(self._host.item())
        pending.wait()
        return bool(self.flag.item())

    def drain(self) -> None:
        """Finish a posted reduction (before the process group goes away)."""
        self._read_pending()


@dataclass
class LoopHooks:
    """What the epoch loop calls out to; all optional so tests can drive it with plain tensors."""
    log: Callable[[dict], None] = lambda record: None
    checkpoint: Callable[[], None] = lambda: None
    stop_requested: Callable[[], bool] = lambda: False
    progress: Any = None             # a tqdm bar (rank 0) or None
    stop_agreement: StopAgreement | None = None   # None: a fresh one, checking at every step
    # called once per call of train_one_epoch, after its SETTLED_AFTER-th step: background work that
    # needs the run's steady state (the optimizer's momentum exists) and should overlap training
    settled: Callable[[], None] = lambda: None


@dataclass
class EpochResult:
    outcome: Outcome
    mean_loss: float                 # over every step of the epoch so far (those before a resume too)
    images: int                      # images this rank trained on in the epoch so far
    seconds: float                   # time the epoch's steps took so far (before a resume too)
    losses: list[float] = field(default_factory=list)   # the logged losses (one per log point)
    # host clock (time.perf_counter) around the epoch's steps: what the epoch boundary is timed by
    first_batch_s: float = 0.0       # from the call to the first batch in hand (the pipeline's start-up)
    first_step_at: float = 0.0       # when the first step began
    last_step_at: float = 0.0        # when the last step returned
    # COMPLETED, and a stop was agreed at the epoch's end: the run stops after this epoch's boundary
    stop_after: bool = False


def train_one_epoch(engine: Engine, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    state: TrainState, *, world_size: int = 1, replicas: int = 0, max_steps: int = 0,
                    log_every: int = 50, ckpt_every: int = 0, hooks: LoopHooks | None = None) -> EpochResult:
    """Train on `batches` (any iterable of (images, labels)): the rest of epoch `state.epoch`,
    from batch `state.step_in_epoch` on (a resumed epoch: the loader was positioned there with
    `resume`). Updates `state` as it goes. `replicas`: how many ranks read distinct images (default
    `world_size`; --parallel columns: half of them), for img/s."""
    hooks = hooks or LoopHooks()
    stop = hooks.stop_agreement or StopAgreement(engine.device)
    engine.model.train()
    device = engine.device
    tally = state.tally
    # Device-side accumulators: read only at log points. The open window continues a resumed one.
    loss_sum = torch.full((), tally.window_loss, dtype=torch.float32, device=device)
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    device_step = torch.full((), state.step, dtype=torch.int64, device=device)
    logged = []
    window_steps, window_images = tally.window_steps, tally.window_images
    call_start = time.perf_counter()
    window_start = call_start - tally.window_seconds
    seconds_before = tally.seconds   # the epoch's training time in earlier calls (before a resume)
    first_step_at = last_step_at = 0.0
    outcome = Outcome.COMPLETED

    def park_window() -> None:
        """Put the open window into the tally (a checkpoint is about to carry it). A host sync."""
        tally.window_loss, tally.window_steps, tally.window_images = loss_sum.item(), window_steps, window_images
        tally.window_seconds = time.perf_counter() - window_start
        tally.seconds = seconds_before + time.perf_counter() - call_start

    state_start = state.step_in_epoch
    for index, (images, labels) in enumerate(batches, start=state_start):
        if not first_step_at:
            first_step_at = time.perf_counter()
        loss = train_step(engine, images, labels)
        last_step_at = time.perf_counter()
        state.step += 1
        state.step_in_epoch = index + 1
        device_step += 1
        loss_sum += loss
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), device_step, first_bad_step)
        window_steps += 1
        window_images += labels.shape[0]
        tally.images += labels.shape[0]
        if hooks.progress is not None:
            hooks.progress.update(1)
        if index - state_start == SETTLED_AFTER - 1:
            hooks.settled()

        at_end = bool(max_steps) and state.step >= max_steps
        if state.step % log_every == 0 or at_end:
            raise_if_loss_was_bad(first_bad_step)          # a host sync: once per log interval
            window_loss = D.all_reduce_sum(loss_sum.clone()).item() / world_size
            elapsed = time.perf_counter() - window_start
            record = {"step": state.step, "epoch": state.epoch, "loss": window_loss / window_steps,
                      "lr": engine.lr, "img_per_s": window_images * (replicas or world_size) / max(elapsed, 1e-9)}
            hooks.log(record)
            logged.append(record["loss"])
            tally.loss_sum += window_loss
            tally.steps += window_steps
            loss_sum.zero_()
            window_steps, window_images, window_start = 0, 0, time.perf_counter()

        if ckpt_every and state.step % ckpt_every == 0 and not at_end:
            raise_if_loss_was_bad(first_bad_step)
            park_window()
            hooks.checkpoint()
        if at_end:
            outcome = Outcome.MAX_STEPS
            break
        if stop.due(state.step) and stop.check(hooks.stop_requested()):
            outcome = Outcome.STOPPED
            break

    raise_if_loss_was_bad(first_bad_step)
    # The tail after the last log point: into the mean, but kept open in the tally unless the epoch
    # is over (a stopped epoch continues it on resume, as if never stopped).
    tail = D.all_reduce_sum(loss_sum.clone()).item() / world_size if window_steps else 0.0
    mean_loss = (tally.loss_sum + tail) / max(tally.steps + window_steps, 1)
    seconds = seconds_before + time.perf_counter() - call_start
    images = tally.images
    stop_after = False
    if outcome is Outcome.COMPLETED:
        state.epoch += 1
        state.step_in_epoch = 0
        state.tally = EpochTally()
        # always checked at the epoch's end: a multi-rank run checks every `stop.every` steps,
        # and an epoch shorter than that would otherwise never see a request
        stop_after = stop.settle(hooks.stop_requested())
    else:
        park_window()
    return EpochResult(outcome, mean_loss, images, seconds, logged, first_batch_s=max(0.0, first_step_at - call_start),
                       first_step_at=first_step_at, last_step_at=last_step_at, stop_after=stop_after)


def raise_if_loss_was_bad(first_bad_step: torch.Tensor) -> None:
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
