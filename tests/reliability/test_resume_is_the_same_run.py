"""A resumed run is the same run: killed at any point and continued with --resume, `alexnet-fast
train` ends with the metrics.jsonl decision fields (every record's loss, lr, val accuracy) and the
final and best weights of the run that was never stopped, for every lr schedule.

Each case is one schedule and one stop point, so four cases cover the four schedules (step, cosine,
plateau on the val error, plateau on the training loss of a set without val) and the four stop
points (mid-epoch, at an epoch boundary, during the evaluation, during a checkpoint write). The
stops are SIGKILLs the process sends itself at a chosen point (killpoint.py), not signals racing a
timer: what is on disk at the kill is the same in every run.

The runs: 2 epochs of 4 steps (batch 2 of the 8-image `train_set`), dropout on, a checkpoint every
3 steps: saves at step 3 (mid-epoch 0), 4 (end of epoch 0), 6 (mid-epoch 1), 8 (the end).
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from faults import ALEXNET_FAST, KILLPOINT, REPO, run

FLAGS = ["--device", "cpu", "--arch", "alexnet-owt", "--batch-size", "2", "--workers", "1", "--seed", "3",
         "--lr", "0.002", "--no-scale-lr", "--log-every", "1", "--epochs", "2", "--ckpt-every", "3"]
SCHEDULES = {
    "step": ["--schedule", "step", "--step-iters", "3"],
    "cosine": ["--schedule", "cosine"],
    "plateau-val": ["--schedule", "plateau", "--plateau-patience", "0"],
    "plateau-loss": ["--schedule", "plateau", "--plateau-patience", "0"],     # on the set without val
}
# how each case stops, and the step its checkpoint on disk then holds
STOPS = {
    "mid-epoch": (["--kill", "last.pt:after:1"], 3),
    "epoch-boundary": (["--kill", "last.pt:after:2"], 4),
    "during-eval": (["--kill-in", "alexnet_fast.model.train:evaluate_val:1"], 3),
    "during-checkpoint-write": (["--kill", "last.pt:during:2"], 3),
}
CASES = [("step", "mid-epoch"), ("cosine", "epoch-boundary"), ("plateau-val", "during-eval"),
         ("plateau-loss", "during-checkpoint-write")]
DECISIONS = ("step", "epoch", "loss", "lr", "val_top1", "val_top5", "val_images")

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


def _decisions(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: r[key] for key in DECISIONS if key in r} for r in records]


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.parametrize("schedule,stop", CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(schedule, stop, train_set, train_set_without_val,
                                                               tmp_path):
    data = train_set_without_val if schedule == "plateau-loss" else train_set
    flags = [*FLAGS, *SCHEDULES[schedule], "--data", str(data)]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = run([*ALEXNET_FAST, "train", *flags, "--out", str(straight)], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    kill, resumes_at = STOPS[stop]
    cli = str(REPO / "tools" / "cli.py")
    killed = run([*KILLPOINT, str(stopped), *kill, "--", cli, "train", *flags, "--out", str(stopped)], timeout=600,
                 extra_env={"TMPDIR": str(tmp_path)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run([*ALEXNET_FAST, "train", *flags, "--out", str(stopped), "--resume"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epoch = resumes_at // 4
    assert f"resumed from {stopped / 'last.pt'}: epoch {epoch}, step {resumes_at}" in resumed.stdout
    if resumes_at % 4:
        assert f"epoch {epoch + 1} continues at batch {resumes_at % 4 + 1}: loader state restored" in resumed.stdout

    expected, got = _decisions(straight), _decisions(stopped)
    assert [r["step"] for r in got if "val_top1" not in r] == [r["step"] for r in expected if "val_top1" not in r]
    assert got == expected          # every record's loss and lr, and the epochs' val accuracy: the same run
    final, reference = _weights(stopped / "last.pt"), _weights(straight / "last.pt")
    assert all(torch.equal(value, final[name]) for name, value in reference.items())
    if schedule != "plateau-loss":  # best.pt: picked by val top-1
        best, reference_best = _weights(stopped / "best.pt"), _weights(straight / "best.pt")
        assert all(torch.equal(value, best[name]) for name, value in reference_best.items())
