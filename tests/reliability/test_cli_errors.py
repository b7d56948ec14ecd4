"""Every command, given missing or invalid arguments, paths that do not exist, and values or files
of the wrong type: exactly one line on stderr, nothing on stdout, exit code 2, no traceback.

The table runs in this process through the same `run_command` the console script uses (cheap);
the last tests run the real entry points (`tools/make_shards`, `alexnet-fast`) as processes.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
from faults import MAKE_SHARDS, one_error_line, run

from alexnet_fast.tools.cli import main, run_command

# (arguments, a part of the one line that says what is wrong). Placeholders: {set} a good shard
# set, {raw} a raw ImageNet tree, {file} a text file, {dir} an empty folder, {badjson} a folder
# whose manifest.json is not JSON, {listjson} one whose manifest.json is a JSON list, {tmp} scratch.
CASES = [
    # shards (= tools/make_shards)
    (["shards"], "Missing argument 'RAW'"),
    (["shards", "{raw}"], "Missing argument 'OUT'"),
    (["shards", "/no/such/raw", "{tmp}/o"], "'/no/such/raw' does not exist"),
    (["shards", "{file}", "{tmp}/o"], "is not a directory"),
    (["shards", "{dir}", "{tmp}/o"], "no recognisable ImageNet layout"),
    (["shards", "{raw}", "{file}"], "is a file, not a directory"),
    (["shards", "{raw}", "{tmp}/o", "--per-shard", "many"], "'many' is not a valid integer"),
    (["shards", "{raw}", "{tmp}/o", "--quality", "101"], "101 is not in the range"),
    (["shards", "{raw}", "{tmp}/o", "--workers", "0"], "0 is not in the range"),
    (["shards", "{raw}", "{tmp}/o", "--size", "2.5"], "'2.5' is not a valid integer"),
    # verify
    (["verify"], "Missing argument 'OUT'"),
    (["verify", "/no/such/set"], "does not exist"),
    (["verify", "{file}"], "is not a directory"),
    (["verify", "{dir}"], "has no manifest.json"),
    (["verify", "{badjson}"], "cannot read"),
    (["verify", "{listjson}"], "is not an alexnet-fast manifest"),
    (["verify", "{set}", "--workers", "two"], "'two' is not a valid integer"),
    # stats
    (["stats"], "Missing argument 'OUT'"),
    (["stats", "/no/such/set"], "does not exist"),
    (["stats", "{listjson}"], "is not an alexnet-fast manifest"),
    (["stats", "{set}", "--stats-images", "-3"], "-3 is not in the range"),
    (["stats", "{set}", "--seed", "x"], "'x' is not a valid integer"),
    # train
    (["train"], "--data SHARDS is required"),
    (["train", "--data", "/no/such/set"], "does not exist"),
    (["train", "--data", "{file}"], "is not a directory"),
    (["train", "--data", "{badjson}"], "cannot read"),
    (["train", "--data", "{set}", "--epochs", "ten"], "'ten' is not a valid integer"),
    (["train", "--data", "{set}", "--lr", "fast"], "'fast' is not a valid float"),
    (["train", "--data", "{set}", "--loader", "pil"], "'pil' is not one of"),
    (["train", "--data", "{set}", "--out", "{file}"], "is a file, not a directory"),
    (["train", "--data", "{set}", "--init-from", "/no/such/best.pt"], "is not a checkpoint file"),
    (["train", "--data", "{set}", "--config", "{dir}"], "is a directory"),
    # eval
    (["eval", "--data", "{set}"], "Missing option '--checkpoint'"),
    (["eval", "--data", "/no/such/set", "--checkpoint", "{file}"], "does not exist"),
    (["eval", "--data", "{set}", "--checkpoint", "/no/such/last.pt"], "does not exist"),
    (["eval", "--data", "{set}", "--checkpoint", "{file}"], "is damaged or truncated"),
    (["eval", "--data", "{set}", "--checkpoint", "{dir}"], "no usable checkpoint"),
    (["eval", "--data", "{set}", "--checkpoint", "{file}", "--batch-size", "0"], "0 is not in the range"),
    # plot
    (["plot"], "Missing argument 'RUNS...'"),
    (["plot", "/no/such/run"], "has no metrics.jsonl"),
    (["plot", "{dir}"], "has no metrics.jsonl"),
    # profile
    (["profile", "--data", "/no/such/set"], "does not exist"),
    (["profile", "--data", "{listjson}"], "is not an alexnet-fast manifest"),
    (["profile", "--stages", "bogus"], "'bogus': choose from"),
    (["profile", "--batch-size", "zero"], "'zero' is not a valid integer"),
    (["profile", "--link-gbps", "-1"], "-1.0 is not in the range"),
    (["profile", "--json", "/no/such/dir/report.json"], "does not exist"),
    # demo
    (["demo", "--device", "tpu"], "'tpu' is not one of"),
    (["demo", "--loader", "x"], "'x' is not one of"),
    (["demo", "--out", "{file}"], "is a file, not a directory"),
    (["demo", "--bogus"], "No such option '--bogus'"),
    # the group itself
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_raw, train_set) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    (root / "notes.txt").write_text("not a shard set, not a checkpoint\n")
    (root / "empty").mkdir()
    (root / "badjson").mkdir()
    (root / "badjson" / "manifest.json").write_text('{"format": "alexnet-fast-shards", "spl')
    (root / "listjson").mkdir()
    (root / "listjson" / "manifest.json").write_text("[1, 2, 3]\n")
    return {"set": str(train_set), "raw": str(tiny_raw.root), "file": str(root / "notes.txt"),
            "dir": str(root / "empty"), "badjson": str(root / "badjson"), "listjson": str(root / "listjson"),
            "tmp": str(root)}


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `roots` (folders too) with its size and mtime: equal = nothing created or changed."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for root in roots for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("args,says", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_one_line_exit_2_no_traceback_nothing_created(args, says, places, capsys, tmp_path, monkeypatch):
    # the places, and where defaults would write: the working folder (`train --out runs/alexnet`,
    # `plot --out curves.png`) and the temp folder (`demo` without --out)
    cwd, temp = tmp_path / "cwd", tmp_path / "temp"
    cwd.mkdir(), temp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    watched = [Path(places[name]) for name in ("tmp", "set", "raw")] + [cwd, temp]
    before = _snapshot(*watched)
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, "alexnet-fast", [a.format(**places) for a in args])
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert exit_info.value.code == 2, captured.err
    assert says in line, line
    assert captured.out == ""
    assert _snapshot(*watched) == before


@pytest.mark.parametrize("args,says", [
    ([], "Missing argument 'RAW'"),
    (["/no/such/raw", "{tmp}/o"], "'/no/such/raw' does not exist"),
    (["{raw}", "{tmp}/o", "--per-shard", "x"], "'x' is not a valid integer"),
], ids=["no-args", "missing-raw", "bad-int"])
def test_make_shards_script(args, says, places):
    done = run([*MAKE_SHARDS, *(a.format(**places) for a in args)])
    assert done.returncode == 2 and says in one_error_line(done.stderr) and done.stdout == ""


def test_console_script_in_a_real_process(places):
    script = Path(sys.executable).with_name("alexnet-fast")
    assert script.exists(), "the console script is installed next to the interpreter by `pip install -e .`"
    done = run([str(script), "eval", "--data", places["set"], "--checkpoint", places["file"]])
    assert done.returncode == 2 and done.stdout == ""
    assert one_error_line(done.stderr).startswith("alexnet-fast: error: checkpoint ")
