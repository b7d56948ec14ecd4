"""Ranks agree to stop at the same step without a blocking read (model/loop.py StopAgreement),
over a real 2-process gloo group; and the optimizer the trainer builds on a GPU is torch's fused SGD."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from alexnet_fast.model.config import TrainConfig
from alexnet_fast.model.loop import Engine, LoopHooks, Outcome, StopAgreement, TrainState, train_one_epoch
from alexnet_fast.model.optim import make_optimizer


# (checks every N steps, rank 1 asked to stop from this step on): one epoch of 20 steps each
SCENARIOS = [(1, 3), (4, 5), (1, 10**9)]


def _rank(rank: int, store_path: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    for every, request_at in SCENARIOS:
        torch.manual_seed(0)
        model = nn.Linear(8, 4)
        engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"))
        batches = [(torch.randn(2, 8), torch.tensor([0, 1])) for _ in range(20)]
        state = TrainState()
        # only rank 1 is asked to stop (a SIGTERM reaches one process first), from `request_at` on
        hooks = LoopHooks(stop_requested=lambda: rank == 1 and state.step >= request_at,
                          stop_agreement=StopAgreement(torch.device("cpu"), every))
        result = train_one_epoch(engine, batches, state, world_size=2, log_every=100, hooks=hooks)
        hooks.stop_agreement.drain()
        out[(rank, every, request_at)] = (result.outcome.value, state.step)
    dist.barrier()              # neither process leaves while the other still talks to it
    dist.destroy_process_group()


def test_ranks_stop_at_the_same_step_one_check_after_the_request(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "store"), out), nprocs=2)
        out = dict(out)
    for rank in (0, 1):
        # checked every step: requested at step 3, posted at that check, read (and obeyed) at step 4
        assert out[(rank, 1, 3)] == ("stopped", 4)
        # checked every 4 steps (a GPU run): requested at step 5, posted at step 8, obeyed at step 12
        assert out[(rank, 4, 5)] == ("stopped", 12)
        # never asked: the whole epoch
        assert out[(rank, 1, 10**9)] == ("completed", 20)


def test_the_gpu_optimizer_is_torchs_fused_sgd():
    """One kernel launch updates every parameter on a GPU; the CPU keeps the default (foreach) path.
    torch 2.13 accepts fused=True for CPU tensors too, so the GPU's choice can be checked here."""
    model = nn.Linear(8, 4)
    assert make_optimizer(TrainConfig(), model, "cuda").defaults["fused"] is True
    assert not make_optimizer(TrainConfig(), model, "cpu").defaults["fused"]
