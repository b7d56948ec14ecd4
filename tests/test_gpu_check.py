"""benchmarks/gpu_check.py and the offline bundle, on a machine without a GPU: what can run here.

- the bundle's pieces: cut, reassembled across calls, a damaged piece refused, a wrong whole refused,
  a tree without libnvjpeg and DALI failing the check;
- a step that outlives its limit loses its whole process group (no orphan holds the GPU);
- the decode check fails loudly when libnvjpeg is not mapped in the process;
- skipped tests are listed by name and reason and not counted as passed;
- relative --results / --extra-site are the caller's, and without a GPU the check refuses in one line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
DRIVER = BENCHMARKS / "gpu_check.py"
sys.path.insert(0, str(BENCHMARKS))

import gpu_bundle_assemble as assemble  # noqa: E402
import gpu_check  # noqa: E402
from gpu_bundle_build import write_pieces  # noqa: E402
from gpu_steps import Summary, junit_outcomes, run_group  # noqa: E402
from gpu_verdicts import decode_verdict, mapped_nvjpeg, pytest_verdict  # noqa: E402


def _site(root: Path, nvjpeg: bool) -> Path:
    """A small tree shaped like the bundle: a package and (optionally) nvidia/cu13/lib/libnvjpeg.so.13."""
    site = root / "site"
    (site / "bundled_pkg").mkdir(parents=True)
    (site / "bundled_pkg" / "__init__.py").write_text("VALUE = 7\n")
    (site / "bundled_pkg" / "blob.bin").write_bytes(os.urandom(40_000))   # incompressible: several pieces
    if nvjpeg:
        (site / "nvidia" / "cu13" / "lib").mkdir(parents=True)
        (site / "nvidia" / "cu13" / "lib" / assemble.NVJPEG).write_bytes(os.urandom(5_000))
    return site


def _assemble(manifest: Path, store: Path, *pieces: Path) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_bundle_assemble.py"), "--manifest", str(manifest),
                           "--store", str(store), *map(str, pieces)], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow       # ~20 s on the loaded 2-core machine: the check imports DALI once
def test_pieces_reassemble_across_calls_and_damage_is_refused(tmp_path):
    """A tree with neither DALI nor libnvjpeg: its pieces reassemble byte for byte, and its check fails."""
    site = _site(tmp_path / "src", nvjpeg=False)
    out = tmp_path / "out"
    out.mkdir()
    manifest = write_pieces(site, out, 16_384, {"python_version": "3.x"})
    pieces = [out / p["name"] for p in manifest["pieces"]]
    assert len(pieces) >= 3 and all(p.stat().st_size <= 16_384 for p in pieces)
    store = tmp_path / "node"

    damaged = tmp_path / pieces[1].name                    # one flipped byte: refused, not kept
    damaged.write_bytes(pieces[1].read_bytes()[:-1] + bytes([pieces[1].read_bytes()[-1] ^ 1]))
    code, _, err = _assemble(out / "manifest.json", store, damaged)
    assert code == 1 and "sha256" in err and "not kept" in err and not (store / damaged.name).exists()

    code, stdout, _ = _assemble(out / "manifest.json", store, pieces[0])     # one call per piece, in any order
    assert code == 0 and json.loads(stdout.splitlines()[-1])["have"] == 1
    code, stdout, _ = _assemble(out / "manifest.json", store, *reversed(pieces[1:]))
    report = json.loads(stdout.splitlines()[-1])
    assert code == 1, "the tree holds no DALI and no libnvjpeg: the check must fail"
    assert report["have"] == report["of"] == len(pieces) and report["site"] == str(store / "site")
    assert (store / "site" / "bundled_pkg" / "blob.bin").read_bytes() == (site / "bundled_pkg" / "blob.bin").read_bytes()
    assert report["check"]["libnvjpeg"] == [] and report["check"]["ok"] is False
    assert report["check"]["imports"]["nvidia.dali"].startswith("FAILED imported from")
    assert not list(store.glob("site.tgz.*")), "pieces are removed once unpacked"

    wrong = json.loads((out / "manifest.json").read_text())   # every piece right, the whole not
    wrong["whole"]["sha256"] = "0" * 64
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    code, _, err = _assemble(tmp_path / "wrong.json", tmp_path / "node2", *pieces)
    assert code == 1 and "whole's sha256 does not" in err and not (tmp_path / "node2" / "site").exists()


def test_a_timed_out_step_loses_its_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    spawn = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    run = run_group([sys.executable, "-c", spawn], cwd=tmp_path, env=dict(os.environ), limit_s=3,
                    output=tmp_path / "out")
    assert run.returncode is None and run.seconds < 3 + 5 + 5
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the timed-out step's grandchild outlived it"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state          # a zombie has ended; only its parent's wait is missing


def test_the_decode_check_fails_loudly_when_libnvjpeg_is_not_mapped():
    # a fresh interpreter: this test process may have built a DALI pipeline already, and DALI's CPU
    # decoder maps libnvjpeg too where nvidia-nvjpeg is installed (docs/gpu.md)
    own_maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    assert mapped_nvjpeg(own_maps) == []
    gpu_like = {"cuda": {"cpu_ms_per_img": 0.1, "out_device": "cuda:0"}, "cpu": {"cpu_ms_per_img": 2.0},
                "libnvjpeg_mapped_after_gpu_run": mapped_nvjpeg(own_maps)}
    passed, _, detail = decode_verdict(gpu_like)
    assert passed is False and "DALI decoded on the CPU" in detail
    passed, _, detail = decode_verdict({"cpu": {"cpu_ms_per_img": 2.0}})
    assert passed is None and detail.startswith("not on a GPU")


def test_a_process_that_loaded_libnvjpeg_is_seen_to_have_it(tmp_path):
    """The other side of the check: the library loaded (dlopen works without a GPU) is found in maps."""
    library = next((Path(p) / "nvidia" / "cu13" / "lib" / assemble.NVJPEG for p in sys.path
                    if (Path(p) / "nvidia" / "cu13" / "lib" / assemble.NVJPEG).is_file()), None)
    if library is None:
        pytest.skip("nvidia-nvjpeg is not installed in this environment")
    code = (f"import ctypes, json, sys; sys.path.insert(0, {str(BENCHMARKS)!r}); ctypes.CDLL({str(library)!r}); "
            "from gpu_verdicts import mapped_nvjpeg; print(json.dumps(mapped_nvjpeg(open('/proc/self/maps').read())))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == [str(library.resolve())]


def test_skipped_tests_are_listed_by_name_and_reason_not_passed(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text("import pytest\npytestmark = pytest.mark.gpu\n"
                     "def test_ok():\n    pass\n"
                     "@pytest.mark.skip(reason='needs the hardware decoder')\ndef test_later():\n    pass\n"
                     "def test_broken():\n    assert 1 == 2\n")
    summary = Summary(tmp_path / "summary.json", ["dali"], True, {})
    runner = gpu_check.Runner(summary, dict(os.environ), tmp_path, tmp_path, dry_run=True)
    runner.phase_end, runner.pending = time.monotonic() + 120, {"pytest": 120}
    runner.pytest_step("pytest", "pytest sample", str(tests))
    written = json.loads((tmp_path / "summary.json").read_text())
    # the test's name is its node id from pytest's rootdir, which depends on where tmp_path lies
    [skipped] = written["skipped_tests"]
    assert skipped["test"].endswith("test_sample::test_later"), skipped
    assert {**skipped, "test": "test_sample::test_later"} == {"step": "pytest sample", "test": "test_sample::test_later",
                                                             "reason": "needs the hardware decoder"}
    check = written["checks"][0]
    assert check["passed"] is False and "test_broken" in check["detail"]
    assert check["figure"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert written["counts"] == {"passed": 0, "failed": 1, "not_judged": 0, "skipped_tests": 1}
    assert "test_sample::test_later: needs the hardware decoder" in summary.table()
    only_skips = junit_outcomes(tmp_path / "junit-test_sample.xml")
    only_skips["passed"], only_skips["failed"] = [], []
    assert pytest_verdict(only_skips, 0)[0] is None          # all skipped: not judged, never passed


def test_relative_paths_are_the_callers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = gpu_check.parse_args(["--results", "res", "--extra-site", "site", "--work", "w"])
    assert (args.results, args.extra_site, args.work) == (tmp_path / "res", tmp_path / "site", tmp_path / "w")
    env = gpu_check.child_env(args.extra_site, tmp_path / "shim")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "site")


def test_the_budgets_leave_two_minutes_of_one_call():
    assert sum(gpu_check.PHASE_BUDGET_S.values()) <= gpu_check.ONE_CALL_S - 120
    assert list(gpu_check.STEP_BUDGET_S) == ["preflight", "dali", "torch"] and gpu_check.PHASES[0] == "dali"


@pytest.mark.slow       # ~20 s on the loaded 2-core machine: the preflight imports torch and DALI
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the driver would run the checks")
def test_without_a_gpu_the_check_refuses_in_one_line(tmp_path):
    # --time-scale 4: the preflight's imports get 100 s on a loaded 2-core machine (25 s on the node)
    done = subprocess.run([sys.executable, str(DRIVER), "--phase", "torch", "--results", "results", "--work", "w",
                           "--time-scale", "4"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: ") and "no CUDA GPU" in lines[0]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())    # the caller's folder
    assert summary["phases"] == ["torch"] and summary["checks"] == [] and summary["passed"] is False
    assert summary["refused"] == lines[0].removeprefix("gpu_check: ")
    assert summary["versions"]["torch"] == torch.__version__


def test_a_missing_extra_site_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(DRIVER), "--results", str(tmp_path / "r"), "--extra-site",
                           str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"gpu_check: --extra-site {tmp_path / 'nowhere'}: no such folder"]
