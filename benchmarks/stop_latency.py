"""How long a training run takes from SIGTERM (or SIGINT) to its exit, `last.pt` written.

    python benchmarks/stop_latency.py [--data SHARDS] [--signal TERM|INT] [--nproc 1|2] [--repeats 3] [--json FILE]

Starts `alexnet-fast train` on the CPU (alexnet-owt, batch 4, without --data on a small procedural
shard set written to a temp dir first), waits until it has logged its first step, sends the
signal (to the command: with --nproc 2 that is the launcher, which passes it on to its workers)
and measures the seconds until the command exits. Each run must exit 0 with a checkpoint written,
else the script stops naming it. Prints each run and the median; most of a stop is writing the
~450 MB checkpoint, so the disk and the machine's load show in the figure.

The tests only tell a stop from a hang (tests/reliability/test_training_faults.py,
tests/test_train_resume.py); the number belongs here and in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

TRAIN = [sys.executable, "-m", "alexnet_fast.tools.cli", "train", "--device", "cpu", "--arch", "alexnet-owt",
         "--batch-size", "4", "--workers", "1", "--log-every", "1", "--epochs", "50"]


def small_shard_set(root: Path) -> str:
    """A procedural shard set: 2 classes x 8 train images, 2 val images per class."""
    from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet
    from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

    raw = write_raw_imagenet(root / "raw", SampleSpec(classes=2, train_per_class=8, val_per_class=2, odd_files=False,
                                                       val_layout=ValFormat.FOLDERS))
    make_shards(raw.root, root / "shards", ShardOptions(per_shard=8), workers=1, progress=False, log=lambda msg: None)
    return str(root / "shards")


def first_step_logged(run: Path) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.exists() and any(line.endswith("}") for line in metrics.read_text().splitlines())


def one_stop(data: str, run: Path, sig: signal.Signals, nproc: int) -> float:
    """Seconds from `sig` to the exit of a run that has logged a step."""
    threads = "1" if nproc > 1 else "2"
    proc = subprocess.Popen([*TRAIN, "--data", data, "--out", str(run), "--nproc", str(nproc)],
                            env={**os.environ, "OMP_NUM_THREADS": threads}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        while not first_step_logged(run):
            if proc.poll() is not None:
                raise SystemExit(f"stop_latency: the run ended before a step was logged: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(sig)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=600)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0 or not (run / "last.pt").exists():
        raise SystemExit(f"stop_latency: exit {proc.returncode} after {sig.name}, last.pt "
                         f"{'written' if (run / 'last.pt').exists() else 'missing'}: {err[-2000:]}")
    return seconds


@click.command()
@click.option("--data", default=None, help="shard set (default: a small procedural one in a temp dir)")
@click.option("--signal", "sig_name", type=click.Choice(["TERM", "INT"]), default="TERM", show_default=True)
@click.option("--nproc", type=click.IntRange(1, 2), default=1, show_default=True, help="CPU processes (gloo)")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the figures here")
def main(data, sig_name, nproc, repeats, json_path):
    sig = signal.Signals[f"SIG{sig_name}"]
    with tempfile.TemporaryDirectory(prefix="stop_latency_") as tmp:
        data = data or small_shard_set(Path(tmp))
        seconds = []
        for n in range(repeats):
            seconds.append(one_stop(data, Path(tmp) / f"run{n}", sig, nproc))
            print(f"run {n + 1}: {sig.name} to exit {seconds[-1]:.1f} s", flush=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    result = {"signal": sig.name, "nproc": nproc, "seconds": seconds, "median_s": statistics.median(seconds),
              "load_average_1min": float(load)}
    print(f"{sig.name}, {nproc} process(es): median {result['median_s']:.1f} s over {repeats} run(s) "
          f"(load average {load})")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
