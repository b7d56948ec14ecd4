"""The device check for a bare, offline, single-GPU node: every GPU path of alexnet-fast, asserted,
in one command of at most 7 minutes (the time a lent H200 gives), from a plain checkout.

    python3 benchmarks/gpu_check.py --results DIR [--extra-site SITE] [--phase torch|dali|all]

Needs only `python3` with torch (CUDA build) and the project's pure-Python dependencies; nothing is
installed and nothing is downloaded. SITE: a folder holding already-unpacked wheels (DALI,
webdataset), put first on sys.path and on every child process's PYTHONPATH (docs/gpu.md says how to
make it). The checkout itself is put on the path as the `alexnet_fast` package through a folder of
symbolic links under the work directory, since the package is not installed.

Phases (each runs alone; `all` runs both, torch first):
- torch (no DALI): `pytest -m gpu tests/gpu/test_torch_gpu.py` (bf16, channels-last, compile,
  checkpoint + SIGTERM + resume, GPU vs CPU eval, no host sync, on the baseline loader), then the
  model-only img/s of alexnet-owt bf16, eager and compiled, at batch 256 and 512 (`profile --stages model`).
- dali: `pytest -m gpu tests/gpu/test_dali_gpu.py`; a shard set of 52,000 train images drawn on
  every core; the DALI loader's img/s at the trainer's dtype and layout (bf16, channels-last, batch
  256) over 200 batches after 10 warm-up ones (one epoch: no pipeline rebuild is timed), with the
  whole image decoded and with only the crop window (LoaderSpec.roi_decode); the end-to-end
  `profile` with its verdict (which stage bounds the run).

Every step runs under a timeout cut to what is left of --budget-s (default 420 s); a step that cannot
start in time is recorded as not run. RESULTS gets at most three files: summary.json (device,
versions, each check passed/failed with its figure), steps.log (every step's output) and
profile.json. A missing package or no visible GPU: one line, exit 2, and summary.json says why.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"pipeline": "pipeline", "model": "model", "tools": "tools"}     # alexnet_fast.<name> -> folder
NEEDS = {"torch": ["torch", "webdataset", "numpy", "PIL", "click", "numba", "scipy", "tqdm", "matplotlib", "pytest"],
         "dali": ["torch", "webdataset", "numpy", "PIL", "click", "numba", "scipy", "tqdm", "matplotlib", "pytest",
                  "nvidia.dali"]}
LOADER_BENCH = dict(batch_size=256, batches=200, warmup=10)
# 200 + 10 batches of 256 inside one epoch of one rank need 53,760 train images: 1000 x 54 = 54,000.
# Small sides keep the drawing cheap (not measured on 16 cores yet: ~46 ms/image on one busy core here).
BENCH_SAMPLE = dict(classes=1000, train_per_class=54, val_per_class=1, odd_files=False, min_side=200, max_side=260)
REFUSED = 2


class Check:
    """The run's record: one entry per step, written to summary.json after every step."""

    def __init__(self, results: Path, phase: str):
        self.results, self.log = results, results / "steps.log"
        self.summary = {"phase": phase, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                        "device": None, "versions": {}, "checks": [], "passed": None}

    def record(self, name: str, passed: bool | None, seconds: float, figure=None, detail: str = "") -> None:
        self.summary["checks"].append({"name": name, "passed": passed, "seconds": round(seconds, 1),
                                       "figure": figure, "detail": detail})
        self.write()
        mark = {True: "pass", False: "FAIL", None: "n/a "}[passed]
        print(f"  {mark} {name} ({seconds:.0f} s) {detail}", flush=True)

    def write(self) -> None:
        checks = self.summary["checks"]
        self.summary["passed"] = bool(checks) and all(c["passed"] is True for c in checks)
        (self.results / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")


def child_env(extra_site: Path | None, shim: Path) -> dict:
    paths = [str(p) for p in (extra_site, shim, REPO) if p is not None]
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])), "PYTHONUNBUFFERED": "1"}


def make_shim(work: Path) -> Path:
    """A folder whose `alexnet_fast/` links to the checkout's package folders (the package layout
    pyproject.toml maps), so `python3 -m alexnet_fast.tools.cli` runs from a plain checkout."""
    shim = work / "pyshim"
    package = shim / "alexnet_fast"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    for name, folder in PACKAGE_DIRS.items():
        link = package / name
        if not link.is_symlink():
            link.symlink_to(REPO / folder, target_is_directory=True)
    return shim


PREFLIGHT = """
import importlib, json, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
out = {"missing": missing}
if not missing:
    import torch
    out["versions"] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    if "nvidia.dali" in sys.argv[1:]:
        import nvidia.dali, nvidia.dali.backend as b
        out["versions"]["dali"] = nvidia.dali.__version__
        out["dali_gpus"] = b.GetCUDADeviceCount()
    out["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if out["gpus"]:
        out["device"] = torch.cuda.get_device_name(0)
print(json.dumps(out))
"""


def run_step(check: Check, env: dict, deadline: float, name: str, cmd: list[str], timeout: float) -> tuple[bool | None, str]:
    """Run `cmd` under min(timeout, time left); append its output to steps.log; (passed, output)."""
    left = deadline - time.monotonic()
    if left < 20:
        check.record(name, None, 0.0, detail="not run: the time budget is spent")
        return None, ""
    limit = min(timeout, left)
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        output, passed = done.stdout + done.stderr, done.returncode == 0
        detail = "" if passed else f"exit {done.returncode}: " + (output.strip().splitlines() or [""])[-1][-300:]
    except subprocess.TimeoutExpired as e:       # its stdout/stderr come as bytes even with text=True
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x for x in (e.stdout, e.stderr) if x)
        passed, detail = False, f"timed out after {limit:.0f} s"
    seconds = time.monotonic() - start
    with open(check.log, "a") as log:
        log.write(f"===== {name} ({seconds:.1f} s): {' '.join(cmd)}\n{output}\n")
    check.record(name, passed, seconds, detail=detail)
    return passed, output


def set_figure(check: Check, figure) -> None:
    check.summary["checks"][-1]["figure"] = figure
    check.write()
    print(f"       {json.dumps(figure)}", flush=True)


def torch_phase(check: Check, env: dict, deadline: float, work: Path) -> None:
    py = sys.executable
    run_step(check, env, deadline, "pytest tests/gpu/test_torch_gpu.py",
             [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu/test_torch_gpu.py"], 240)
    for compiled in (False, True):
        for batch in (256, 512):
            out = work / f"model_{batch}_{'compiled' if compiled else 'eager'}.json"
            name = f"model-only img/s alexnet-owt bf16 batch {batch} {'compiled' if compiled else 'eager'}"
            passed, _ = run_step(check, env, deadline, name,
                                 [py, "-m", "alexnet_fast.tools.cli", "profile", "--device", "cuda", "--arch",
                                  "alexnet-owt", "--precision", "bf16", "--batch-size", str(batch), "--stages",
                                  "model", "--json", str(out), *(["--compile"] if compiled else [])], 120)
            if passed:
                stage = json.loads(out.read_text())["stages"]["model"]
                set_figure(check, {"img_per_s": stage.get("img_per_s")})


BENCH_LOADER = """
import json, sys, time
import torch
sys.path.insert(0, "benchmarks")
from loaders import measure
from alexnet_fast.pipeline.loader_spec import LoaderSpec, default_loader_workers
data, batch, batches, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
roi = sys.argv[5] == "roi"      # decode only the crop window (fn.decoders.image_crop) or the whole image
spec = LoaderSpec(data=data, kind="dali", batch_size=batch, device="cuda", workers=default_loader_workers("cuda"),
                  dtype=torch.bfloat16, channels_last=True, borrow_buffers=True, roi_decode=roi)
result = measure(spec, batches, warmup)
print(json.dumps({**result, "workers": spec.workers}))
"""

BUILD_DATA = """
import json, sys
from pathlib import Path
from alexnet_fast.pipeline.host import usable_cores
from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet
from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards
work, spec = Path(sys.argv[1]), SampleSpec(**json.loads(sys.argv[2]), val_layout=ValFormat.FLAT_DEVKIT)
raw = write_raw_imagenet(work / "raw", spec, workers=usable_cores())
make_shards(raw.root, work / "shards", ShardOptions(per_shard=1000), workers=usable_cores(), progress=False,
            log=lambda m: None)
"""


def dali_phase(check: Check, env: dict, deadline: float, work: Path) -> None:
    py = sys.executable
    run_step(check, env, deadline, "pytest tests/gpu/test_dali_gpu.py",
             [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu/test_dali_gpu.py"], 240)
    shards = work / "bench" / "shards"
    if not (shards / "manifest.json").exists():
        passed, _ = run_step(check, env, deadline, "build the benchmark shard set (all cores)",
                             [py, "-c", BUILD_DATA, str(work / "bench"), json.dumps(BENCH_SAMPLE)], 150)
        if not passed:
            return
    b = LOADER_BENCH
    # LoaderSpec.roi_decode: whether the hardware decoder gains from decoding only the crop window
    # is unknown (the CPU twin's libjpeg-turbo did not: benchmarks/RESULTS.md), so both are measured
    for decode in ("full", "roi"):
        passed, output = run_step(check, env, deadline, f"DALI loader img/s (bf16, channels-last, {decode} decode)",
                                  [py, "-c", BENCH_LOADER, str(shards), str(b["batch_size"]), str(b["batches"]),
                                   str(b["warmup"]), decode], 120)
        if passed:
            result = json.loads(output.strip().splitlines()[-1])
            set_figure(check, {k: result.get(k) for k in ("img_per_s", "cpu_ms_per_img", "epochs_touched", "workers")})
    profile = check.results / "profile.json"
    passed, _ = run_step(check, env, deadline, "end-to-end profile and verdict",
                         [py, "-m", "alexnet_fast.tools.cli", "profile", "--data", str(shards), "--device", "cuda",
                          "--arch", "alexnet-owt", "--precision", "bf16", "--stages", "model,end_to_end",
                          "--json", str(profile)], 150)
    if passed:
        report = json.loads(profile.read_text())
        set_figure(check, {"bound_by": report.get("bound_by"), "efficiency": report.get("efficiency"),
                           "end_to_end_img_per_s": report["stages"].get("end_to_end", {}).get("img_per_s")})


def refuse(check: Check, message: str) -> int:
    check.summary["refused"] = message
    check.write()
    print(f"gpu_check: {message}", file=sys.stderr)
    return REFUSED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="folder for summary.json (at most 3 files)")
    parser.add_argument("--extra-site", type=Path, default=None, help="unpacked wheels (DALI, webdataset)")
    parser.add_argument("--phase", choices=("torch", "dali", "all"), default="all")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder [a new temporary one]")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time limit")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    args.results.mkdir(parents=True, exist_ok=True)
    check = Check(args.results, args.phase)
    if args.extra_site is not None and not args.extra_site.is_dir():
        return refuse(check, f"--extra-site {args.extra_site}: no such folder")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    env = child_env(args.extra_site, make_shim(work))
    phases = ["torch", "dali"] if args.phase == "all" else [args.phase]
    needs = sorted({n for p in phases for n in NEEDS[p]})
    try:
        done = subprocess.run([sys.executable, "-c", PREFLIGHT, *needs], env=env, capture_output=True, text=True,
                              timeout=120)
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return refuse(check, f"the package check did not answer ({type(e).__name__}); see `python3 -c 'import torch'`")
    if found["missing"]:
        return refuse(check, f"phase {args.phase} needs {'; '.join(found['missing'])}: put the unpacked wheels "
                             f"in a folder and pass --extra-site (docs/gpu.md)")
    check.summary["versions"], check.summary["device"] = found["versions"], found.get("device")
    if not found["gpus"]:
        return refuse(check, f"no CUDA GPU visible to torch {found['versions']['torch']}: this check needs one")
    if "dali" in phases and not found.get("dali_gpus"):
        return refuse(check, f"DALI {found['versions'].get('dali')} sees no CUDA device: a CPU-only DALI wheel?")
    print(f"gpu_check: {found.get('device')}, torch {found['versions']['torch']}, phases {', '.join(phases)}; "
          f"results in {args.results}", flush=True)
    for phase in phases:
        (torch_phase if phase == "torch" else dali_phase)(check, env, deadline, work)
    check.write()
    failed = [c["name"] for c in check.summary["checks"] if c["passed"] is False]
    print(f"gpu_check: {len(failed)} check(s) failed" + (f": {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
