"""--parallel ddp | columns | hybrid | hybrid-pipelined, measured: step time on N CPU ranks (gloo) in the same run,
interleaved, and the bytes each rank passes per step (counted at the collectives), plus the bytes
per step at the recipes' batch sizes from the accounting the scaling model uses.

    python benchmarks/parallel.py --ranks 2 --batch 4 --steps 3 --json out.json
    python benchmarks/parallel.py --bytes-only          # the recipes' table, no processes

Step times on a shared CPU depend on the load: the JSON records /proc/loadavg before and after.
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

SCHEMES = ("ddp", "hybrid", "hybrid-pipelined", "columns")
ARCH = "alexnet2012"         # the one network every scheme runs


def bytes_table() -> list[dict]:
    """Per-GPU MB passed and sent per step, at each recipe's global batch, on 2/4/8 GPUs; activations
    in fp32 and under bf16 autocast (the GPU default)."""
    from alexnet_fast.model.config import Recipe, resolve_config
    from alexnet_fast.model.parallel.accounting import step_traffic

    rows = []
    for recipe in Recipe:
        cfg = resolve_config(recipe.value)
        for gpus in (2, 4, 8):
            for scheme in SCHEMES:
                t = step_traffic(scheme, ARCH, 1000, cfg.batch_size, gpus)
                bf16 = step_traffic(scheme, ARCH, 1000, cfg.batch_size, gpus, activation_bytes=2)
                rows.append({"recipe": recipe.value, "global_batch": cfg.batch_size, "gpus": gpus, "scheme": scheme,
                             "passed_mb": t.passed_bytes / 1e6, "sent_mb": t.sent_bytes / 1e6,
                             "sent_mb_bf16": bf16.sent_bytes / 1e6})
    return rows


def worker(batch: int, steps: int, out: str) -> None:
    """One rank: each scheme in turn, `steps` timed steps after one warm-up, round-robin twice."""
    import torch
    import torch.nn.functional as F

    from alexnet_fast.model import distributed as D
    from alexnet_fast.model.alexnet import build_model
    from alexnet_fast.model.config import TrainConfig
    from alexnet_fast.model.optim import make_optimizer
    from alexnet_fast.model.parallel import split_network

    ctx = D.setup("cpu")
    results: dict[str, dict] = {s: {"step_s": []} for s in SCHEMES}
    for _ in range(2):
        for scheme in SCHEMES:
            torch.manual_seed(0)
            model = build_model(ARCH, 1000, dropout=0.0)
            split = split_network(scheme, model, ctx, count_traffic=True)
            optimizer = make_optimizer(TrainConfig(), split.trainable)
            share = batch // split.data_ranks
            images, labels = torch.randn(share, 3, 227, 227), torch.randint(0, 1000, (share,))
            for step in range(steps + 1):
                D.barrier()
                started = time.perf_counter()
                split.traffic.reset()
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(split.network(images), labels).backward()
                optimizer.step()
                D.barrier()
                if step:
                    results[scheme]["step_s"].append(time.perf_counter() - started)
            results[scheme]["passed_bytes"] = split.traffic.passed_bytes
            results[scheme]["sent_bytes"] = split.traffic.sent_bytes
    if ctx.is_main:
        Path(out).write_text(json.dumps(results))
    D.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=4, help="global batch of the timed steps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--bytes-only", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(int(args.worker[0]), int(args.worker[1]), args.worker[2])
    report: dict = {"bytes_at_recipe_batches": bytes_table()}
    for row in report["bytes_at_recipe_batches"]:
        print(f"{row['recipe']:<12} batch {row['global_batch']:>5} {row['gpus']} GPUs {row['scheme']:<16} "
              f"passed {row['passed_mb']:8.1f} MB  sent {row['sent_mb']:8.1f} MB (bf16 activations: "
              f"{row['sent_mb_bf16']:8.1f}) per GPU per step")
    if not args.bytes_only:
        report["load_before"] = Path("/proc/loadavg").read_text().split()[:3]
        report["timed"] = {}
        for ranks in args.ranks:
            # a folder of its own for the ranks' results and for torchrun's log folder, which the
            # launcher never removes (TMPDIR)
            with tempfile.TemporaryDirectory(prefix="alexnet-fast-parallel-bench-") as tmp:
                out = Path(tmp) / "timed.json"
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                str(ranks), __file__, "--worker", str(args.batch), str(args.steps), str(out)],
                               check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp})
                timed = json.loads(out.read_text())
            report["timed"][ranks] = timed
            for scheme, r in timed.items():
                median = sorted(r["step_s"])[len(r["step_s"]) // 2]
                print(f"{ranks} ranks {scheme:<16} median step {median:.2f} s, {r['passed_bytes'] / 1e6:.1f} MB passed "
                      f"per rank (global batch {args.batch})")
        report["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
        print(f"load average before {report['load_before']}, after {report['load_after']} (a shared machine)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
