"""Checkpoints that survive kills, preemption, full disks and damaged files.

RUN/last.pt        the newest checkpoint: weights, optimizer, schedules, RNG and loader states,
                   the epoch's running sums (AlexNet: ~456 MB, half of it SGD's momentum buffers)
RUN/last.prev.pt   the one before it (kept so a damaged last.pt costs one interval, not the run)
RUN/best.pt        the weights with the best val top-1 so far, and what eval and export need to
                   use them (arch, classes, config): no optimizer state (AlexNet: ~228 MB). A file
                   of its own, never a link to last.pt, so damage to one is never damage to both.

A save writes `<name>.tmp.<host>.<pid>` in the same directory, flushes and fsyncs it, and only
then renames it over the old file (os.replace is atomic on POSIX), so at every instant each name
holds either the old complete checkpoint or the new complete one. A failing write (disk full)
leaves the old file in place and removes the temp file. The temp name is the writer's own, so
two processes writing the same run directory (which the run lock, tools/run_lock.py, normally
prevents) can never remove or rename each other's temp files. A kill leaves the temp file behind;
the next run removes it (`remove_stale_temporaries`) while it holds the run's lock.

Integrity: every file carries `digest`, a sha256 over its tensors and values (`content_digest`),
checked on every load: torch.load alone does not notice a flipped byte inside a tensor. A load
that finds `last.pt` missing, truncated or changed warns and falls back to `last.prev.pt`; the
next save then replaces the bad `last.pt` instead of rotating it into `last.prev.pt` over the good
copy (`save_checkpoint(rotate=False)`), and a `last.pt` whose zip directory is unreadable is never
rotated either. When neither is usable the error names an intact best.pt and how to start from it.

What a checkpoint holds is written in one place, `capture` (and read back in `restore`):
    {"format": CHECKPOINT_FORMAT, "model": unwrapped state_dict, "optimizer", "scheduler", "scaler",
     "epoch", "step", "step_in_epoch", "best_top1", "rng": [per-rank RNG states],
     "loader": [per-rank train loader state_dict(): the DALI pipeline checkpoint, to resume mid-epoch],
     "tally": [per-rank EpochTally: the epoch's loss sum, steps, images, seconds so far],
     "config": {...}, "arch", "num_classes", "classes", "world_size", "digest",
     "data": {"fingerprint", "shards", "samples"} (model/identity.py: which shard set it was trained on)}
and best.pt (`best_weights`): {"format", "kind": "weights", "model", "epoch", "step", "best_top1",
"config", "arch", "num_classes", "classes", "world_size", "digest"}.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from alexnet_fast.model.errors import RunError, TrainingError
from alexnet_fast.model.loop import EpochTally, TrainState

CHECKPOINT_FORMAT = "alexnet-fast-checkpoint-v1"
LAST, PREVIOUS, BEST = "last.pt", "last.prev.pt", "best.pt"
REQUIRED_KEYS = ("format", "model", "epoch", "step", "arch", "num_classes")
# what best.pt keeps of a checkpoint (besides "format", "kind" and "digest")
WEIGHTS_KEYS = ("model", "epoch", "step", "best_top1", "config", "arch", "num_classes", "classes", "world_size")
TEMP_MARK = ".tmp."             # <name>.tmp.<host>.<pid>: see _temp_path


class CheckpointError(RunError):
    """No usable checkpoint; the message is one line for the user. `intact_best`: the run's
    best.pt when it is still good (what a run whose every last* is damaged can start from)."""

    def __init__(self, message: str, intact_best: Path | None = None) -> None:
        super().__init__(message)
        self.intact_best = intact_best


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
    data: dict = field(default_factory=dict)    # model.identity.DataIdentity.as_dict() of the shard set


def capture(objects: RunObjects, state: TrainState, identity: RunIdentity, rng: list[dict],
            loaders: list[dict], tallies: list[dict] | None = None) -> dict:
    """The checkpoint of a run at `state`: `rng`, `loaders` and `tallies` are every rank's RNG
    states, train loader states and epoch tallies (`asdict(state.tally)`), in rank order."""
    return {
        "model": objects.model.state_dict(), "optimizer": objects.optimizer.state_dict(),
        "scheduler": {"step": objects.step_scheduler.state_dict() if objects.step_scheduler else None,
                      "plateau": objects.plateau.state_dict() if objects.plateau else None},
        "scaler": objects.scaler.state_dict(),
        "epoch": state.epoch, "step": state.step, "step_in_epoch": state.step_in_epoch,
        "best_top1": state.best_top1, "rng": rng, "loader": loaders,
        "tally": tallies if tallies is not None else [asdict(state.tally)],
        "config": identity.config, "arch": identity.arch, "num_classes": identity.num_classes,
        "classes": identity.classes, "world_size": identity.world_size, "data": identity.data,
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
    same_world = len(saved["rng"]) == identity.world_size
    state = TrainState(saved["epoch"], saved["step"], saved["step_in_epoch"], saved["best_top1"],
                       _restored_tally(saved.get("tally"), rank, same_world))
    loaders = saved.get("loader")
    return Restored(state, saved["rng"][rank] if same_world else None,
                    loaders[rank] if loaders and len(loaders) == identity.world_size else None)


def _restored_tally(tallies: list[dict] | None, rank: int, same_world: bool) -> EpochTally:
    """This rank's epoch sums from a checkpoint. Another world size: the sums every rank shares
    (the logged windows' loss, steps, time) from rank 0; the open window's loss was per rank and
    is dropped with its steps, and images are counted afresh. A checkpoint from before tallies: empty."""
    if not tallies:
        return EpochTally()
    if same_world:
        return EpochTally(**tallies[rank])
    first = tallies[0]
    return EpochTally(loss_sum=first["loss_sum"], steps=first["steps"], seconds=first["seconds"])


def best_weights(checkpoint: dict) -> dict:
    """What best.pt holds, from a checkpoint `capture` wrote: the weights and what eval and export
    need to use them; no optimizer, RNG or loader state."""
    return {"kind": "weights", **{key: checkpoint[key] for key in WEIGHTS_KEYS if key in checkpoint}}


def content_digest(obj: Any) -> str:
    """sha256 over every value of a checkpoint dict but its `digest`: tensors and arrays by their
    bytes (with dtype and shape), other values by repr, in the dict's order (which torch.save keeps).
    ~0.7 CPU-seconds per GB (one core with SHA instructions: benchmarks/RESULTS.md); computed by the
    background writer, checked on load."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1).contiguous().cpu()
            digest.update(f"T{flat.dtype}{tuple(value.shape)}".encode())
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
        elif isinstance(value, np.ndarray):
            digest.update(f"A{value.dtype}{value.shape}".encode())
            digest.update(memoryview(np.ascontiguousarray(value)).cast("B"))
        elif isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                if key != "digest":
                    digest.update(repr(key).encode())
                    feed(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    feed(obj)
    return digest.hexdigest()


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


@contextlib.contextmanager
def _without_zip_checksums():
    """torch.save without the zip format's CRC-32 of each record (torch >= 2.6's switch; older
    releases write it as before). torch.load never checks those CRCs (torch builds its zip reader
    with MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS: why a flipped byte needs our sha256 `digest`, which
    every load checks), so they only cost time: ~0.13 s per AlexNet checkpoint, ~4% of a short
    training process's CPU time (perf, 2026-12-03).

    The switch is process-wide: a torch.save another thread makes meanwhile also skips the CRC.
    Only the checkpoint writer saves in a training process."""
    try:
        from torch.utils.serialization import config
        before = config.save.compute_crc32
    except (ImportError, AttributeError):
        yield
        return
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def _write_synced(obj: Any, tmp: Path) -> None:
    """torch.save into `tmp` and fsync it; on any failure (disk full, a signal) remove `tmp`.
    A failed write raises the OSError (ENOSPC, EFBIG, EDQUOT) itself."""
    try:
        with open(tmp, "wb") as fh:
            writer = _WriteErrorKeeper(fh)
            try:
                with _without_zip_checksums():
                    torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            fh.flush()
            os.fsync(fh.fileno())
            _drop_from_page_cache(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _drop_from_page_cache(fd: int) -> None:
    """Hand a written, synced checkpoint's pages back to the kernel (POSIX_FADV_DONTNEED).

    Nothing reads a checkpoint soon after writing it (a resume, or eval of best.pt, reads it once,
    later), while the loader rereads the shards every epoch: kept cached, each ~0.5 GB checkpoint
    pushed ~0.5 GB of shards out. And the next save then takes pages the kernel has just freed
    instead of new ones: on a 2-core VM a checkpoint write that needed new pages cost up to ~10x the
    CPU time of one into freed pages (0.46-0.87 s against ~0.08 s of system time per 240 MB, 8
    rotating saves; with the pages dropped every save took 0.07-0.10 s; 2026-12-03). Advice only:
    ignored where the OS has no such call."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to `path` atomically: temp file + fsync + os.replace. On any failure the old
    file is untouched and the temp file is gone; the exception propagates."""
    path = Path(path)
    tmp = _temp_path(path)
    _write_synced(obj, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def sealed(obj: dict) -> dict:
    """`obj` as a checkpoint file holds it: with the format mark and its content digest."""
    obj = {"format": CHECKPOINT_FORMAT, **obj}
    obj["digest"] = content_digest(obj)
    return obj


def save_checkpoint(state: dict, run_dir: str | Path, is_best: bool = False, rotate: bool = True) -> Path:
    """Write RUN/last.pt atomically, keeping the previous last.pt as last.prev.pt; with `is_best`,
    first RUN/best.pt (the weights, `best_weights`), a file of its own. `rotate=False`: the current
    last.pt is known to be bad (the run resumed from last.prev.pt), so it is replaced, not kept as
    last.prev.pt over the good one; a last.pt whose zip directory cannot be read is never kept."""
    run_dir = Path(run_dir)
    state = sealed(state)
    last, previous = run_dir / LAST, run_dir / PREVIOUS
    # best.pt first: once last.pt records a best_top1, the weights that scored it are on disk (a kill
    # between the two writes then costs nothing: the older last.pt replays the epoch and its eval)
    if is_best:
        atomic_save(sealed(best_weights(state)), run_dir / BEST)
    tmp = _temp_path(last)
    _write_synced(state, tmp)
    # The old last.pt was complete when written (only whole files ever get that name): keep it as
    # the fallback, unless it is known or found to be bad since. A kill between these two renames
    # leaves last.prev.pt + a complete temp file; load_checkpoint falls back to last.prev.pt.
    if rotate and last.exists() and _zip_readable(last):
        os.replace(last, previous)
    os.replace(tmp, last)
    _fsync_dir(run_dir)
    return last


def _zip_readable(path: Path) -> bool:
    """A cheap look at a checkpoint (its zip directory, at the end of the file): False for one cut
    short or overwritten. It reads kilobytes, not the file; the digest check on load is the full one."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Load one checkpoint file onto the CPU; CheckpointError if it is missing, truncated or not ours.
    mmap: map the tensors instead of reading them (~0.03 s instead of ~1 s for AlexNet's): for
    reading what a checkpoint is (model/identity.py), not its weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only=False: the checkpoint holds RNG states and the config (our own files only).
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # truncated zip, flipped bytes, not a torch file: all "unreadable"
        msg = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__   # torch's first sentence
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged or truncated ({msg})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS) \
            or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an alexnet-fast checkpoint")
    # files written before digests have none: they get torch.load's checks only
    if "digest" in state and content_digest(state) != state["digest"]:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged (its contents no longer match the sha256 "
                              f"written with it)")
    return state


def load_checkpoint(path_or_run_dir: str | Path, warn: Callable[[str], None] | None = None,
                    mmap: bool = False) -> tuple[dict, Path]:
    """A checkpoint file, or a run directory's newest good one: last.pt, else (with a warning)
    last.prev.pt. Returns (state, the path it came from). The warning goes to `warn` (commands
    print it as one line) or, without it, to Python's warnings."""
    target = Path(path_or_run_dir)
    if not target.is_dir():
        return read_checkpoint(target, mmap), target
    candidates = [target / LAST, target / PREVIOUS]
    errors = []
    for candidate in candidates:
        if not candidate.exists():
            errors.append(f"{candidate.name} missing")
            continue
        try:
            state = read_checkpoint(candidate, mmap)
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
    best = _intact_best(target)
    raise CheckpointError(f"no usable checkpoint in {str(target)!r}: {'; '.join(errors)}"
                          + (f"; {best} is intact (the weights of the best epoch, no optimizer state)" if best else ""),
                          intact_best=best)


def _intact_best(run_dir: Path) -> Path | None:
    """RUN/best.pt if it exists and passes every check, else None."""
    try:
        read_checkpoint(run_dir / BEST)
    except CheckpointError:
        return None
    return run_dir / BEST


def load_weights(path: str | Path, arch: str, num_classes: int, classes: list[str] | None) -> dict:
    """The model state_dict of a checkpoint file (best.pt, last.pt, ...) for `--init-from`;
    CheckpointError (one line) if it is unusable or holds another network or class list."""
    state = read_checkpoint(path)
    if state["arch"] != arch or state["num_classes"] != num_classes:
        raise CheckpointError(f"{str(path)!r} holds {state['arch']} with {state['num_classes']} classes, "
                              f"not {arch} with {num_classes}")
    if classes and state.get("classes") and list(state["classes"]) != list(classes):
        raise CheckpointError(f"{str(path)!r} was trained on another class list than this shard set's")
    return state["model"]


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
