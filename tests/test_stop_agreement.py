"""Ranks agree to stop at the same step without a blocking read (model/loop.py StopAgreement),
over a real 2-process gloo group; and the optimizer the trainer builds on a GPU is torch's fused SGD."""
from __future__ import annotations

import faulthandler
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from alexnet_fast.model import distributed as D
from alexnet_fast.model.config import TrainConfig
from alexnet_fast.model.loop import Engine, LoopHooks, StopAgreement, TrainState, train_one_epoch
from alexnet_fast.model.optim import make_optimizer


# (checks every N steps, rank 1 asked to stop from this step on, steps in the epoch)
SCENARIOS = [(1, 3, 20), (4, 5, 20), (1, 10**9, 20),
             (10, 1, 4)]        # an epoch shorter than the interval (a GPU run's 10 on a small set)


def _engine() -> Engine:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    return Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False),
                  None, torch.device("cpu"))


def _epoch(agreement: StopAgreement, steps: int, requested) -> tuple[str, int, bool]:
    """One epoch of `steps` steps; (outcome, steps taken, stop agreed at the epoch's end)."""
    batches = [(torch.randn(2, 8), torch.tensor([0, 1])) for _ in range(steps)]
    state = TrainState()
    hooks = LoopHooks(stop_requested=lambda: requested(state.step), stop_agreement=agreement)
    result = train_one_epoch(_engine(), batches, state, world_size=2, log_every=100, hooks=hooks)
    return result.outcome.value, state.step, result.stop_after


def _threads() -> list[str]:
    """The names of this process's threads (Linux)."""
    return sorted(path.read_text().strip() for path in Path("/proc/self/task").glob("*/comm"))


def _rank(rank: int, store_path: str, out: dict) -> None:
    faulthandler.enable(all_threads=True)      # an abort prints where each thread was
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    for every, request_at, steps in SCENARIOS:
        agreement = StopAgreement(torch.device("cpu"), every)
        # only rank 1 is asked to stop (a SIGTERM reaches one process first), from `request_at` on
        out[(rank, every, request_at)] = _epoch(agreement, steps, lambda step: rank == 1 and step >= request_at)
        agreement.drain()
    # the flag posted is one tensor, filled in place at every check: its storage never changes
    agreement = StopAgreement(torch.device("cpu"), 1)
    where = agreement.flag.data_ptr()
    answers = [agreement.check(rank == 1 and i == 2) for i in range(5)]
    out[(rank, "reused")] = (answers, agreement.flag.data_ptr() == where)
    agreement.drain()           # the last check's all-reduce is still in flight (as the trainer drains it)
    dist.barrier()              # neither process leaves while the other still talks to it
    D.teardown()
    # the group is really gone: no gloo thread lives on into interpreter shutdown (a group kept
    # alive by a captured reference was destroyed there, late, and sometimes aborted the process)
    out[(rank, "threads")] = [name for name in _threads() if "gloo" in name]


def test_ranks_stop_at_the_same_step_one_check_after_the_request(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "store"), out), nprocs=2)
        out = dict(out)
    for rank in (0, 1):
        # checked every step: requested at step 3, posted at that check, read (and obeyed) at step 4
        assert out[(rank, 1, 3)] == ("stopped", 4, False)
        # checked every 4 steps (a GPU run): requested at step 5, posted at step 8, obeyed at step 12
        assert out[(rank, 4, 5)] == ("stopped", 12, False)
        # never asked: the whole epoch
        assert out[(rank, 1, 10**9)] == ("completed", 20, False)
        # every 10 steps, 4 steps an epoch: never due inside it; the epoch's end agrees at once
        assert out[(rank, 10, 1)] == ("completed", 4, True)
        # the same device flag every check, and the answers of a reused flag are still right:
        # rank 1's request at the 3rd check is the agreed answer at the 4th, on both ranks
        assert out[(rank, "reused")] == ([False, False, False, True, False], True)
        assert out[(rank, "threads")] == [], out[(rank, "threads")]


def test_one_process_checks_every_step_whatever_the_interval():
    """No process group: answering is free (no collective), so the GPU interval does not apply."""
    assert _epoch(StopAgreement(torch.device("cpu"), every=10), 20, lambda step: step >= 3)[:2] == ("stopped", 3)
    # and at the end of an epoch shorter than the interval too
    assert _epoch(StopAgreement(torch.device("cpu"), every=10), 4, lambda step: step >= 4) == ("stopped", 4, False)


def test_the_gpu_optimizer_is_torchs_fused_sgd():
    """One kernel launch updates every parameter on a GPU; the CPU keeps the default (foreach) path.
    torch 2.13 accepts fused=True for CPU tensors too, so the GPU's choice can be checked here."""
    model = nn.Linear(8, 4)
    assert make_optimizer(TrainConfig(), model, "cuda").defaults["fused"] is True
    assert not make_optimizer(TrainConfig(), model, "cpu").defaults["fused"]
