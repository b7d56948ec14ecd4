"""`alexnet-fast demo` end to end (sample -> raw tree -> shards -> train -> eval -> summary), at a
tiny size so it fits the test budget; the full-size demo's numbers are in the README."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from alexnet_fast.model.runlog import read_metrics
from alexnet_fast.tools.cli import run_command
from alexnet_fast.tools.cmd_plot import plot_command
from alexnet_fast.tools.cmd_demo import DemoSize, run_demo


def test_demo_runs_every_stage_and_reports_throughput_and_accuracy(tmp_path, capsys):
    tiny = DemoSize(classes=3, train_per_class=8, val_per_class=4, epochs=1, batch_size=8, lr=0.01)
    handlers_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    result = run_demo(tmp_path, "cpu", "dali", tiny)
    # The trainer's stop flag must not outlive the run: left installed, it was inherited by later
    # fork pools (stats, make_shards) in this process, whose exit then hung on SIGTERM-immune workers.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers_before
    out = capsys.readouterr().out
    assert result["outcome"] == "completed"
    assert result["val"]["images"] == 12
    assert result["img_per_s"] > 0
    summary = [line for line in out.splitlines() if line.startswith("demo: ")]
    assert len(summary) == 1 and "train img/s on cpu" in summary[0] and "(chance 33%)" in summary[0]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 24 and manifest["rejected"] == []
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "config.json").is_file()
    # disk: a finished demo keeps the weights-only best.pt, not the ~456 MB resume checkpoints
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "last.prev.pt").exists()
    best = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=False)
    assert "optimizer" not in best and best["kind"] == "weights" and best["arch"] == "alexnet-owt"
    assert (tmp_path / "run" / "best.pt").stat().st_size < 240e6       # alexnet-owt's 57M fp32 weights, ~228 MB
    assert f"curves in {tmp_path / 'run' / 'curves.png'}" in summary[0]
    assert (tmp_path / "run" / "curves.png").read_bytes().startswith(b"\x89PNG")   # redrawn each epoch

    # what the curves are drawn from, and `alexnet-fast plot` comparing runs (here: the run twice)
    steps, epochs = read_metrics(tmp_path / "run")
    assert len(epochs) == tiny.epochs and 0 <= epochs[0]["val_top1"] <= epochs[0]["val_top5"] <= 1
    assert all(r["loss"] > 0 and r["img_per_s"] > 0 for r in steps + epochs)   # (3 steps: below --log-every)
    with pytest.raises(SystemExit) as exit_info:
        run_command(plot_command, "plot", [str(tmp_path / "run"), str(tmp_path / "run"), "--out",
                                           str(tmp_path / "both.png")])
    assert exit_info.value.code == 0
    assert (tmp_path / "both.png").read_bytes().startswith(b"\x89PNG")

