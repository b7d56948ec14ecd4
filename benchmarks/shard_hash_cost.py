"""Does the background shard hash check (model/shard_check.py) slow a training step?

    python benchmarks/shard_hash_cost.py --data SHARDS [--device cpu|cuda] [--batch-size 16]
                                         [--steps 8] [--rounds 4] [--json FILE]

Times `train_step` (the trainer's own step: forward, backward, SGD) of alexnet-owt on fixed random
images, in alternating blocks of `--steps` steps: without the check, then with it hashing, `--rounds`
times each (alternating, so a change of load on a shared machine hits both alike). "With" keeps
the real `BackgroundShardCheck` busy for the whole block: a new one over SHARDS is started whenever
the previous one finished, so the block sees hashing throughout (a worst case: the real check hashes
the set once). Reports the median step time of each and their ratio, the hash rate the thread
reached meanwhile, and the load average before and after (a busy machine must say so).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from datetime import datetime, timezone

import click
import torch


def _steps(engine, images, labels, n: int) -> list[float]:
    from alexnet_fast.model.loop import train_step

    times = []
    for _ in range(n):
        started = time.perf_counter()
        loss = train_step(engine, images, labels)
        loss.item()                     # the step is done when its loss is on the host
        times.append(time.perf_counter() - started)
    return times


class _KeepHashing:
    """Runs BackgroundShardCheck over the set again and again until stopped; counts bytes hashed."""

    def __init__(self, shard_set) -> None:
        self.shard_set, self.bytes, self.seconds = shard_set, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        from alexnet_fast.model.shard_check import BackgroundShardCheck

        size = sum(os.path.getsize(s.tar) for split in ("train", "val") if self.shard_set.has_split(split)
                   for s in self.shard_set.shards(split))
        started = time.perf_counter()
        while not self._stop.is_set():
            check = BackgroundShardCheck(self.shard_set, 0, 1)
            check.start()
            check._thread.join()
            self.bytes += size
        self.seconds = time.perf_counter() - started

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@click.command()
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="a shard set to hash")
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--batch-size", default=16, show_default=True)
@click.option("--steps", default=8, show_default=True, help="steps per block")
@click.option("--rounds", default=4, show_default=True, help="blocks with and without the check, alternating")
@click.option("--json", "json_out", default=None, help="also write the figures here")
def main(data: str, device: str, batch_size: int, steps: int, rounds: int, json_out: str | None) -> None:
    from alexnet_fast.model.config import TrainConfig
    from alexnet_fast.model.loop import Engine
    from alexnet_fast.model.optim import make_optimizer
    from alexnet_fast.model.runtime import place_network, resolve_precision, seed_everything, set_backend_flags
    from alexnet_fast.pipeline.shardset import ShardSet

    dev = torch.device(device)
    set_backend_flags(dev)
    seed_everything(0)
    on_gpu = dev.type == "cuda"
    model = place_network("alexnet-owt", 1000, dev, channels_last=on_gpu)
    optimizer = make_optimizer(TrainConfig(), model, dev)
    engine = Engine(model, optimizer, torch.amp.GradScaler(dev.type, enabled=False), None, dev,
                    resolve_precision("auto", dev.type), on_gpu)
    images = torch.randn(batch_size, 3, 227, 227, device=dev)
    labels = torch.randint(0, 1000, (batch_size,), device=dev)
    shard_set = ShardSet.open(data)
    load_before = open("/proc/loadavg").read().split()[:3]
    _steps(engine, images, labels, 3)                       # warm-up
    without, with_check, hashed, hash_seconds = [], [], 0, 0.0
    for _ in range(rounds):
        without += _steps(engine, images, labels, steps)
        with _KeepHashing(shard_set) as hashing:
            with_check += _steps(engine, images, labels, steps)
        hashed, hash_seconds = hashed + hashing.bytes, hash_seconds + hashing.seconds
    load_after = open("/proc/loadavg").read().split()[:3]
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()}",
        "cpus": os.cpu_count(), "device": device, "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "batch_size": batch_size, "steps_each": len(without),
        "median_step_s_without": statistics.median(without), "median_step_s_with": statistics.median(with_check),
        "ratio_with_over_without": statistics.median(with_check) / statistics.median(without),
        "hash_mb_per_s_meanwhile": hashed / 1e6 / max(hash_seconds, 1e-9),
        "loadavg_before": load_before, "loadavg_after": load_after,
    }
    click.echo(json.dumps(result, indent=1))
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
