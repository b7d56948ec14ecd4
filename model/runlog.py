"""RUN/metrics.jsonl (and TensorBoard event files when tensorboard is installed): what a run logs,
written by rank 0 only, trimmed on resume so no step is logged twice."""
from __future__ import annotations

import json
import sys
from pathlib import Path


class RunLog:
    """RUN/metrics.jsonl (+ TensorBoard when installed), written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resumed_at_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        if not enabled:
            return
        if resumed_at_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # A killed run may have logged steps after its last checkpoint; they are re-run now,
            # so drop them rather than log them twice.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _record_step(line) <= resumed_at_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:     # tensorboard is optional
            self.tensorboard = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:
        return sys.maxsize      # a line cut short by a kill: drop it
