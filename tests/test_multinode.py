"""Two nodes on one machine: two torchrun agents, each its own process, meet through a c10d
rendezvous (`--nnodes 2 --nproc-per-node 1`, gloo on the CPU) and run the ordinary
`alexnet-fast train` / `eval`, which join the outer torchrun. This is what `srun torchrun ...` does
on a SLURM cluster (docs/multinode.md), with localhost standing in for the first node.

- replicas bitwise equal: each rank reports a digest of its weights when it leaves the process
  group (a test-side entry point wraps the CLI: tests/, not the product, records the model), and
  both equal the digest of the weights in rank 0's checkpoint;
- rank 0 alone writes into RUN, and only rank 0's command prints;
- SIGTERM to both agents (what SLURM sends at the time limit): rank 0 writes a checkpoint; `--resume`
  then logs the losses of an uninterrupted run exactly (dropout on: every rank's RNG state travels
  in the checkpoint);
- `eval` over the two nodes equals one process's top-1/top-5, every val image counted once;
- a rank SIGKILLed on one node ends the run on both within seconds, and the surviving node's
  command says so in one line.

The rank each agent gets is the rendezvous's choice (c10d ignores --node-rank), so the tests find
rank 0 from what the agents printed or from their workers' environment, never by start order.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

CLI = ["-m", "alexnet_fast.tools.cli"]
SMALL = ["--device", "cpu", "--arch", "alexnet-owt", "--batch-size", "4", "--workers", "1", "--seed", "3",
         "--log-every", "1", "--lr", "0.005"]
# Files a training run leaves in RUN, all from rank 0's process (metrics, checkpoints, plot, lock).
RUN_FILES = {".alexnet-fast.lock", "config.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png"}

# The entry point that wraps `alexnet-fast`: it remembers the network each rank hands to DDP and,
# when the rank leaves the process group, writes the digest of its weights to $WEIGHTS_DIGEST_DIR.
WEIGHTS_SHIM = textwrap.dedent('''
    import hashlib, os, sys
    from pathlib import Path


    def weights_digest(state_dict) -> str:
        h = hashlib.sha256()
        for name in sorted(state_dict):
            h.update(name.encode())
            h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


    if __name__ == "__main__":
        from alexnet_fast.model import distributed as D
        from alexnet_fast.tools.cli import run

        models = []
        wrap_ddp, teardown = D.wrap_ddp, D.teardown

        def recording_wrap_ddp(model, ctx, *args, **kwargs):
            models.append(model)
            return wrap_ddp(model, ctx, *args, **kwargs)

        def digesting_teardown():
            if models:
                out = Path(os.environ["WEIGHTS_DIGEST_DIR"]) / f"rank{os.environ['RANK']}.sha256"
                out.write_text(weights_digest(models[-1].state_dict()))
            teardown()

        D.wrap_ddp, D.teardown = recording_wrap_ddp, digesting_teardown
        sys.argv[0] = "alexnet-fast"
        run()
''')

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


@dataclass
class Node:
    proc: subprocess.Popen
    stdout: Path
    stderr: Path

    def out(self) -> str:
        return self.stdout.read_text()

    def err(self) -> str:
        return self.stderr.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    # one thread per process: the two ranks share this machine's cores, and every run must reduce
    # floats in the same order for the resumed losses to equal the uninterrupted ones
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def start_two_nodes(logs: Path, entry: list[str], args: list[str], env: dict | None = None) -> list[Node]:
    """Two torchrun agents, each its own process, as `srun torchrun ...` starts one per node."""
    logs.mkdir(parents=True, exist_ok=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                "--rdzv-id", uuid.uuid4().hex[:8], "--max-restarts", "0"]
    nodes = []
    for n in range(2):
        stdout, stderr = logs / f"node{n}.out", logs / f"node{n}.err"
        with open(stdout, "w") as o, open(stderr, "w") as e:
            proc = subprocess.Popen([*torchrun, *entry, *args], stdout=o, stderr=e, env=env or _env())
        nodes.append(Node(proc, stdout, stderr))
    return nodes


def wait_all(nodes: list[Node], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [n.proc.wait(timeout=max(1.0, deadline - time.monotonic())) for n in nodes]
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.kill()
                n.proc.wait()


def run_two_nodes(logs: Path, entry: list[str], args: list[str], env: dict | None = None) -> list[Node]:
    nodes = start_two_nodes(logs, entry, args, env)
    codes = wait_all(nodes)
    assert codes == [0, 0], "\n".join(n.err()[-3000:] for n in nodes)
    return nodes


def rank0_node(nodes: list[Node], marker: str) -> tuple[Node, Node]:
    """(the node whose command printed `marker`, the other); exactly one may print it."""
    printed = [n for n in nodes if marker in n.out()]
    assert len(printed) == 1, [n.out()[-500:] for n in nodes]
    return printed[0], next(n for n in nodes if n is not printed[0])


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "val_top1" not in r]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records if "val_top1" not in r}


def _load_shim(path: Path):
    spec = importlib.util.spec_from_file_location("weights_shim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shard_set, wait_for_step) -> dict:
    """An uninterrupted STEPS-step two-node run (through the digest-reporting entry point), and one
    stopped by SIGTERM to both agents (as SLURM stops a job), then resumed (through the plain CLI)."""
    root = tmp_path_factory.mktemp("multinode")
    shim = root / "weights_shim.py"
    shim.write_text(WEIGHTS_SHIM)
    digests = root / "digests"
    digests.mkdir()
    flags = ["train", "--data", str(shard_set), *SMALL, "--max-steps", str(STEPS)]
    # The uninterrupted run and the one to stop run side by side (their start-ups, mostly waiting on
    # imports and rendezvous, overlap): the stopped one is compared with the straight one only after both end.
    straight = start_two_nodes(root / "logs-straight", [str(shim)], [*flags, "--out", str(root / "straight")],
                               env=_env(WEIGHTS_DIGEST_DIR=str(digests)))
    stopped = start_two_nodes(root / "logs-stopped", CLI, [*flags, "--out", str(root / "resumed")])
    try:
        wait_for_step(root / "resumed", 1, [n.proc for n in stopped], timeout=180)
        for node in stopped:
            node.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stop_codes = wait_all(stopped, timeout=180)     # killed after that: a hang, not a stop
        stop_s = time.monotonic() - signalled
        straight_codes = wait_all(straight)
    finally:
        for node in stopped + straight:
            if node.proc.poll() is None:
                node.proc.kill()
    assert straight_codes == [0, 0], "\n".join(n.err()[-3000:] for n in straight)
    resumed = run_two_nodes(root / "logs-resume", CLI, [*flags, "--out", str(root / "resumed"), "--resume"])
    return {"root": root, "shim": _load_shim(shim), "digests": digests, "straight": straight, "stopped": stopped,
            "stop_codes": stop_codes, "stop_s": stop_s, "resumed": resumed}


def test_replicas_on_both_nodes_are_bitwise_equal(runs):
    saved = torch.load(runs["root"] / "straight" / "last.pt", map_location="cpu", weights_only=False)
    assert saved["step"] == STEPS
    reported = {p.name: p.read_text() for p in runs["digests"].iterdir()}
    assert sorted(reported) == ["rank0.sha256", "rank1.sha256"]
    assert reported["rank0.sha256"] == reported["rank1.sha256"] == runs["shim"].weights_digest(saved["model"])


def test_rank_zero_alone_writes_the_run_directory_and_prints(runs):
    run = runs["root"] / "straight"
    assert {p.name for p in run.iterdir()} == RUN_FILES
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["per_rank_batch"] == 2
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    main, other = rank0_node(runs["straight"], "config:")
    assert "epoch 1: loss" in main.out()
    assert other.out() == ""                       # rank 1's command prints nothing...
    assert "alexnet-fast" not in other.err()       # ...and warns about nothing
    assert (run / ".alexnet-fast.lock").read_text() == ""     # released: it names nobody


def test_sigterm_to_both_agents_writes_a_checkpoint_and_resume_continues_exactly(runs):
    run = runs["root"] / "resumed"
    # torchrun's agents end on SIGTERM by raising (exit 1, their own traceback); only one killed by
    # wait_all's 180 s limit would mean a hang
    assert -signal.SIGKILL not in runs["stop_codes"], \
        f"still running {runs['stop_s']:.0f} s after SIGTERM (exit codes {runs['stop_codes']})"
    main, other = rank0_node(runs["stopped"], "stopped by SIGTERM")
    assert other.out() == ""
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+): checkpoint written", main.out()).group(1))
    assert 1 <= stopped_at < STEPS, "the signal came too late to test a resume"

    main, _ = rank0_node(runs["resumed"], "resumed from")
    assert f"resumed from {run / 'last.pt'}: epoch 0, step {stopped_at}" in main.out()
    expected, got = losses(runs["root"] / "straight"), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))     # each step logged once, before or after the stop
    assert got == expected                     # bitwise: the same floats, stopped or not
    final = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    straight = torch.load(runs["root"] / "straight" / "last.pt", map_location="cpu", weights_only=False)
    assert final["step"] == STEPS
    assert runs["shim"].weights_digest(final["model"]) == runs["shim"].weights_digest(straight["model"])


def test_eval_across_nodes_counts_every_val_image_once(runs, shard_set):
    args = ["eval", "--data", str(shard_set), "--checkpoint", str(runs["root"] / "straight"), "--device", "cpu",
            "--batch-size", "4", "--workers", "1", "--json"]
    nodes = run_two_nodes(runs["root"] / "logs-eval", CLI, args)
    main, other = rank0_node(nodes, '"images"')
    assert other.out() == ""
    two_nodes = json.loads(main.out().strip().splitlines()[-1])
    one = subprocess.run([sys.executable, *CLI, *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two_nodes == json.loads(one.stdout.strip().splitlines()[-1])
    assert two_nodes["images"] == 16               # the fixture's whole val split


def _workers_by_rank(nodes: list[Node]) -> dict[int, int]:
    """{rank: pid} of the workers the agents started (each agent's children running our CLI)."""
    found = {}
    for node in nodes:
        pid = node.proc.pid
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"alexnet_fast.tools.cli" in cmdline:
                rank = next(int(v[5:]) for v in environ if v.startswith(b"RANK="))
                found[rank] = int(child)
    return found


def test_a_killed_rank_ends_the_run_on_both_nodes_in_one_line(shard_set, tmp_path, wait_for_step):
    run = tmp_path / "run"
    nodes = start_two_nodes(tmp_path / "logs", CLI, ["train", "--data", str(shard_set), *SMALL,
                                                     "--max-steps", "1000", "--out", str(run)])
    try:
        wait_for_step(run, 1, [n.proc for n in nodes], timeout=180)
        workers = _workers_by_rank(nodes)
        assert sorted(workers) == [0, 1], workers
        # the run directory is held for the whole run by rank 0's process, on whichever node it is
        holder = json.loads((run / ".alexnet-fast.lock").read_text())
        assert holder["pid"] == workers[0] and holder["command"] == "train"
        second = subprocess.run([sys.executable, *CLI, "train", "--data", str(shard_set), *SMALL, "--out", str(run)],
                                env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"pid {workers[0]}" in second.stderr, second.stderr[-2000:]

        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        # killed after 180 s: still far below the 10-minute watchdog a survivor would otherwise wait out
        codes = wait_all(nodes, timeout=180)
        took = time.monotonic() - killed_at
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.kill()
    assert codes == [1, 1], f"exit codes {codes} {took:.0f} s after the kill"
    survivor = next(n for n in nodes if "config:" in n.out())
    ours = [line for line in survivor.err().splitlines() if line.startswith("alexnet-fast")]
    assert len(ours) == 1, survivor.err()[-3000:]
    assert ours[0].startswith("alexnet-fast: error: rank 0: lost contact with another rank (")
    # no traceback from the worker (torchrun prefixes the worker's own with [rankN]:)
    assert not any(line.startswith("[rank") for n in nodes for line in n.err().splitlines())


def test_the_predicted_scaling_over_nodes_in_the_docs_is_what_the_tool_prints():
    """docs/multinode.md's table: each row as `alexnet-fast profile --scaling` prints it today."""
    from click.testing import CliRunner

    from alexnet_fast.tools.cli import main

    doc = (Path(__file__).resolve().parents[1] / "docs" / "multinode.md").read_text()
    for gbps in (100, 200, 400):
        result = CliRunner().invoke(main, ["profile", "--scaling", "--assume-img-per-s", "40000", "--batch-size", "256",
                                           "--link-gbps", str(gbps), "--scaling-gpus", "16,32,64"])
        assert result.exit_code == 0, result.output
        ddp_table = result.stdout.split("--parallel schemes")[0]      # the per-scheme table follows it
        rows = [line.split() for line in ddp_table.splitlines() if re.match(r"\s+(16|32|64)\s", line)]
        assert len(rows) == 3, result.stdout
        for row in rows:
            gpus = int(row[0])
            cells = re.findall(r"([\d,]+) \(\s*(\d+)%", " ".join(row[1:]))
            assert len(cells) == 4, row
            expected = (f"| {gpus // 8} ({gpus} GPUs) | {gbps} Gbit/s | "
                        + " | ".join(f"{value} ({pct}%)" for value, pct in cells) + " |")
            assert expected in doc, expected
