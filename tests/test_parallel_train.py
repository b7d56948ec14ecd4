"""`alexnet-fast train --parallel ...` through the real CLI with 2 gloo processes: a run under
hybrid, resumed under ddp, resumed again under columns. Each checkpoint is one unwrapped
state_dict (the single-device network loads it) and every step is logged once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

TRAIN = [sys.executable, "-m", "alexnet_fast.tools.cli", "train"]


@pytest.mark.slow
def test_train_resumes_across_parallel_schemes(shard_set, tmp_path):
    from alexnet_fast.model.alexnet import build_model
    from alexnet_fast.model.config import TrainConfig
    from alexnet_fast.model.optim import make_optimizer

    run = tmp_path / "run"
    flags = ["--data", str(shard_set), "--out", str(run), "--device", "cpu", "--nproc", "2", "--arch",
             "alexnet2012", "--init", "torch", "--batch-size", "4", "--workers", "1", "--log-every", "1",
             "--dropout", "0", "--eval-every", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for steps, scheme in ((2, "hybrid"), (3, "ddp"), (4, "columns")):
        resume = ["--resume"] if steps > 2 else []
        done = subprocess.run([*TRAIN, *flags, "--parallel", scheme, "--max-steps", str(steps), *resume],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        if resume:
            assert f"resumed from {run / 'last.pt'}: epoch 0, step {steps - 1}" in done.stdout
        saved = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
        assert saved["step"] == steps and saved["config"]["parallel"] == scheme
        single = build_model("alexnet2012", 4, dropout=0.0)
        single.load_state_dict(saved["model"])           # one unwrapped state_dict, full shapes
        # the optimizer state is the single-device optimizer's: one full-shape momentum per parameter
        optimizer = make_optimizer(TrainConfig(**saved["config"]), single)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        momentum = saved["optimizer"]["state"]
        assert sorted(momentum) == list(range(len(params)))
        assert all(momentum[i]["momentum_buffer"].shape == p.shape for i, p in enumerate(params))
        optimizer.load_state_dict(saved["optimizer"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_top1" not in r] == [1, 2, 3, 4]     # each step logged once
