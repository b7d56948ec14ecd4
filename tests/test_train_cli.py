"""User mistakes on `alexnet-fast train` / `eval`: one line on stderr, exit 2, no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from alexnet_fast.model.config import TrainConfig
from alexnet_fast.tools.cli import main, run_command


def _run(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, "alexnet-fast", args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["train"], "--data SHARDS is required"),
    (["train", "--data", "/no/such/shards"], "does not exist"),
    (["train", "--data", "{shards}", "--batch-size", "many"], "'many' is not a valid integer"),
    (["train", "--data", "{shards}", "--arch", "vgg16"], "'vgg16' is not one of"),
    (["train", "--data", "{shards}", "--epochs", "0"], "must be > 0"),
    (["train", "--data", "{shards}", "--device", "cpu", "--nproc", "3", "--batch-size", "8"],
     "must divide evenly over 3 ranks"),
    (["train", "--data", "{shards}", "--device", "cpu", "--grad-compression", "bf16"], "needs NCCL"),
    (["train", "--data", "{shards}", "--config", "/no/such.toml"], "does not exist"),
    (["train", "--data", "{shards}", "--parallel", "columns", "--arch", "alexnet-owt"], "two columns"),
    (["train", "--data", "{shards}", "--device", "cpu", "--nproc", "3", "--batch-size", "6", "--arch", "alexnet2012",
      "--parallel", "columns"], "give an even number of ranks"),
    (["train", "--data", "{shards}", "--parallel", "hybrid", "--compile"], "only with --parallel ddp"),
    (["train", "--data", "{shards}", "--no-such-flag"], "No such option"),
    (["eval", "--data", "/no/such/shards", "--checkpoint", "x.pt"], "does not exist"),
    (["eval", "--data", "{shards}", "--checkpoint", "/no/such/last.pt"], "does not exist"),
    (["eval", "--data", "{shards}"], "Missing option '--checkpoint'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, shard_set, capsys):
    code, err = _run([a.replace("{shards}", str(shard_set)) for a in args], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith("alexnet-fast: error: "), err     # one form for flags, paths and data alike


def test_a_mistyped_command_names_the_closest_one(capsys):
    code, err = _run(["evl", "--data", "x"], capsys)
    assert code == 2 and err.strip() == ("alexnet-fast: error: No such command 'evl'. Did you mean 'eval'? "
                                         "(see alexnet-fast --help)")


def test_a_run_prints_its_resolved_config_once_and_ends_with_a_summary(shard_set, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, "alexnet-fast", ["train", "--data", str(shard_set), "--out", str(run), "--device", "cpu",
                                           "--arch", "alexnet-owt", "--batch-size", "4", "--workers", "1",
                                           "--max-steps", "3", "--dropout", "0"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.count("config:") == 1 and "--resume" not in out      # nobody asked to resume
    lines = out[out.index("config:"):].splitlines()
    config = dict(pair.split("=", 1) for line in lines[1:] if line.startswith("  ") for pair in line.split())
    # each field once, with what it resolved to: the shard set's 4 classes, 1 worker, mean-std input
    assert (config["num_classes"], config["workers"], config["normalize"]) == ("4", "1", "mean-std")
    assert "num_classes_resolved" not in config and set(TrainConfig.__dataclass_fields__) <= set(config)
    assert sum(line.startswith("  ") for line in lines[1:]) <= 16
    last = out.strip().splitlines()[-1]
    assert last.startswith("train reached --max-steps: 3 steps (12 images) in ") and " img/s overall; " in last
    assert f"checkpoints in {run}: last.pt" in last


def test_a_toml_with_a_wrong_type_is_a_usage_error(shard_set, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('epochs = "ninety"\n')
    code, err = _run(["train", "--data", str(shard_set), "--config", str(config)], capsys)
    assert code == 2 and "epochs must be int" in err and len(err.strip().splitlines()) == 1


def test_help_says_the_batch_is_global():
    out = subprocess.run([sys.executable, "-m", "alexnet_fast.tools.cli", "train", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "GLOBAL batch" in out.stdout and "--grad-compression" in out.stdout


def test_missing_shard_directory_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "alexnet_fast.tools.cli", "train", "--data",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"alexnet-fast: error: shard directory {str(tmp_path / 'missing')!r} does not exist"]
    assert not (tmp_path / "run").exists()
