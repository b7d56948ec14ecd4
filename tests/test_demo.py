"""`alexnet-fast demo` end to end (sample -> raw tree -> shards -> train -> eval -> summary), at a
tiny size so it fits the test budget; the full-size demo's numbers are in the README."""
from __future__ import annotations

import json
import signal

from alexnet_fast.tools.cmd_train import DemoSize, run_demo


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

