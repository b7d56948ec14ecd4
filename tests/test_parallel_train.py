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
        momentum = saved["optimizer"]["state"]
        assert [momentum[i]["momentum_buffer"].shape for i in sorted(momentum)] == \
            [p.shape for group in saved["optimizer"]["param_groups"] for p in
             [dict(single.named_parameters())[n] for n in _names(single, group, saved)]]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_top1" not in r and r.get("img_per_s") and "epoch" in r
            and r["step"] <= 4][:4] == [1, 2, 3, 4]


def _names(model, group, saved) -> list[str]:
    """The parameter names of an optimizer group (its indices count the full network's parameters
    in make_optimizer's order: weights, then biases, when the groups are split)."""
    names = [n for n, _ in model.named_parameters()]
    groups = saved["optimizer"]["param_groups"]
    if len(groups) == 1:
        return [names[i] for i in group["params"]]
    weights = [n for n, p in model.named_parameters() if p.ndim > 1]
    biases = [n for n, p in model.named_parameters() if p.ndim <= 1]
    order = weights + biases
    return [order[i] for i in group["params"]]
