"""User mistakes end in one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_fast.tools.cli import run_command
from alexnet_fast.tools.cmd_shards import shards_command
from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet

MAKE_SHARDS = Path(__file__).resolve().parents[1] / "tools" / "make_shards"


def _run(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_command(shards_command, "make_shards", [*map(str, args), "--no-progress", "--workers", "1"])
    return exit_info.value.code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("make_shards") and "error" in line]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


def test_missing_raw(tmp_path, capsys):
    _assert_one_line_error(*_run([tmp_path / "nope", tmp_path / "out"], capsys), "does not exist")


def test_no_recognisable_layout(tmp_path, capsys):
    (tmp_path / "raw" / "photos").mkdir(parents=True)
    _assert_one_line_error(*_run([tmp_path / "raw", tmp_path / "out"], capsys), "no recognisable ImageNet layout")


@pytest.fixture(scope="module")
def flat_val_raw(tmp_path_factory) -> Path:
    spec = SampleSpec(classes=2, train_per_class=2, val_per_class=1, odd_files=False, min_side=32, max_side=48,
                      val_layout=ValFormat.FLAT_DEVKIT)
    return write_raw_imagenet(tmp_path_factory.mktemp("raw"), spec).root


def test_out_not_writable(flat_val_raw, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code, err = _run([flat_val_raw, tmp_path / "a_file" / "out"], capsys)
    _assert_one_line_error(code, err, "not writable")


def test_val_labels_missing(flat_val_raw, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(flat_val_raw, raw)
    shutil.rmtree(raw / "ILSVRC2012_devkit_t12")
    _assert_one_line_error(*_run([raw, tmp_path / "out"], capsys), "no val labels", "LOC_val_solution.csv")


def test_bad_flag(flat_val_raw, tmp_path, capsys):
    code, err = _run([flat_val_raw, tmp_path / "out", "--quality", "0"], capsys)
    assert code == 2 and "--quality" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_out_holding_another_shard_set(flat_val_raw, tmp_path, capsys):
    code, _ = _run([flat_val_raw, tmp_path / "out"], capsys)
    assert code == 0
    _assert_one_line_error(*_run([flat_val_raw, tmp_path / "out", "--quality", "80"], capsys), "--overwrite")
    code, _ = _run([flat_val_raw, tmp_path / "out", "--quality", "80", "--overwrite"], capsys)
    assert code == 0


def test_script_reports_in_one_line(tmp_path):
    """The real `tools/make_shards` executable, end to end."""
    result = subprocess.run([sys.executable, str(MAKE_SHARDS), str(tmp_path / "missing"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("make_shards: error: RAW") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
