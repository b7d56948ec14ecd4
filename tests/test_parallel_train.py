"""`alexnet-fast train --parallel ...` through the real CLI with 2 gloo processes: a hybrid run
stopped by SIGTERM, resumed under ddp, then under hybrid-pipelined (the 2014 paper's scheme (b)),
then under columns. Each checkpoint is one unwrapped state_dict with the single-device optimizer's
state (the single-device network and optimizer load it), and every step is logged once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

TRAIN = [sys.executable, "-m", "alexnet_fast.tools.cli", "train"]

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


def _check_checkpoint(saved: dict) -> None:
    from alexnet_fast.model.alexnet import build_model
    from alexnet_fast.model.config import TrainConfig
    from alexnet_fast.model.optim import make_optimizer

    single = build_model("alexnet2012", 4, dropout=0.0)
    single.load_state_dict(saved["model"])           # one unwrapped state_dict, full shapes
    # the optimizer state is the single-device optimizer's: one full-shape momentum per parameter
    optimizer = make_optimizer(TrainConfig(**saved["config"]), single)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    momentum = saved["optimizer"]["state"]
    assert sorted(momentum) == list(range(len(params)))
    assert all(momentum[i]["momentum_buffer"].shape == p.shape for i, p in enumerate(params))
    optimizer.load_state_dict(saved["optimizer"])


def test_train_stops_and_resumes_across_parallel_schemes(shard_set, tmp_path, wait_for_step):
    run = tmp_path / "run"
    flags = ["--data", str(shard_set), "--out", str(run), "--device", "cpu", "--nproc", "2", "--arch",
             "alexnet2012", "--init", "torch", "--batch-size", "4", "--workers", "1", "--log-every", "1",
             "--dropout", "0", "--eval-every", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    first = subprocess.Popen([*TRAIN, *flags, "--parallel", "hybrid", "--max-steps", "17"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run, 1, [first], timeout=600)
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out and "Traceback" not in err
    saved = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert saved["config"]["parallel"] == "hybrid"
    _check_checkpoint(saved)
    stopped_at = saved["step"]

    for extra, scheme in enumerate(("ddp", "hybrid-pipelined", "columns"), start=1):
        steps = stopped_at + extra
        done = subprocess.run([*TRAIN, *flags, "--parallel", scheme, "--max-steps", str(steps), "--resume"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"resumed from {run / 'last.pt'}: epoch 0, step {steps - 1}" in done.stdout
        saved = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
        assert saved["step"] == steps and saved["config"]["parallel"] == scheme
        _check_checkpoint(saved)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "val_top1" not in r and "checkpoint_write_s" not in r]
    assert steps == list(range(1, stopped_at + 4))       # each step logged once
