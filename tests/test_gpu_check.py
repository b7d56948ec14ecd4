"""benchmarks/gpu_check.py without a GPU: each phase refuses at once with one line and exit 2, and
summary.json still says why, with the versions and no check claimed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DRIVER = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the driver would run the checks")
@pytest.mark.parametrize("phase", ["torch", "dali"])
def test_each_phase_refuses_in_one_line_without_a_gpu(tmp_path, phase):
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(DRIVER), "--phase", phase, "--results", str(results),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: ") and "Traceback" not in done.stderr
    assert "no CUDA GPU" in lines[0]
    assert sorted(p.name for p in results.iterdir()) == ["summary.json"]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["phase"] == phase and summary["checks"] == [] and summary["passed"] is False
    assert summary["refused"] == lines[0].removeprefix("gpu_check: ")
    assert summary["versions"]["torch"] == torch.__version__


def test_a_missing_extra_site_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(DRIVER), "--results", str(tmp_path / "r"), "--extra-site",
                           str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"gpu_check: --extra-site {tmp_path / 'nowhere'}: no such folder"]
