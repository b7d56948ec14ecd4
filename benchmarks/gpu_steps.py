"""The device check's bookkeeping (benchmarks/gpu_check.py): run one step as its own process group
under a time limit, read pytest's JUnit report, and keep the summary.

A step is a child process started in a new session (`start_new_session=True`): on timeout the
whole group is sent SIGTERM, then SIGKILL 5 s later, so no `train`, DALI or pytest grandchild is
left holding the GPU for the next step. Output goes to a file, not a pipe: a grandchild that
outlived its parent cannot keep the driver waiting on an open pipe.

Each check records `passed` True/False/None (None: not judged, with the reason: not on a GPU, not
run for lack of time, skipped by a preflight), its figure, the assertion it made and its budget.
pytest steps list their skipped tests by name and reason; a skip is never counted as a pass.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

KILL_GRACE_S = 5.0


@dataclass
class StepRun:
    returncode: int | None          # None: timed out (the group was killed)
    seconds: float
    output: str
    cpu_s: float = 0.0              # CPU seconds of the step's reaped processes (load-independent)
    budget_s: float = 0.0           # the step's own budget (gpu_check.STEP_BUDGET_S)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def run_group(cmd: list[str], *, cwd: Path, env: dict, limit_s: float, output: Path) -> StepRun:
    """Run CMD in its own process group with output to OUTPUT; kill the whole group at LIMIT_S."""
    start, cpu = time.monotonic(), _children_cpu_s()
    with open(output, "wb") as sink:
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            returncode = child.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            returncode = None
        except BaseException:            # the driver itself interrupted: leave nothing running
            _signal_group(child.pid, signal.SIGKILL)
            child.wait()
            raise
        # the leader has exited (or timed out): end whatever of its group is left, leader first
        if returncode is None:
            _signal_group(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(child.pid, signal.SIGKILL)
        child.wait()
    return StepRun(returncode, time.monotonic() - start, output.read_text(errors="replace"),
                   cpu_s=_children_cpu_s() - cpu)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def junit_outcomes(report: Path) -> dict:
    """pytest's --junitxml report as {"passed": [...], "failed": [(test, message)], "skipped": [(test, reason)]}."""
    outcomes = {"passed": [], "failed": [], "skipped": []}
    if not report.is_file():
        return outcomes
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        problem = next((c for c in case if c.tag in ("failure", "error")), None)
        skipped = next((c for c in case if c.tag == "skipped"), None)
        if problem is not None:
            outcomes["failed"].append((name, (problem.get("message") or "").splitlines()[0][:300] if
                                       problem.get("message") else problem.tag))
        elif skipped is not None:
            outcomes["skipped"].append((name, skipped.get("message") or ""))
        else:
            outcomes["passed"].append(name)
    return outcomes


@dataclass
class CheckRecord:
    name: str
    passed: bool | None
    seconds: float
    budget_s: float
    assertion: str = ""
    cpu_s: float | None = None
    figure: dict | None = None
    detail: str = ""


@dataclass
class Summary:
    """summary.json: rewritten after every step so a killed run still leaves what it did."""
    path: Path
    phases: list[str]
    dry_run: bool
    budgets: dict
    time_scale: float = 1.0
    date_utc: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    device: str | None = None
    versions: dict = field(default_factory=dict)
    checks: list[CheckRecord] = field(default_factory=list)
    skipped_tests: list[dict] = field(default_factory=list)
    refused: str | None = None

    def record(self, check: CheckRecord) -> None:
        self.checks.append(check)
        self.write()
        mark = {True: "pass", False: "FAIL", None: "n/a "}[check.passed]
        cpu = f", {check.cpu_s:.0f} CPU-s" if check.cpu_s is not None else ""
        print(f"  {mark} {check.name} ({check.seconds:.0f} of {check.budget_s:.0f} s{cpu}) {check.detail}", flush=True)

    def skip_tests(self, step: str, skipped: list[tuple[str, str]]) -> None:
        self.skipped_tests += [{"step": step, "test": test, "reason": reason} for test, reason in skipped]
        self.write()

    def counts(self) -> dict:
        results = [c.passed for c in self.checks]
        return {"passed": results.count(True), "failed": results.count(False), "not_judged": results.count(None),
                "skipped_tests": len(self.skipped_tests)}

    def write(self) -> None:
        body = {"phases": self.phases, "dry_run": self.dry_run, "time_scale": self.time_scale, "date_utc": self.date_utc, "device": self.device,
                "versions": self.versions, "budgets_s": self.budgets, "checks": [asdict(c) for c in self.checks],
                "skipped_tests": self.skipped_tests, "counts": self.counts(),
                "passed": bool(self.checks) and all(c.passed is True for c in self.checks)
                and not self.skipped_tests and self.refused is None}
        if self.refused is not None:
            body["refused"] = self.refused
        self.path.write_text(json.dumps(body, indent=2) + "\n")

    def table(self) -> str:
        """The closing table: each step's result, figure and assertion; skipped tests by name and reason."""
        lines = ["", f"{'result':6} {'s':>4}/{'budget':<6} {'CPU-s':>5} step: figure | assertion"]
        for c in self.checks:
            mark = {True: "pass", False: "FAIL", None: "n/a"}[c.passed]
            figure = json.dumps(c.figure) if c.figure else "-"
            cpu = "-" if c.cpu_s is None else f"{c.cpu_s:.0f}"
            lines.append(f"{mark:6} {c.seconds:4.0f}/{c.budget_s:<6.0f} {cpu:>5} {c.name}: {figure} | {c.assertion or '-'}"
                         + (f" [{c.detail}]" if c.detail and c.passed is not True else ""))
        if self.skipped_tests:
            lines.append(f"skipped tests ({len(self.skipped_tests)}, not counted as passed):")
            lines += [f"  {s['test']}: {s['reason']}" for s in self.skipped_tests]
        counts = self.counts()
        lines.append(f"{counts['passed']} passed, {counts['failed']} failed, {counts['not_judged']} not judged, "
                     f"{counts['skipped_tests']} tests skipped")
        return "\n".join(lines)
