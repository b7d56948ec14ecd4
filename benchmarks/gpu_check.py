"""The device check for a bare, offline, single-GPU node: every GPU path of alexnet-fast, asserted,
from a plain checkout, inside 8 minutes (2 of a 10-minute device call to spare).

    python3 benchmarks/gpu_check.py --results DIR --extra-site SITE [--phase dali|torch|all]
    python3 benchmarks/gpu_check.py --results DIR --extra-site SITE --dry-run     # a CPU machine

Needs `python3` with a CUDA torch and the project's pure-Python dependencies; nothing is
installed or downloaded. SITE: the unpacked offline bundle (DALI, nvImageCodec, nvJPEG,
webdataset, PyYAML), made by benchmarks/gpu_bundle_build.py and reassembled on the node by
benchmarks/gpu_bundle_assemble.py (docs/gpu.md). The checkout is put on the path as the
`alexnet_fast` package through a folder of symbolic links under the work folder.

Phases, DALI first (`all` runs dali then torch; each has its own budget, PHASE_BUDGET_S):
- dali: a benchmark shard set of 1,000 distinct JPEGs repeated across 54 shards (hard links);
  "decodes on the GPU": libnvjpeg mapped in the loader's process and its host CPU per image far
  below the CPU decoder's, steady-state batches only; `pytest -m gpu tests/gpu/test_dali_gpu.py`;
  the DALI loader's img/s (bf16, channels-last, batch 256) decoding the whole image and the crop
  window only; the end-to-end `profile` and its verdict.
- torch: `pytest -m gpu tests/gpu/test_torch_gpu.py`; model-only img/s of alexnet-owt bf16, eager
  at batch 256 and 512, compiled at 256 (one cold compile). Compile steps need a C compiler and
  Python headers: without them they are skipped with the reason (`-k "not compile"` for pytest).

Every step runs in its own process group under its budget (plus what earlier steps of its phase
left unused) and the group is killed on timeout. `--dry-run` walks the same steps with the same
budgets on a machine without a GPU, on smaller work (DRY_RUN): GPU-only assertions say "not on a
GPU", never pass. RESULTS gets summary.json (each step's figure, assertion and verdict; skipped
tests by name and reason), steps.log and profile.json. Exit 0 when no step failed; 2 when refused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_steps import CheckRecord, Summary, junit_outcomes, run_group  # noqa: E402
from gpu_verdicts import NOT_ON_A_GPU, compile_missing, decode_verdict, pytest_verdict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHILDREN = Path(__file__).resolve().parent / "gpu_children.py"
PACKAGE_DIRS = ("pipeline", "model", "tools")         # alexnet_fast.<name> -> the checkout's folder
NEEDS = {"dali": ["torch", "numpy", "PIL", "click", "numba", "scipy", "tqdm", "matplotlib", "pytest", "webdataset",
                  "nvidia.dali"],
         "torch": ["torch", "numpy", "PIL", "click", "numba", "scipy", "tqdm", "matplotlib", "pytest", "webdataset"]}
REFUSED = 2
PHASES = ("dali", "torch")

# Seconds per step, by phase (the phase budget is their sum). Guesses for one H200 with 16 cores
# until its first run measures them; the step lines of summary.json record each one's seconds.
STEP_BUDGET_S = {
    "preflight": {"preflight": 25},           # imports, GPU, DALI's backend
    "dali": {"bench": 45, "decode": 40, "pytest": 90, "full": 30, "roi": 30, "profile": 35},
    "torch": {"pytest": 90, "eager256": 20, "eager512": 20, "compiled256": 55},
}
PHASE_BUDGET_S = {phase: sum(steps.values()) for phase, steps in STEP_BUDGET_S.items()}
ONE_CALL_S = 600                                       # one device command's limit (the run tool)


@dataclass(frozen=True)
class Work:
    """How much each step does: on the GPU, and in a dry run on 2 busy CPU cores (same steps, same
    budgets, less work, so the walk proves the mechanics rather than a speed)."""
    distinct_jpegs: int = 1000            # drawn once...
    repeats: int = 54                     # ...hard-linked 54 times: 54,000 train samples, 210 batches of 256
    batch: int = 256
    decode_warmup: int = 5
    decode_batches: int = 30
    loader_warmup: int = 10
    loader_batches: int = 190             # 200 of 210 batches: one epoch, no rebuild timed
    dtype: str = "bfloat16"
    precision: str = "bf16"
    profile_steps: tuple = ()             # profile's GPU defaults
    model_batches: tuple = (256, 512)


DRY_RUN = Work(distinct_jpegs=48, repeats=2, batch=16, decode_warmup=1, decode_batches=2, loader_warmup=1,
               loader_batches=3, dtype="float32", precision="fp32",
               profile_steps=("--warmup", "1", "--repeats", "1", "--steps", "1"), model_batches=(8, 16))


def budget_table(phases: tuple[str, ...] | list[str] = PHASES, time_scale: float = 1.0) -> str:
    rows = [f"  {phase:9} {PHASE_BUDGET_S[phase]:4d} s  ({', '.join(f'{k} {v}' for k, v in steps.items())})"
            for phase, steps in STEP_BUDGET_S.items() if phase == "preflight" or phase in phases]
    total = PHASE_BUDGET_S["preflight"] + sum(PHASE_BUDGET_S[phase] for phase in phases)
    return "\n".join(["budget (s):", *rows,
                      f"  total     {total:4d} s = {total / 60:.1f} min of one {ONE_CALL_S // 60}-min call: "
                      f"{(ONE_CALL_S - total) / 60:.1f} min to spare"]
                     + ([f"  every budget x {time_scale:g} (--time-scale)"] if time_scale != 1 else []))


def make_shim(work: Path) -> Path:
    """A folder whose `alexnet_fast/` links to the checkout's package folders (the layout
    pyproject.toml maps), so `python3 -m alexnet_fast.tools.cli` runs from a plain checkout."""
    package = work / "pyshim" / "alexnet_fast"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    for name in PACKAGE_DIRS:
        link = package / name
        if not link.is_symlink():
            link.symlink_to(REPO / name, target_is_directory=True)
    return package.parent


def child_env(extra_site: Path | None, shim: Path) -> dict:
    """Children's environment: the bundle, the shim and the checkout first on PYTHONPATH (absolute:
    children run in the checkout, not the caller's folder)."""
    paths = [str(p.resolve()) for p in (extra_site, shim, REPO) if p is not None]
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])), "PYTHONUNBUFFERED": "1"}


class Runner:
    """Runs one phase's steps against its deadline and records each in the summary."""

    def __init__(self, summary: Summary, env: dict, work: Path, results: Path, dry_run: bool, time_scale: float = 1.0):
        self.summary, self.env, self.work, self.results, self.dry_run = summary, env, work, results, dry_run
        self.time_scale = time_scale
        self.sizes = DRY_RUN if dry_run else Work()
        self.phase_end, self.pending = 0.0, {}

    def start_phase(self, phase: str) -> None:
        self.phase_end = time.monotonic() + PHASE_BUDGET_S[phase] * self.time_scale
        self.pending = {key: budget * self.time_scale for key, budget in STEP_BUDGET_S[phase].items()}

    def step(self, key: str, name: str, cmd: list[str]):
        """Run CMD as step KEY of STEP_BUDGET_S; returns its StepRun, or None when it could not
        start in time. Its limit: the phase's time left less the budgets of its steps still to come
        (its own budget plus whatever earlier steps left unused)."""
        budget = self.pending.pop(key)
        limit = self.phase_end - time.monotonic() - sum(self.pending.values())
        if limit < min(10.0, budget):
            self.summary.record(CheckRecord(name, None, 0.0, budget, detail="not run: the phase's budget is spent"))
            return None
        run = run_group(cmd, cwd=REPO, env=self.env, limit_s=limit, output=self.work / "step.out")
        with open(self.results / "steps.log", "a") as log:
            log.write(f"===== {name} ({run.seconds:.1f} s of {limit:.0f}): {' '.join(cmd)}\n{run.output}\n")
        run.budget_s = budget
        return run

    def record(self, name: str, run, verdict: tuple, figure: dict | None = None) -> None:
        passed, assertion, detail = verdict
        if run.returncode is None:
            passed, detail = False, f"timed out after {run.seconds:.0f} s (process group killed)"
        elif run.returncode != 0 and passed is not False:
            passed, detail = False, f"exit {run.returncode}: " + last_line(run.output)
        self.summary.record(CheckRecord(name, passed, round(run.seconds, 1), run.budget_s, assertion, round(run.cpu_s, 1),
                                        figure, detail))

    def skip(self, key: str, name: str, reason: str) -> None:
        budget = self.pending.pop(key)
        self.summary.record(CheckRecord(name, None, 0.0, budget, detail=f"skipped: {reason}"))

    def json_step(self, key: str, name: str, cmd: list[str], verdict) -> dict | None:
        """A step whose last output line is JSON; VERDICT(result) -> (passed, assertion, detail)."""
        run = self.step(key, name, cmd)
        if run is None:
            return None
        result = last_json(run.output) if run.returncode == 0 else None
        if result is None:
            self.record(name, run, (False, "", ""))
            return None
        self.record(name, run, verdict(result), figure=result)
        return result

    def pytest_step(self, key: str, name: str, test_file: str, deselect: str | None = None) -> None:
        report = self.work / f"junit-{Path(test_file).stem}.xml"
        report.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs",
               f"--junitxml={report}", test_file] + (["-k", f"not {deselect}"] if deselect else [])
        run = self.step(key, name, cmd)
        if run is None:
            return
        outcomes = junit_outcomes(report)
        self.summary.skip_tests(name, outcomes["skipped"])
        verdict = pytest_verdict(outcomes, run.returncode)
        figure = {k: len(v) for k, v in outcomes.items()}
        self.summary.record(CheckRecord(name, verdict[0], round(run.seconds, 1), run.budget_s, verdict[1],
                                        round(run.cpu_s, 1), figure,
                                        verdict[2] if run.returncode is not None else
                                        f"timed out after {run.seconds:.0f} s (process group killed)"))


def last_line(output: str) -> str:
    return (output.strip().splitlines() or [""])[-1][-300:]


def last_json(output: str) -> dict | None:
    try:
        return json.loads(output.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def gpu_only(result_ok: bool, assertion: str, on_gpu: bool, detail: str = "") -> tuple:
    """A figure's assertion that only a GPU run can judge."""
    return (result_ok, assertion, detail) if on_gpu else (None, assertion, NOT_ON_A_GPU)


def dali_phase(run: Runner) -> None:
    w, py, on_gpu = run.sizes, sys.executable, not run.dry_run
    devices = "cpu" if run.dry_run else "cuda,cpu"
    bench = run.work / "bench"
    made = run.json_step("bench", "benchmark shard set (distinct JPEGs x hard-linked repeats)",
                         [py, str(CHILDREN), "bench-set", str(bench), str(w.distinct_jpegs), str(w.repeats)],
                         lambda r: (r["train_samples"] == w.distinct_jpegs * w.repeats,
                                    f"train samples == {w.distinct_jpegs} x {w.repeats}", ""))
    shards = str(bench / "shards")
    if made is None:
        for key, name in (("decode", "decodes on the GPU"), ("pytest", "pytest tests/gpu/test_dali_gpu.py"),
                          ("full", "DALI loader img/s, whole image"), ("roi", "DALI loader img/s, crop window"),
                          ("profile", "end-to-end profile and verdict")):
            run.skip(key, name, "no benchmark shard set")
        return
    run.json_step("decode", "decodes on the GPU",
                  [py, str(CHILDREN), "decode", shards, str(w.batch), str(w.decode_warmup), str(w.decode_batches), devices],
                  decode_verdict)
    run.pytest_step("pytest", "pytest tests/gpu/test_dali_gpu.py", "tests/gpu/test_dali_gpu.py")
    # LoaderSpec.roi_decode: whether the GPU decoder gains from decoding only the crop window is
    # unknown (the CPU twin's libjpeg-turbo did not: benchmarks/RESULTS.md), so both are measured
    for mode, name in (("full", "DALI loader img/s, whole image"), ("roi", "DALI loader img/s, crop window")):
        run.json_step(mode, name, [py, str(CHILDREN), "loader", shards, str(w.batch), str(w.loader_warmup),
                                   str(w.loader_batches), mode, w.dtype, devices.split(",")[0]],
                      lambda r: gpu_only(r["out_device"].startswith("cuda"), "batches on cuda", on_gpu))
    profile = run.results / "profile.json"
    step = run.step("profile", "end-to-end profile and verdict",
                    [py, "-m", "alexnet_fast.tools.cli", "profile", "--data", shards,
                     "--device", "cuda" if on_gpu else "cpu", "--arch", "alexnet-owt", "--precision", w.precision,
                     "--batch-size", str(w.batch), *w.profile_steps, "--stages", "model,end_to_end",
                     "--json", str(profile)])
    if step is not None:
        report = json.loads(profile.read_text()) if step.returncode == 0 and profile.is_file() else {}
        figure = {"bound_by": report.get("bound_by"), "efficiency": report.get("efficiency"),
                  "end_to_end_img_per_s": report.get("stages", {}).get("end_to_end", {}).get("img_per_s")}
        run.record("end-to-end profile and verdict", step,
                   (bool(report.get("bound_by")), "the report names the bounding stage", ""), figure)


def torch_phase(run: Runner, no_compile: str | None) -> None:
    w, py = run.sizes, sys.executable
    run.pytest_step("pytest", "pytest tests/gpu/test_torch_gpu.py", "tests/gpu/test_torch_gpu.py",
                    deselect="compile" if no_compile else None)
    if no_compile:
        run.summary.skip_tests("pytest tests/gpu/test_torch_gpu.py",
                               [("tests/gpu/test_torch_gpu.py -k compile", f"deselected: {no_compile}")])
    for key, batch, compiled in (("eager256", w.model_batches[0], False), ("eager512", w.model_batches[1], False),
                                 ("compiled256", w.model_batches[0], True)):
        name = f"model-only img/s alexnet-owt {w.precision} batch {batch} {'compiled' if compiled else 'eager'}"
        if compiled and no_compile:
            run.skip(key, name, no_compile)
            continue
        out = run.work / f"model_{key}.json"
        step = run.step(key, name, [py, "-m", "alexnet_fast.tools.cli", "profile",
                                    "--device", "cpu" if run.dry_run else "cuda", "--arch", "alexnet-owt",
                                    "--precision", w.precision, "--batch-size", str(batch), *w.profile_steps,
                                    "--stages", "model", "--json", str(out), *(["--compile"] if compiled else [])])
        if step is not None:
            stage = json.loads(out.read_text())["stages"]["model"] if step.returncode == 0 and out.is_file() else {}
            run.record(name, step, (bool(stage.get("img_per_s")), "a positive model-only img/s", ""),
                       {"img_per_s": stage.get("img_per_s")})


PREFLIGHT = """
import importlib, json, sys
missing, out = [], {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
out["missing"] = missing
if not missing:
    import torch
    out["versions"] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    if "nvidia.dali" in sys.argv[1:]:
        import nvidia.dali, nvidia.dali.backend as b
        out["versions"]["dali"] = nvidia.dali.__version__
        out["versions"]["dali_from"] = nvidia.dali.__file__
        out["dali_gpus"] = b.GetCUDADeviceCount()
    out["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out["device"] = torch.cuda.get_device_name(0) if out["gpus"] else None
print(json.dumps(out))
"""


def refuse(summary: Summary, message: str) -> int:
    summary.refused = message
    summary.write()
    print(f"gpu_check: {message}", file=sys.stderr)
    return REFUSED


def preflight(summary: Summary, runner: Runner, phases: list[str]) -> str | None:
    """Imports, GPU and DALI backend; returns the refusal message or None."""
    runner.start_phase("preflight")
    needs = sorted({n for p in phases for n in NEEDS[p]})
    step = runner.step("preflight", "preflight", [sys.executable, "-c", PREFLIGHT, *needs])
    found = last_json(step.output) if step is not None and step.returncode == 0 else None
    if found is None:
        why = f"timed out after {step.seconds:.0f} s" if step.returncode is None else f"exit {step.returncode}"
        return f"the package check did not answer ({why}); see steps.log (`python3 -c 'import torch'`)"
    if found["missing"]:
        return (f"phase {'+'.join(phases)} needs {'; '.join(found['missing'])}: reassemble the offline bundle "
                f"and pass --extra-site (docs/gpu.md)")
    summary.versions, summary.device = found["versions"], found.get("device")
    if not runner.dry_run and not found["gpus"]:
        return f"no CUDA GPU visible to torch {found['versions']['torch']}: this check needs one (or --dry-run)"
    if not runner.dry_run and "dali" in phases and not found.get("dali_gpus"):
        return f"DALI {found['versions'].get('dali')} sees no CUDA device: a CPU-only DALI wheel?"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="folder for summary.json, steps.log, profile.json")
    parser.add_argument("--extra-site", type=Path, default=None, help="the reassembled offline bundle (site/)")
    parser.add_argument("--phase", choices=("dali", "torch", "all"), default="all", help="all = dali, then torch")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder, kept [a temporary one, removed]")
    parser.add_argument("--dry-run", action="store_true", help="walk every step on a machine without a GPU")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every budget (a dry run on a loaded machine; recorded in summary.json)")
    args = parser.parse_args(argv)
    # relative to the caller's folder, not the checkout the children run in
    for name in ("results", "extra_site", "work"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = list(PHASES) if args.phase == "all" else [args.phase]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "steps.log").unlink(missing_ok=True)
    budgets = {"preflight": PHASE_BUDGET_S["preflight"], **{p: PHASE_BUDGET_S[p] for p in phases}}
    summary = Summary(args.results / "summary.json", phases, args.dry_run, {**budgets, "sum": sum(budgets.values())},
                      time_scale=args.time_scale)
    if args.extra_site is not None and not args.extra_site.is_dir():
        return refuse(summary, f"--extra-site {args.extra_site}: no such folder")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return run_check(args, summary, phases, args.work)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:      # removed at the end, shards and all
        return run_check(args, summary, phases, Path(work))


def run_check(args: argparse.Namespace, summary: Summary, phases: list[str], work: Path) -> int:
    runner = Runner(summary, child_env(args.extra_site, make_shim(work)), work, args.results, args.dry_run,
                    args.time_scale)
    print(budget_table(phases, args.time_scale), flush=True)
    refusal = preflight(summary, runner, phases)
    if refusal:
        return refuse(summary, refusal)
    no_compile = compile_missing()
    summary.versions["torch_compile"] = f"skipped: {no_compile}" if no_compile else "C compiler and Python.h found"
    print(f"gpu_check: {summary.device or 'no GPU (dry run)'}, {json.dumps(summary.versions)}; phases "
          f"{', '.join(phases)}; results in {args.results}", flush=True)
    for phase in phases:
        runner.start_phase(phase)
        dali_phase(runner) if phase == "dali" else torch_phase(runner, no_compile)
    print(summary.table(), flush=True)
    return 1 if summary.counts()["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
