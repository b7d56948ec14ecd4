"""Two ranks on one GPU (gloo), against the same two ranks on the CPU: what a multi-GPU run does per
rank, checked on the one GPU a device check has.

Each rank runs the trainer's own pieces (model.runtime's network placement and loader spec, DDP,
train_one_epoch with the DALI loader, the Checkpointer's gather) on `DistContext.device`. Both
ranks sit on cuda:0 while rank 1's local rank is 1, so anything that takes the local rank for the
device index (the loader's `device_id`, DDP's `device_ids`) fails here instead of on the first
multi-GPU node. Asserted against the CPU twin (DALI `device_id=None`, torch on the CPU):
- DALI's per-rank sharding: each rank reads the same samples in the same order on both devices,
  and the two ranks' samples are disjoint;
- placement: every rank's weights and batches are on its device;
- the checkpoint gather: rank 0's checkpoint holds both ranks' loader and RNG states, positioned at
  the same batch as the twin's;
- DDP: both ranks end with bit-identical weights; the logged losses are the twin's within
  LOSS_TOL.

LOSS_TOL: the GPU decoder's chroma upsampling differs from the CPU twin's by a few levels
(test_dali_gpu.py CHROMA_*), and cuDNN's convolutions use TF32 by default; from the same weights on
the same samples the mean cross-entropy (~log 8 = 2.08 here) of a few fp32 steps moves by far less
than this. A rank reading another rank's samples, or gradients that were not averaged, shows up in
the exact checks above first.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu(dali=True)

LOSS_TOL = 0.05
STEPS = 4
PER_RANK_BATCH = 8


def _rank(rank: int, device: str, data: str, store: str, run_dir: str, results) -> None:
    import torch.distributed as dist

    from alexnet_fast.model import checkpoint as ckpt
    from alexnet_fast.model import distributed as D
    from alexnet_fast.model.config import TrainConfig
    from alexnet_fast.model.loop import Engine, LoopHooks, TrainState, train_one_epoch
    from alexnet_fast.model.optim import make_optimizer
    from alexnet_fast.model.runtime import loader_spec, place_network, seed_everything
    from alexnet_fast.model.train import Checkpointer
    from alexnet_fast.pipeline.loaders import make_loader
    from alexnet_fast.pipeline.shardset import ShardSet

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        on = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        ctx = D.DistContext(rank=rank, local_rank=rank, world_size=2, device=on, local_world_size=2)
        shards = ShardSet.open(data)
        spec = loader_spec("train", data=data, kind="dali", batch_size=PER_RANK_BATCH, ctx=ctx, precision="fp32",
                           channels_last=True, scale_by_std=True, on_corrupt="error", workers=2, seed=0)
        loader = make_loader(spec, shards)
        loader.with_params = True
        loader.set_epoch(0)
        seed_everything(0)
        model = place_network("alexnet-owt", shards.num_classes, ctx.device, channels_last=True, dropout=0.0)
        optimizer = make_optimizer(TrainConfig(arch="alexnet-owt", lr=0.005, dropout=0.0), model, ctx.device)
        objects = ckpt.RunObjects(model, optimizer, None, None, torch.amp.GradScaler(on.type, enabled=False))
        engine = Engine(D.wrap_ddp(model, ctx), optimizer, objects.scaler, None, ctx.device, "fp32", True)
        names, batch_devices = [], set()

        def batches():
            for x, y, batch_names, _params in loader:
                names.extend(batch_names)
                batch_devices.add(str(x.device))
                yield x, y

        state, logged = TrainState(), []
        train_one_epoch(engine, batches(), state, world_size=2, max_steps=STEPS, log_every=1,
                        hooks=LoopHooks(log=logged.append))
        identity = ckpt.RunIdentity({}, "alexnet-owt", shards.num_classes, shards.classes, 2)
        checkpoints = Checkpointer(ctx, run_dir, objects, identity, loader)
        checkpoints.save(state)
        checkpoints.finish()
        weights = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
        results[rank] = {"names": names, "losses": [r["loss"] for r in logged], "device_id": spec.device_id,
                         "batch_devices": sorted(batch_devices),
                         "weight_devices": sorted({str(p.device) for p in model.parameters()}),
                         "weights": weights.numpy().tobytes()}
        dist.barrier()          # neither leaves while the other still talks to it
    finally:
        dist.destroy_process_group()


def _two_ranks(device: str, data, tmp_path) -> tuple[dict, dict]:
    """({rank: what it saw}, rank 0's checkpoint) of a two-rank run on `device`."""
    import torch.multiprocessing as mp

    run_dir = tmp_path / f"run-{device}"
    run_dir.mkdir()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(device, str(data), str(tmp_path / f"store-{device}"), str(run_dir), results), nprocs=2)
        results = dict(results)
    saved = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    return results, saved


def _position(loader_state: dict) -> tuple:
    """Where a rank's loader stood, without the parts that differ by device by design (ROI decoding
    is the CPU decoder's default only; DALI's own checkpoint bytes name its operators)."""
    fingerprint = {k: v for k, v in loader_state["fingerprint"].items() if k != "decode_roi"}
    return loader_state["epoch"], loader_state["batches"], fingerprint


def test_two_ranks_on_one_gpu_match_the_cpu_twin(gpu_shards, tmp_path):
    gpu, gpu_saved = _two_ranks("cuda", gpu_shards, tmp_path)
    cpu, cpu_saved = _two_ranks("cpu", gpu_shards, tmp_path)
    assert sorted(gpu) == sorted(cpu) == [0, 1]
    for rank in (0, 1):
        assert gpu[rank]["device_id"] == 0, "rank 1's loader asked for its local rank, not its device"
        assert gpu[rank]["batch_devices"] == gpu[rank]["weight_devices"] == ["cuda:0"]
        assert gpu[rank]["names"] == cpu[rank]["names"], f"rank {rank} read other samples on the GPU"
        assert len(gpu[rank]["names"]) == STEPS * PER_RANK_BATCH
        worst = max(abs(a - b) for a, b in zip(gpu[rank]["losses"], cpu[rank]["losses"]))
        assert len(gpu[rank]["losses"]) == STEPS and worst <= LOSS_TOL, (gpu[rank]["losses"], cpu[rank]["losses"])
    assert not set(gpu[0]["names"]) & set(gpu[1]["names"]), "two ranks read the same sample"
    assert gpu[0]["weights"] == gpu[1]["weights"], "DDP left the two ranks with different weights"
    for saved in (gpu_saved, cpu_saved):
        assert saved["step"] == STEPS and len(saved["rng"]) == len(saved["loader"]) == 2
        assert [s["fingerprint"]["rank"] for s in saved["loader"]] == [0, 1]
    assert [_position(s) for s in gpu_saved["loader"]] == [_position(s) for s in cpu_saved["loader"]]
    assert all(s["dali"] for s in gpu_saved["loader"]), "a rank's DALI checkpoint was not gathered"

