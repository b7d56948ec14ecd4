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
    from alexnet_fast.model.optim import make_optimizer
    from alexnet_fast.model.loop import Engine, TrainState, train_one_epoch
    from alexnet_fast.model.runtime import seed_everything

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
    # evaluation over the real val split, each rank reading its own part (batch 3: ragged last batch)
    from alexnet_fast.model.evaluate import evaluate
    from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader
    val = make_loader(LoaderSpec(data=sys.argv[3], split="val", batch_size=3, rank=ctx.rank, world_size=2,
                                 workers=1))
    metrics = evaluate(model, val)                          # all-reduced over both ranks
    seen = [int(label) for _, labels in val for label in labels]
    torch.save({"state": model.state_dict(), "losses": result.losses, "eval": metrics.as_dict(),
                "labels": seen, "num_samples": val.num_samples}, f"{out}/rank{ctx.rank}.pt")
    D.teardown()
''')

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


def _single_process_run():
    from alexnet_fast.model.alexnet import build_model
    from alexnet_fast.model.config import TrainConfig
    from alexnet_fast.model.optim import make_optimizer
    from alexnet_fast.model.loop import Engine, TrainState, train_one_epoch
    from alexnet_fast.model.runtime import seed_everything

    seed_everything(0)
    model = build_model("alexnet-owt", 4, dropout=0.0)
    engine = Engine(model, make_optimizer(TrainConfig(lr=0.01), model), torch.amp.GradScaler("cpu", enabled=False),
                    None, torch.device("cpu"))
    g = torch.Generator().manual_seed(123)
    batches = [(torch.randn(4, 3, 227, 227, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]
    result = train_one_epoch(engine, batches, TrainState(), log_every=1)
    return model.state_dict(), result.losses


def _torchrun(tmp_path, shards, compression: str = "none") -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(tmp_path), compression, str(shards)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture(scope="module")
def single_run():
    return _single_process_run()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, shard_set):
    """rank 0's and rank 1's saved results of one torchrun."""
    return _torchrun(tmp_path_factory.mktemp("ddp"), shard_set)


def test_two_rank_ddp_matches_one_process_with_the_doubled_batch(two_rank_run, single_run):
    rank0, rank1 = two_rank_run
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
    from alexnet_fast.model.runtime import seed_everything

    seed_everything(0)
    return build_model("alexnet-owt", 4, dropout=0.0).state_dict()


def test_two_rank_evaluation_counts_every_val_image_once(two_rank_run, shard_set):
    """Each rank evaluates its own part of the val split; the all-reduced counts must equal one
    process evaluating the same weights over the whole split."""
    from alexnet_fast.model.alexnet import build_model
    from alexnet_fast.model.evaluate import evaluate
    from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader
    from alexnet_fast.pipeline.shardset import ShardSet

    rank0, rank1 = two_rank_run
    total = ShardSet.open(shard_set).num_samples("val")
    assert rank0["num_samples"] + rank1["num_samples"] == total == 16
    assert rank0["eval"] == rank1["eval"] and rank0["eval"]["images"] == total
    whole = make_loader(LoaderSpec(data=str(shard_set), split="val", batch_size=5, workers=1))
    all_labels = [int(label) for _, labels in whole for label in labels]
    assert sorted(rank0["labels"] + rank1["labels"]) == sorted(all_labels)
    model = build_model("alexnet-owt", 4, dropout=0.0)
    model.load_state_dict(rank0["state"])
    assert evaluate(model, whole).as_dict() == rank0["eval"]
