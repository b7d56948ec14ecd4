"""The training loop, schedules, config resolution and checkpoint files, driven with in-memory
tensors (no loader, no subprocess): fast and exact."""
from __future__ import annotations

import dataclasses
import gc
import json
import pickle
import random
import weakref
import zipfile

import numpy as np
import pytest
import torch

from alexnet_fast.model import checkpoint as ckpt
from alexnet_fast.model import distributed as D
from alexnet_fast.model.alexnet import build_model
from alexnet_fast.model.config import ConfigError, TrainConfig, resolve_config
from alexnet_fast.model.optim import make_optimizer, make_schedulers
from alexnet_fast.model.errors import TrainingError
from alexnet_fast.model.loop import Engine, LoopHooks, Outcome, TrainState, train_one_epoch


def _engine(lr: float = 0.01, arch: str = "alexnet-owt") -> Engine:
    torch.manual_seed(0)
    model = build_model(arch, 4, dropout=0.0)
    cfg = TrainConfig(arch=arch, lr=lr)
    return Engine(model, make_optimizer(cfg, model), torch.amp.GradScaler("cpu", enabled=False), None,
                  torch.device("cpu"))


def _batches(n: int, batch: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 227, 227, generator=g), torch.randint(0, 4, (batch,), generator=g))
            for _ in range(n)]


def test_nan_loss_stops_naming_the_step_and_saves_nothing_after_it():
    batches = _batches(5)
    batches[2][0][0, 0, 0, 0] = float("nan")          # the 3rd step's loss is NaN
    saved_at = []
    state = TrainState()
    engine = _engine()
    hooks = LoopHooks(checkpoint=lambda: saved_at.append(state.step))
    with pytest.raises(TrainingError, match="NaN/inf at step 3"):
        train_one_epoch(engine, batches, state, log_every=100, ckpt_every=2, hooks=hooks)
    assert saved_at == [2]                             # the step-4 checkpoint was refused


def test_resumed_epoch_counts_on_from_the_saved_batch():
    state = TrainState(epoch=0, step=7, step_in_epoch=2)
    logged = []
    # a resumed loader yields the rest of the epoch: batches 3 and 4 of 4
    result = train_one_epoch(_engine(), _batches(4)[2:], state, log_every=1,
                             hooks=LoopHooks(log=logged.append))
    assert result.outcome is Outcome.COMPLETED
    assert [r["step"] for r in logged] == [8, 9]
    assert (state.epoch, state.step, state.step_in_epoch) == (1, 9, 0)
    assert result.images == 4


def test_an_epoch_stopped_and_continued_reports_the_whole_epoch():
    """The epoch's sums live in the TrainState (and so in every checkpoint): an epoch stopped after
    3 of 5 steps, between two log points, and continued from its state reports the same mean loss
    and image count as the same epoch run in one go, bit for bit."""
    batches = _batches(5)
    whole = train_one_epoch(_engine(), batches, TrainState(), log_every=2)
    engine, state = _engine(), TrainState()
    stop_at_3 = LoopHooks(stop_requested=lambda: state.step >= 3)
    first = train_one_epoch(engine, batches, state, log_every=2, hooks=stop_at_3)
    assert first.outcome is Outcome.STOPPED and state.tally.window_steps == 1   # step 3: after the step-2 log point
    state.tally = ckpt.EpochTally(**json.loads(json.dumps(dataclasses.asdict(state.tally))))   # as a checkpoint has it
    rest = train_one_epoch(engine, batches[3:], state, log_every=2)
    assert rest.outcome is Outcome.COMPLETED
    assert (rest.mean_loss, rest.images) == (whole.mean_loss, whole.images) == (rest.mean_loss, 10)
    assert state.tally == ckpt.EpochTally()         # the next epoch starts from nothing


def test_stop_request_ends_the_epoch_at_a_step_boundary():
    state = TrainState()
    hooks = LoopHooks(stop_requested=lambda: state.step >= 2)
    result = train_one_epoch(_engine(), _batches(5), state, log_every=100, hooks=hooks)
    assert result.outcome is Outcome.STOPPED
    assert (state.epoch, state.step, state.step_in_epoch) == (0, 2, 2)


def test_max_steps_stops_mid_epoch():
    state = TrainState(step=3)
    result = train_one_epoch(_engine(), _batches(5), state, max_steps=5, log_every=100)
    assert result.outcome is Outcome.MAX_STEPS
    assert (state.epoch, state.step, state.step_in_epoch) == (0, 5, 2)
    assert len(result.losses) == 1                     # the last step is always logged


def test_plateau_divides_lr_by_ten_at_most_three_times():
    cfg = TrainConfig(plateau_patience=0)
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(cfg, model)
    step_scheduler, plateau = make_schedulers(cfg, optimizer, steps_per_epoch=10)
    assert step_scheduler is None
    lrs = []
    for _ in range(8):                                 # val error never improves
        plateau.step(0.5)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert len(set(lrs)) == 4                          # 0.01 and three drops
    assert lrs[-1] == pytest.approx(1e-5)
    assert sorted(set(lrs), reverse=True) == pytest.approx([0.01, 1e-3, 1e-4, 1e-5])


def test_fast_recipe_scales_lr_warms_up_and_decays_by_cosine():
    cfg = resolve_config("fast", overrides={"batch_size": 512, "epochs": 4, "warmup_epochs": 1.0})
    assert cfg.effective_lr == pytest.approx(0.01 * 512 / 128)
    model = build_model("alexnet-owt", 4)
    optimizer = make_optimizer(cfg, model)
    # no weight decay on biases (1-D), decay on weights
    decays = {p.ndim > 1: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays == {True: 5e-4, False: 0.0}
    scheduler, plateau = make_schedulers(cfg, optimizer, steps_per_epoch=10)
    assert plateau is None
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(40):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    peak = cfg.effective_lr
    assert lrs[0] == pytest.approx(peak / 10)           # warm-up starts at 1/10 of the peak (10 steps)
    assert lrs[9] == pytest.approx(peak)                # ...and reaches it after one epoch
    assert lrs[10] == pytest.approx(peak)
    assert lrs[25] == pytest.approx(peak * 0.5, rel=1e-6)      # half-way through the 30 cosine steps
    assert lrs[40] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_config_layers_recipe_toml_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('recipe = "fast"\nbatch-size = 256\nlr = 1\n[train]\nepochs = 7\n')
    cfg = resolve_config("paper", toml, {"epochs": 3, "lr": None})
    assert (cfg.recipe, cfg.batch_size, cfg.epochs, cfg.lr, cfg.schedule) == ("fast", 256, 3, 1.0, "cosine")
    paper = resolve_config("paper")
    assert (paper.batch_size, paper.lr, paper.momentum, paper.weight_decay, paper.epochs, paper.schedule,
            paper.max_lr_drops) == (128, 0.01, 0.9, 5e-4, 90, "plateau", 3)
    toml.write_text("batch_size = 'big'\n")
    with pytest.raises(ConfigError, match="batch_size must be int") as bad_type:
        resolve_config("paper", toml)
    assert bad_type.value.field == "config"             # the command names --config
    toml.write_text("learning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        resolve_config("paper", toml)
    with pytest.raises(ConfigError, match="must be > 0") as bad_value:
        resolve_config("paper", overrides={"batch_size": 0})
    assert bad_value.value.field == "batch_size"        # the command names --batch-size


def test_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint({"model": {"w": torch.full((3,), float(step))}, "epoch": 0, "step": step,
                              "arch": "alexnet-owt", "num_classes": 4}, tmp_path, is_best=step == 1)
    assert {p.name for p in tmp_path.iterdir()} == {"last.pt", "last.prev.pt", "best.pt"}
    state, path = ckpt.load_checkpoint(tmp_path)
    assert (state["step"], path.name) == (2, "last.pt")
    assert ckpt.read_checkpoint(tmp_path / "best.pt")["step"] == 1
    # cut last.pt short, as a kill during a non-atomic copy or a full disk would
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="previous good checkpoint"):
        state, path = ckpt.load_checkpoint(tmp_path)
    assert (state["step"], path.name) == (1, "last.prev.pt")
    assert torch.equal(state["model"]["w"], torch.ones(3))
    (tmp_path / "last.prev.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.load_checkpoint(tmp_path)


def test_a_checkpoint_is_written_without_zip_crcs_and_reads_back_exactly(tmp_path):
    """Where torch can skip the zip format's per-record CRC-32 (>= 2.6) the checkpoint writer does
    (torch.load never checks it; the sha256 digest is the check), and puts the switch back after."""
    config = pytest.importorskip("torch.utils.serialization.config", reason="torch < 2.6 has no CRC switch")
    weights = torch.arange(1 << 16, dtype=torch.float32)
    ckpt.save_checkpoint({"model": {"w": weights}, "epoch": 0, "step": 1, "arch": "alexnet-owt", "num_classes": 4},
                         tmp_path)
    assert config.save.compute_crc32 is True                    # the process-wide default is back
    with zipfile.ZipFile(tmp_path / "last.pt") as archive:
        records = {info.filename.split("/", 1)[1]: info for info in archive.infolist()}
    assert records["data/0"].file_size == weights.numel() * 4 and records["data/0"].CRC == 0
    assert torch.equal(ckpt.read_checkpoint(tmp_path / "last.pt")["model"]["w"], weights)
    torch.save({"w": weights}, tmp_path / "plain.pt")          # torch.save elsewhere: CRCs as before
    with zipfile.ZipFile(tmp_path / "plain.pt") as archive:
        assert all(info.CRC != 0 for info in archive.infolist() if info.filename.endswith("data/0"))


def test_a_rank_runs_with_the_objects_alive_at_its_start_frozen_and_hands_them_back():
    """run_rank freezes what is alive when the run starts (a per-epoch gc.collect then walks only
    what the run made) and unfreezes it after: garbage among the frozen objects waits until then,
    garbage the run makes is collected during it."""
    class Node:
        pass

    assert gc.get_freeze_count() == 0
    before = Node()
    before.cycle = before
    before_ref = weakref.ref(before)

    def worker(cfg, ctx):
        nonlocal before
        frozen, before = gc.get_freeze_count(), None          # a cycle alive at the start, dropped now
        made = Node()
        made.cycle = made
        made_ref = weakref.ref(made)
        del made
        gc.collect()
        return frozen, before_ref() is not None, made_ref() is None

    frozen, kept_while_frozen, made_collected = D.run_rank(worker, None, "cpu")
    assert frozen > 1000 and kept_while_frozen and made_collected
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before_ref() is None


def test_a_bad_last_pt_is_never_rotated_over_the_good_previous_one(tmp_path):
    def save(step: int, **kwargs) -> None:
        ckpt.save_checkpoint({"model": {"w": torch.full((1 << 18,), float(step))}, "epoch": 0, "step": step,
                              "arch": "alexnet-owt", "num_classes": 4}, tmp_path, **kwargs)

    def steps() -> tuple[int, int]:
        return tuple(ckpt.read_checkpoint(tmp_path / name)["step"] for name in (ckpt.LAST, ckpt.PREVIOUS))

    save(1), save(2)
    data = bytearray((tmp_path / "last.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF                       # inside the tensor: torch.load reads it regardless
    (tmp_path / "last.pt").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="no longer match the sha256"):
        ckpt.read_checkpoint(tmp_path / "last.pt")
    save(3, rotate=False)                               # the run knows last.pt is bad: replaced, not kept
    assert steps() == (3, 1)
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:1000])   # cut short
    save(4)                                             # found unreadable: not rotated either
    assert steps() == (4, 1)
    save(5)
    assert steps() == (5, 4)


def test_failed_save_leaves_the_old_checkpoint_in_place(tmp_path):
    ckpt.save_checkpoint({"model": {}, "epoch": 0, "step": 1, "arch": "a", "num_classes": 1}, tmp_path)
    before = (tmp_path / "last.pt").read_bytes()
    # a local lambda cannot be pickled (AttributeError; PicklingError at module level): the write fails midway
    with pytest.raises((pickle.PicklingError, AttributeError), match="pickle"):
        ckpt.save_checkpoint({"model": {"bad": lambda: 0}, "epoch": 0, "step": 2, "arch": "a",
                              "num_classes": 1}, tmp_path)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not (tmp_path / "last.prev.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_rng_states_round_trip():
    state = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_saved_config_is_json(tmp_path):
    from alexnet_fast.model.config import save_config

    path = save_config(resolve_config("fast"), tmp_path, {"world_size": 2})
    saved = json.loads(path.read_text())
    assert saved["recipe"] == "fast" and saved["world_size"] == 2 and saved["batch_size"] == 1024


def test_the_first_checkpoint_copies_into_host_memory_made_while_the_epoch_trained(shard_set, tmp_path):
    """Checkpointer.prepare (LoopHooks.settled, after the epoch's 2nd step) makes the host copy's
    buffers on the writer's thread; the first save then copies into them (no allocation on the
    epoch boundary) and writes the trained weights."""
    from alexnet_fast.model import distributed as D
    from alexnet_fast.model.train import Checkpointer
    from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader

    engine = _engine()
    objects = ckpt.RunObjects(engine.model, engine.optimizer, None, None, engine.scaler)
    identity = ckpt.RunIdentity({}, "alexnet-owt", 4, ["a", "b", "c", "d"], 1)
    loader = make_loader(LoaderSpec(data=str(shard_set), kind="baseline", batch_size=2, workers=1))
    checkpoints = Checkpointer(D.DistContext(0, 0, 1, torch.device("cpu")), tmp_path, objects, identity, loader)
    state = TrainState()
    train_one_epoch(engine, _batches(3), state, log_every=100, hooks=LoopHooks(settled=checkpoints.prepare))
    made = checkpoints.host_copy
    assert made is not None and set(made) == {"model", "optimizer"}
    assert len(made["optimizer"]["state"]) == len(list(engine.model.parameters()))   # the momentum too
    checkpoints.save(state)
    checkpoints.finish()
    copied = checkpoints.host_copy
    for name, weight in engine.model.state_dict().items():
        assert copied["model"][name].data_ptr() == made["model"][name].data_ptr()
        assert torch.equal(copied["model"][name], weight)
    for index, buffers in made["optimizer"]["state"].items():
        assert copied["optimizer"]["state"][index]["momentum_buffer"].data_ptr() == buffers["momentum_buffer"].data_ptr()
    saved = ckpt.read_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == 3 and all(torch.equal(saved["model"][k], v) for k, v in engine.model.state_dict().items())
