"""Two-process DDP over gloo (the CPU twin of the NCCL run), started by a real `torchrun`, the way a
multi-node job starts the trainer: the workers join the process group from the environment.

Fair comparison with one process: the two ranks each take half of every global batch, so after the
all-reduce (a mean of the two half-batch mean gradients = the full-batch mean gradient) they must
take the same SGD steps as one process fed the whole batch. Dropout is switched off (dropout=0.0):
with it, each rank would draw its own masks from its own RNG stream, and no single-process run could
reproduce those masks, so the comparison would test the RNG instead of DDP. What remains differs
only by float summation order (gloo's reduction, thread counts), hence allclose, not equal — while
the two replicas, which apply the identical averaged gradient, must be bitwise equal.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent('''
    import sys, torch
    from alexnet_fast.model import distributed as D
    from alexnet_fast.model.alexnet import build_model
    from alexnet_fast.model.config import TrainConfig
    from alexnet_fast.model.train import Engine, TrainState, make_optimizer, seed_everything, train_one_epoch

    out, compression = sys.argv[1], sys.argv[2]   # compression: "none" (bf16 needs NCCL)
    assert D.under_launcher()
    ctx = D.setup("cpu")                                   # joins the group torchrun described
    assert ctx.world_size == 2
    seed_everything(0)
    model = build_model("alexnet-owt", 4, dropout=0.0)
    optimizer = make_optimizer(TrainConfig(lr=0.01), model)
    engine = Engine(D.wrap_ddp(model, ctx, compression), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                    None, ctx.device)
    g = torch.Generator().manual_seed(123)
    batches = [(torch.randn(4, 3, 227, 227, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]
    half = slice(2 * ctx.rank, 2 * ctx.rank + 2)
    result = train_one_epoch(engine, [(x[half], y[half]) for x, y in batches], TrainState(),
                             world_size=ctx.world_size, log_every=1)
    torch.save({"state": model.state_dict(), "losses": result.losses}, f"{out}/rank{ctx.rank}.pt")
    D.teardown()
''')


def _single_process_run():
    from alexnet_fast.model.alexnet import build_model
    from alexnet_fast.model.config import TrainConfig
    from alexnet_fast.model.train import Engine, TrainState, make_optimizer, seed_everything, train_one_epoch

    seed_everything(0)
    model = build_model("alexnet-owt", 4, dropout=0.0)
    engine = Engine(model, make_optimizer(TrainConfig(lr=0.01), model), torch.amp.GradScaler("cpu", enabled=False),
                    None, torch.device("cpu"))
    g = torch.Generator().manual_seed(123)
    batches = [(torch.randn(4, 3, 227, 227, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]
    result = train_one_epoch(engine, batches, TrainState(), log_every=1)
    return model.state_dict(), result.losses


def _torchrun(tmp_path, compression: str = "none") -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(tmp_path), compression],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture(scope="module")
def single_run():
    return _single_process_run()


def test_two_rank_ddp_matches_one_process_with_the_doubled_batch(tmp_path, single_run):
    rank0, rank1 = _torchrun(tmp_path, "none")
    for key in rank0["state"]:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), f"replicas differ in {key}"
    assert rank0["losses"] == rank1["losses"]          # logged losses are all-reduced means
    single_state, single_losses = single_run
    assert rank0["losses"] == pytest.approx(single_losses, rel=1e-5)
    initial = _initial_state()
    for key, value in single_state.items():
        moved = (value - initial[key]).norm()
        assert moved > 0, key                           # three steps changed every tensor...
        # ...and the DDP run lands on the same weights, up to summation-order noise far below the step
        assert (rank0["state"][key] - value).norm() < 1e-2 * moved, key


def _initial_state() -> dict:
    from alexnet_fast.model.alexnet import build_model
    from alexnet_fast.model.train import seed_everything

    seed_everything(0)
    return build_model("alexnet-owt", 4, dropout=0.0).state_dict()
