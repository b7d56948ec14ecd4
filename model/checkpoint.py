"""Checkpoints that survive kills, preemption and full disks.

RUN/last.pt        the newest checkpoint
RUN/last.prev.pt   the one before it (kept so a damaged last.pt costs one interval, not the run)
RUN/best.pt        the one with the best val top-1 so far

A save writes `<name>.tmp.<host>.<pid>` in the same directory, flushes and fsyncs it, and only
then renames it over the old file (os.replace is atomic on POSIX), so at every instant each name
holds either the old complete checkpoint or the new complete one. A failing write (disk full)
leaves the old file in place and removes the temp file. The temp name is the writer's own, so
two processes writing the same run directory (which the run lock, tools/run_lock.py, normally
prevents) can never remove or rename each other's temp files. A kill leaves the temp file behind;
the next run removes it (`remove_stale_temporaries`) while it holds the run's lock. A load that finds `last.pt` truncated or unreadable
warns and falls back to `last.prev.pt`.

What a checkpoint holds is written in one place, `capture` (and read back in `restore`):
    {"format": CHECKPOINT_FORMAT, "model": unwrapped state_dict, "optimizer", "scheduler", "scaler",
     "epoch", "step", "step_in_epoch", "best_top1", "rng": [per-rank RNG states],
     "loader": [per-rank train loader state_dict(): the DALI pipeline checkpoint, to resume mid-epoch],
     "config": {...}, "arch", "num_classes", "classes", "world_size"}
"""
from __future__ import annotations

import os
import random
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from alexnet_fast.model.errors import RunError, TrainingError
from alexnet_fast.model.loop import TrainState

CHECKPOINT_FORMAT = "alexnet-fast-checkpoint-v1"
LAST, PREVIOUS, BEST = "last.pt", "last.prev.pt", "best.pt"
REQUIRED_KEYS = ("format", "model", "epoch", "step", "arch", "num_classes")
TEMP_MARK = ".tmp."             # <name>.tmp.<host>.<pid>: see _temp_path


class CheckpointError(RunError):
    """No usable checkpoint; the message is one line for the user."""


@dataclass
class RunObjects:
    """The objects of a run whose state a checkpoint carries."""
    model: nn.Module                 # the unwrapped network (no DDP/compile wrapper: loads anywhere)
    optimizer: torch.optim.Optimizer
    step_scheduler: Any              # per-step LambdaLR, or None
    plateau: Any                     # per-epoch ReduceLROnPlateau, or None
    scaler: torch.amp.GradScaler


@dataclass(frozen=True)
class RunIdentity:
    """What the run is, fixed for its life: a resume must match it, eval reads it."""
    config: dict                     # the resolved TrainConfig as a dict
    arch: str
    num_classes: int
    classes: list[str]
    world_size: int


def capture(objects: RunObjects, state: TrainState, identity: RunIdentity, rng: list[dict],
            loaders: list[dict]) -> dict:
    """The checkpoint of a run at `state`: `rng` and `loaders` are every rank's RNG states and
    train loader states, in rank order."""
    return {
        "model": objects.model.state_dict(), "optimizer": objects.optimizer.state_dict(),
        "scheduler": {"step": objects.step_scheduler.state_dict() if objects.step_scheduler else None,
                      "plateau": objects.plateau.state_dict() if objects.plateau else None},
        "scaler": objects.scaler.state_dict(),
        "epoch": state.epoch, "step": state.step, "step_in_epoch": state.step_in_epoch,
        "best_top1": state.best_top1, "rng": rng, "loader": loaders,
        "config": identity.config, "arch": identity.arch, "num_classes": identity.num_classes,
        "classes": identity.classes, "world_size": identity.world_size,
    }


def to_host(obj: Any, reuse: Any = None) -> Any:
    """A copy of `obj` (a checkpoint dict) whose tensors are CPU tensors of their own: what a
    background write saves while training goes on changing the originals. `reuse`: an earlier
    copy of the same structure (no write may still be reading it) whose tensors are overwritten in
    place -- measured on the 2-core CPU VM, copying AlexNet's 244 MB of weights into a fresh tensor
    took ~0.09 s (page faults of new memory), into an existing one ~0.02 s. On a GPU the copies go
    to pinned memory without a sync per tensor; one synchronize at the end makes them complete."""
    on_gpu = False

    def copy(value: Any, old: Any) -> Any:
        nonlocal on_gpu
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if isinstance(old, torch.Tensor) and old.shape == value.shape and old.dtype == value.dtype \
                    and old.device.type == "cpu" and (old.is_pinned() or not value.is_cuda):
                host = old
            elif value.is_cuda:
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            else:
                return value.clone()
            on_gpu = on_gpu or value.is_cuda
            return host.copy_(value, non_blocking=value.is_cuda)
        if isinstance(value, dict):
            old = old if isinstance(old, dict) else {}
            return {k: copy(v, old.get(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            old = old if isinstance(old, (list, tuple)) and len(old) == len(value) else [None] * len(value)
            return type(value)(copy(v, o) for v, o in zip(value, old))
        return value

    host = copy(obj, reuse)
    if on_gpu:
        torch.cuda.synchronize()
    return host


def host_buffers(obj: Any) -> Any:
    """Host tensors shaped like the tensors of `obj` (a checkpoint dict, or part of one), to pass
    as `to_host(..., reuse=)`: pinned for CUDA tensors, zero-filled so every page is mapped. Made
    while the first epoch trains (model/train.py Checkpointer.prepare), so the first checkpoint
    copies into ready memory instead of allocating (and page-faulting) the ~490 MB of AlexNet's
    weights and momentum on the epoch boundary's critical path."""
    if isinstance(obj, torch.Tensor):
        return torch.zeros(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
    if isinstance(obj, dict):
        return {k: host_buffers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_buffers(v) for v in obj)
    return obj


@dataclass(frozen=True)
class Restored:
    state: TrainState
    rng: dict | None                 # this rank's RNG states; None when the world size changed
    loader: dict | None              # this rank's train loader state; None when the world size changed


def restore(saved: dict, objects: RunObjects, identity: RunIdentity, rank: int, source: Path) -> Restored:
    """Load a checkpoint `capture` wrote into the run's objects. TrainingError if it belongs to
    another network or class count."""
    if saved["arch"] != identity.arch or saved["num_classes"] != identity.num_classes:
        raise TrainingError(f"{source} holds {saved['arch']} with {saved['num_classes']} classes, "
                            f"not {identity.arch} with {identity.num_classes}")
    objects.model.load_state_dict(saved["model"])
    objects.optimizer.load_state_dict(saved["optimizer"])
    if objects.step_scheduler is not None and saved["scheduler"].get("step"):
        objects.step_scheduler.load_state_dict(saved["scheduler"]["step"])
    if objects.plateau is not None and saved["scheduler"].get("plateau"):
        objects.plateau.load_state_dict(saved["scheduler"]["plateau"])
    objects.scaler.load_state_dict(saved["scaler"])
    state = TrainState(saved["epoch"], saved["step"], saved["step_in_epoch"], saved["best_top1"])
    same_world = len(saved["rng"]) == identity.world_size
    loaders = saved.get("loader")
    return Restored(state, saved["rng"][rank] if same_world else None,
                    loaders[rank] if loaders and len(loaders) == identity.world_size else None)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _WriteErrorKeeper:
    """The file object torch.save writes to, keeping the OSError of a failed write: torch turns
    it into a RuntimeError without the errno ("unexpected pos ..."), and a full disk must reach
    the user as what it is."""

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def _temp_path(path: Path) -> Path:
    """This process's temp file for `path`: `<name>.tmp.<host>.<pid>`, a name no other live writer
    uses (the pid is read per call: a forked process gets its own)."""
    return path.with_name(f"{path.name}{TEMP_MARK}{socket.gethostname()}.{os.getpid()}")


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the checkpoint temp files that killed writers left in `run_dir` (today's names and
    the plain `<name>.tmp` of earlier versions). Only for the holder of the run's lock, before
    its run writes anything: then no live writer owns any of them. Returns what was removed."""
    run_dir = Path(run_dir)
    stale = [*run_dir.glob(f"*.pt{TEMP_MARK}*"), *run_dir.glob("*.pt.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _write_synced(obj: Any, tmp: Path) -> None:
    """torch.save into `tmp` and fsync it; on any failure (disk full, a signal) remove `tmp`.
    A failed write raises the OSError (ENOSPC, EFBIG, EDQUOT) itself."""
    try:
        with open(tmp, "wb") as fh:
            writer = _WriteErrorKeeper(fh)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to `path` atomically: temp file + fsync + os.replace. On any failure the old
    file is untouched and the temp file is gone; the exception propagates."""
    path = Path(path)
    tmp = _temp_path(path)
    _write_synced(obj, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def save_checkpoint(state: dict, run_dir: str | Path, is_best: bool = False) -> Path:
    """Write RUN/last.pt atomically, keeping the previous last.pt as last.prev.pt; with
    `is_best`, RUN/best.pt becomes the same file (a hard link, so no second write)."""
    run_dir = Path(run_dir)
    state = {"format": CHECKPOINT_FORMAT, **state}
    last, previous = run_dir / LAST, run_dir / PREVIOUS
    tmp = _temp_path(last)
    _write_synced(state, tmp)
    # The old last.pt was complete (only whole files ever get that name): keep it as the fallback.
    # A kill between these two renames leaves last.prev.pt + a complete temp file; load_checkpoint
    # falls back to last.prev.pt.
    if last.exists():
        os.replace(last, previous)
    os.replace(tmp, last)
    _fsync_dir(run_dir)
    if is_best:
        _link_or_copy(last, run_dir / BEST)
    return last


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = _temp_path(dst)
    tmp.unlink(missing_ok=True)     # ours, from a link that failed part-way
    try:
        os.link(src, tmp)       # files are never modified in place, so sharing the inode is safe
    except OSError:
        atomic_save(torch.load(src, map_location="cpu", weights_only=False), dst)
        return
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def read_checkpoint(path: str | Path) -> dict:
    """Load one checkpoint file onto the CPU; CheckpointError if it is missing, truncated or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only=False: the checkpoint holds RNG states and the config (our own files only).
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, flipped bytes, not a torch file: all "unreadable"
        msg = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__   # torch's first sentence
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged or truncated ({msg})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS) \
            or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an alexnet-fast checkpoint")
    return state


def load_checkpoint(path_or_run_dir: str | Path, warn: Callable[[str], None] | None = None) -> tuple[dict, Path]:
    """A checkpoint file, or a run directory's newest good one: last.pt, else (with a warning)
    last.prev.pt. Returns (state, the path it came from). The warning goes to `warn` (commands
    print it as one line) or, without it, to Python's warnings."""
    target = Path(path_or_run_dir)
    if not target.is_dir():
        return read_checkpoint(target), target
    candidates = [target / LAST, target / PREVIOUS]
    errors = []
    for candidate in candidates:
        if not candidate.exists():
            errors.append(f"{candidate.name} missing")
            continue
        try:
            state = read_checkpoint(candidate)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors and candidate.name != LAST:
            message = f"{'; '.join(errors)}; resuming from the previous good checkpoint {candidate}"
            if warn is not None:
                warn(message)
            else:
                warnings.warn(message, stacklevel=2)
        return state, candidate
    raise CheckpointError(f"no usable checkpoint in {str(target)!r}: {'; '.join(errors)}")


def has_checkpoint(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / LAST).exists() or (run_dir / PREVIOUS).exists()


# --- RNG states: python, numpy, torch CPU, every CUDA device -------------------------------------
def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
