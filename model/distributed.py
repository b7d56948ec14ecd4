"""Processes, ranks and devices: one process per GPU (NCCL) or N CPU processes (gloo).

Three ways a training run starts, and the same worker code runs in each:

* `alexnet-fast train --gpus 2` (or `--device cpu --nproc 2`): the command launches its own
  workers through torch.distributed's elastic launcher (what `torchrun --standalone` does), one
  per GPU, and waits for them.
* `torchrun --nnodes 4 --nproc-per-node 8 ... -m alexnet_fast.tools.cli train ...`: the outer
  launcher has set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; the command sees them and just joins.
* one device, one process: no process group at all.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose. Its functions take `group=group.WORLD` as
# a default argument, evaluated when the module is first imported; torch.optim imports torch._dynamo,
# which imports it, so a trainer that joined its group first (every rank: the optimizer is built
# after `setup`) had its world group captured there. `destroy_process_group` then freed nothing:
# gloo's threads lived on into interpreter shutdown, where the group's late destructor sometimes
# aborted the process after a clean run ("terminate called without an active exception", SIGABRT).
# Imported first, the defaults are None. tests/test_stop_agreement.py checks no gloo thread outlives
# `teardown`.
import torch.distributed.nn.functional  # noqa: F401
from torch import nn

from alexnet_fast.pipeline.host import long_lived_objects_frozen


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1        # ranks on this node (they share its cores)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SELF_LAUNCHED = "ALEXNET_FAST_SELF_LAUNCHED"
Result = TypeVar("Result")


def run_ranks(worker: Callable[[Any, DistContext], Result], cfg: Any, *, device: str, gpus: int = 0,
              nproc: int = 1) -> Result:
    """Run `worker(cfg, ctx)` on every rank of this job: in this process (one device), in the
    workers this starts (`gpus` GPUs, or `nproc` CPU processes), or as one rank of an outer
    torchrun. Returns rank 0's result (under an outer torchrun: this rank's).

    A user error (model.errors.user_errors) in one process propagates as itself; in a rank of a
    multi-process run it ends that rank at once through `exit_failed`, so the launcher stops the
    others and the command prints the rank's message in one line."""
    device = resolve_device(device)
    if under_launcher():
        return run_rank(worker, cfg, device)
    ranks = local_world_size(device, gpus, nproc)
    if ranks <= 1:
        return run_rank(worker, cfg, device)
    return launch(run_rank, ranks, (worker, cfg, device))[0]


def run_rank(worker: Callable[[Any, DistContext], Result], cfg: Any, device: str) -> Result:
    """One rank: join the process group, run the worker, leave the group."""
    from alexnet_fast.model.errors import user_errors

    try:
        ctx = setup(device)
    except Exception as e:
        if lost_contact(e):     # e.g. rank 0 refused the run (RUN in use) and its node's store went away
            exit_failed(f"rank {os.environ.get('RANK', 0)}: could not join the other ranks ({transport_reason(e)}): "
                        "a process of this run ended before joining; its node's log says why")
        raise
    try:
        with long_lived_objects_frozen():   # a cheap per-epoch garbage collection: see there
            return worker(cfg, ctx)
    except user_errors() as e:
        if ctx.is_distributed:
            # The other ranks may be waiting in a collective this rank will never join (a corrupt
            # sample or a failed checkpoint write happens on one rank only): under NCCL they would
            # sit out the 10-minute watchdog timeout. A worker that exits non-zero makes the
            # launcher (ours or torchrun) stop the whole group now. An error relayed from another
            # rank (evaluate shares the first failure) names the rank it happened on.
            exit_failed(f"rank {getattr(e, 'origin_rank', ctx.rank)}: {e}")
        raise
    except Exception as e:
        if ctx.is_distributed and lost_contact(e):
            # Another rank died (SIGKILL, out of memory, its node went away): the collective this
            # rank waited in failed. Under a multi-node torchrun this rank's node knows nothing
            # else about it, so say so in one line rather than a traceback of the DDP hook. Under
            # our own launcher, first give it a moment to see the rank that failed first-hand: it
            # reports the failures it sees at one poll, and this rank's consequence must not be
            # the only one there (it stops this process meanwhile, which is what should happen).
            # Under an outer torchrun, say it at once: this node's agent may go down with the
            # rendezvous store of the dead rank's node, taking this process and its line along.
            if os.environ.get(SELF_LAUNCHED):
                time.sleep(LOST_CONTACT_GRACE_S)
            exit_failed(f"rank {ctx.rank}: {LOST_CONTACT} ({transport_reason(e)}): a process of "
                        "this run died or its node went away; that node's log says why")
        raise
    finally:
        teardown()


# How a rank reports that a peer is gone: a consequence, never the cause (tools/common.worker_failure
# names the rank that failed first-hand when there is one).
LOST_CONTACT = "lost contact with another rank"
LOST_CONTACT_GRACE_S = 3.0      # vs the launcher's 0.2 s monitor interval (launch())


def lost_contact(error: BaseException) -> bool:
    """Did a collective fail because a peer is gone? torch's DistError family (NCCL, the store) or
    gloo's transport error, which reaches Python as a plain RuntimeError naming gloo/transport."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo/transport" in str(error))


def transport_reason(error: BaseException) -> str:
    """The first sentence of a transport error, without gloo's "[file.cc:line] " prefix."""
    import re

    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0] if str(error).strip() else "")
    return text.split(". ")[0].rstrip(".") or type(error).__name__


def launched_by_us() -> bool:
    """True in a worker our own launcher (`launch`) started: the command above it reports the run."""
    return under_launcher() and bool(os.environ.get(SELF_LAUNCHED))


def leave_after_stop() -> None:
    """In a worker our own launcher spawned, after a stop by signal with the checkpoint written:
    exit now. The launcher is shutting down and waits for the workers to exit, not for their
    return values (the normal hand-back would block until its 30 s kill timeout)."""
    if launched_by_us():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def under_launcher() -> bool:
    """True inside a worker started by torchrun / the elastic launcher (ours or an outer one)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def local_world_size(device: str, gpus: int, nproc: int) -> int:
    """How many workers this node should run: --gpus (0 = all visible) on GPU, --nproc on CPU."""
    if device == "cuda":
        visible = torch.cuda.device_count()
        return visible if gpus == 0 else gpus
    return nproc


def setup(device: str) -> DistContext:
    """Join the process group the launcher described in the environment (NCCL on GPU, gloo on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if device == "cuda":
            dist.init_process_group("nccl", device_id=torch_device)
        else:
            dist.init_process_group("gloo")
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return DistContext(rank, local_rank, world_size, torch_device, local_world_size)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(entrypoint: Callable[..., Any], nproc: int, args: tuple = ()) -> dict[int, Any]:
    """Run `entrypoint(*args)` in `nproc` local worker processes, as `torchrun --standalone
    --nproc-per-node nproc` would: a c10d rendezvous on a free localhost port, no restarts.
    Returns {local rank: return value}; raises the launcher's ChildFailedError if a worker fails,
    and SignalException if this process is told to stop (the workers get the signal first)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:
        # N processes each using every core would oversubscribe the CPU N times over.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # A failed worker is reported in one line by the command (tools/cmd_train.py worker_failure);
    # the launcher's own log of it is a traceback of its polling code, not of the worker.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)   # "Terminating process ..."
    # A stop by signal is reported in one line by the command too; the agent's "Received 2 death
    # signal, shutting down workers" would be a second one, written into a live progress bar.
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.ERROR)
    # A worker that died (SIGKILL, or exit_failed's os._exit) leaves its semaphores to Python's
    # resource tracker, which then warns about the "leak" at exit; it inherits -W options from here.
    if "ignore:resource_tracker:UserWarning" not in sys.warnoptions:
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc,
        run_id=f"alexnet-fast-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",
        max_restarts=0, monitor_interval=0.2, start_method="spawn",
    )
    # The workers inherit it (our command reports their errors); set only while they are started
    # and run, so a process that launched once (a test) does not pass it on to an outer torchrun
    previous = os.environ.get(SELF_LAUNCHED)
    os.environ[SELF_LAUNCHED] = "1"
    try:
        return elastic_launch(config, entrypoint)(*args)
    finally:
        if previous is None:
            os.environ.pop(SELF_LAUNCHED, None)
        else:
            os.environ[SELF_LAUNCHED] = previous


def exit_failed(message: str) -> None:
    """End this worker now with exit code 1, its error in the launcher's error file (torchelastic's
    TORCHELASTIC_ERROR_FILE, read back as the failure's message by our command) and on stderr
    when no command of ours reads it (an outer torchrun, or no launcher). os._exit: no
    collective, no atexit handler, nothing that could wait on the others."""
    import json
    import time

    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with open(error_file, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    if not error_file or not os.environ.get(SELF_LAUNCHED):   # torchrun: say it here too
        print(f"alexnet-fast: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def wrap_ddp(model: nn.Module, ctx: DistContext, grad_compression: str = "none") -> nn.Module:
    """DistributedDataParallel over the process group (identity for one process).

    grad_compression="bf16": gradients are cast to bfloat16 for the all-reduce and back (halves
    the bytes on the wire; bf16 keeps fp32's exponent range so no scaling is needed)."""
    if not ctx.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets instead of being copied
    # into them each step (saves ~240 MB and a copy for AlexNet's 61M parameters).
    ddp = DDP(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
              gradient_as_bucket_view=True)
    if grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(state=None, hook=default_hooks.bf16_compress_hook)
    elif grad_compression != "none":
        raise ValueError(f"unknown grad_compression {grad_compression!r}")
    return ddp


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] for one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
