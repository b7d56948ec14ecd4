"""`alexnet-fast recipes [NAME]`: each recipe's resolved values next to their sources, the accuracy
its source published (and on how many crops), and a *predicted* wall time for the full ImageNet
run on 1, 2 and 8 GPUs from the scaling model (tools/scaling.py) at an assumed per-GPU rate.

    alexnet-fast recipes                      # all four
    alexnet-fast recipes bvlc --assume-img-per-s 20000 --link-gbps 100
    alexnet-fast recipes paper --json
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass

import click

from alexnet_fast.model.config import PUBLISHED, RECIPES, Recipe, resolve_config
from alexnet_fast.model.runtime import resolve_precision
from alexnet_fast.tools.common import CONTEXT
from alexnet_fast.tools.scaling import (SCHEME_GPU_COUNTS, ScalingInputs, Strategy, activation_bytes, batch_hiding_comm,
                                        predict, predict_scheme, ring_allreduce_seconds)

# ILSVRC-2012 train split: the images one epoch reads.
IMAGENET_TRAIN_IMAGES = 1_281_167
# The per-GPU rate docs/scaling.md assumes (alexnet-owt, bf16, batch 256 per GPU, H100-class): an
# assumption, not a measurement — no GPU run of this project exists yet.
ASSUMED_IMG_PER_S = 40_000.0
ASSUMED_LINK_GBPS = 400.0
GPU_COUNTS = (1, 2, 8)


@dataclass(frozen=True)
class WallTime:
    gpus: int
    img_per_s: float
    hours: float
    bound: str
    per_gpu_batch: int


def run_images(recipe: str, train_images: int = IMAGENET_TRAIN_IMAGES) -> int:
    """Training images a recipe's full run reads: epochs of full batches, or max_steps batches if fewer."""
    cfg = resolve_config(recipe)
    per_epoch = train_images // cfg.batch_size * cfg.batch_size
    total = cfg.epochs * per_epoch
    return min(total, cfg.max_steps * cfg.batch_size) if cfg.max_steps else total


def predicted_wall_times(recipe: str, img_per_s: float = ASSUMED_IMG_PER_S, link_gbps: float = ASSUMED_LINK_GBPS,
                         gpu_counts: tuple[int, ...] = GPU_COUNTS) -> list[WallTime]:
    """Training time of the full run (evaluation not included) on N GPUs: the recipe's global batch
    split over them, each GPU computing `img_per_s` at any batch, fp32 DDP all-reduce over a
    `link_gbps` link (the recipe's default: no gradient compression)."""
    cfg = resolve_config(recipe)
    params = _parameter_count(cfg.arch)
    images = run_images(recipe)
    times = []
    for gpus in gpu_counts:
        per_gpu_batch = cfg.batch_size // gpus
        inputs = ScalingInputs(step_seconds=per_gpu_batch / img_per_s, batch=per_gpu_batch, params=params,
                               link_gbps=link_gbps)
        p = predict(inputs, Strategy("ddp_fp32", 4), gpus)
        times.append(WallTime(gpus, p.img_per_s, images / p.img_per_s / 3600, p.bound, per_gpu_batch))
    return times


def scheme_wall_times(recipe: str, img_per_s: float = ASSUMED_IMG_PER_S, link_gbps: float = ASSUMED_LINK_GBPS,
                      gpu_counts: tuple[int, ...] = SCHEME_GPU_COUNTS) -> dict[str, list[WallTime]]:
    """As `predicted_wall_times`, for each --parallel scheme the recipe's network can run, from the
    bytes that scheme really sends (tools/scaling.predict_scheme): 1-8 GPUs, then 2-8 nodes of 8."""
    from alexnet_fast.model.parallel import PARALLEL_NAMES

    cfg = resolve_config(recipe)
    images = run_images(recipe)
    wire = activation_bytes(resolve_precision(cfg.precision, "cuda"))    # the recipe's autocast on a GPU
    times: dict[str, list[WallTime]] = {}
    for parallel in PARALLEL_NAMES:
        for gpus in gpu_counts:
            readers = gpus // 2 if parallel == "columns" else gpus
            if readers < 1 or cfg.batch_size % readers:
                continue
            batch = cfg.batch_size // readers
            inputs = ScalingInputs(step_seconds=batch / img_per_s, batch=batch, params=1, link_gbps=link_gbps,
                                   activation_bytes=wire)
            p = predict_scheme(inputs, parallel, cfg.arch, 1000, gpus)
            if p is not None:
                times.setdefault(parallel, []).append(WallTime(gpus, p.img_per_s, images / p.img_per_s / 3600, p.bound, batch))
    return times


def comm_bound_note(recipe: str, wall_times: list[WallTime], img_per_s: float, link_gbps: float) -> str | None:
    """Why the most GPUs of a comm-bound prediction are slower than fewer, and which per-GPU batch
    would scale; None when no row is comm-bound."""
    bound = [t for t in wall_times if t.bound == "comm"]
    if not bound:
        return None
    t = bound[-1]
    params = _parameter_count(resolve_config(recipe).arch)
    comm_ms = ring_allreduce_seconds(params * 4, t.gpus, link_gbps) * 1e3
    fp32, bf16 = (batch_hiding_comm(params, nbytes, t.gpus, link_gbps, img_per_s) for nbytes in (4, 2))
    return (f"why comm-bound: every step DDP all-reduces all {params * 4 / 1e6:.0f} MB of fp32 gradients "
            f"({params / 1e6:.1f}M parameters), whatever the batch: {comm_ms:.1f} ms on {t.gpus} GPUs, while "
            f"{t.per_gpu_batch} images per GPU compute in {t.per_gpu_batch / img_per_s * 1e3:.1f} ms, of which "
            f"the backward pass (2/3) can hide it. A per-GPU batch of at least {fp32:,} images would scale "
            f"({t.gpus} GPUs: --batch-size {fp32 * t.gpus:,} with --scale-lr); --grad-compression bf16 "
            f"halves the bytes (at least {bf16:,} per GPU); --parallel hybrid or columns send a fraction of "
            f"them (the table below, docs/parallelism.md).")


def _parameter_count(arch: str) -> int:
    import torch

    from alexnet_fast.model.alexnet import build_model, count_parameters

    with torch.device("meta"):          # shapes only: no 61M weights drawn
        return count_parameters(build_model(arch, 1000, init="torch"))


def recipe_report(recipe: str, img_per_s: float, link_gbps: float) -> dict:
    cfg = resolve_config(recipe)
    published = PUBLISHED[Recipe(recipe)]
    wall_times = predicted_wall_times(recipe, img_per_s, link_gbps)
    return {
        "recipe": recipe,
        "values": {name: {"value": getattr(cfg, name), "source": sourced.source}
                   for name, sourced in RECIPES[Recipe(recipe)].items()},
        "published": asdict(published),
        "run_images": run_images(recipe),
        "prediction": {"assumed_img_per_s_per_gpu": img_per_s, "link_gbps": link_gbps,
                       "note": "a prediction from tools/scaling.py at an assumed per-GPU rate, not a measurement",
                       "wall_times": [asdict(t) for t in wall_times],
                       "comm_bound_note": comm_bound_note(recipe, wall_times, img_per_s, link_gbps),
                       "by_parallel": {name: [asdict(t) for t in rows]
                                       for name, rows in scheme_wall_times(recipe, img_per_s, link_gbps).items()}},
    }


def format_report(report: dict) -> str:
    values = report["values"]
    width = max(len(name) for name in values)
    value_width = max(len(str(v["value"])) for v in values.values())
    published = report["published"]
    if published["top1"] is None:
        accuracy = published["source"]
    else:
        accuracy = (f"{published['top1']:.1%} top-1 / {published['top5']:.1%} top-5 on ILSVRC-2012 val, "
                    f"{published['crops']} crop{'s' if published['crops'] > 1 else ''} — {published['source']}")
    prediction = report["prediction"]
    note = prediction.get("comm_bound_note")
    lines = [f"recipe {report['recipe']}", f"  published: {accuracy}"]
    lines += [f"  {name:<{width}} = {str(v['value']):<{value_width}}   {v['source']}" for name, v in values.items()]
    lines.append(f"  full run: {report['run_images'] / 1e6:.1f}M training images; PREDICTED training time "
                 f"(tools/scaling.py at an ASSUMED {prediction['assumed_img_per_s_per_gpu']:,.0f} img/s per GPU, "
                 f"{prediction['link_gbps']:g} Gbit/s link, fp32 DDP; not measured):")
    for t in prediction["wall_times"]:
        lines.append(f"    {t['gpus']} GPU{'s' if t['gpus'] > 1 else ' '}: {t['img_per_s']:>9,.0f} img/s  "
                     f"{t['hours']:6.2f} h  ({t['bound']}-bound)")
    if note:
        lines += textwrap.wrap(note, width=110, initial_indent="    ", subsequent_indent="    ")
    schemes = prediction.get("by_parallel", {})
    if schemes:
        lines.append("  by --parallel scheme (PREDICTED, each scheme's counted bytes; 16-64 GPUs = 2-8 nodes of 8), "
                     "hours:")
        counts = sorted({t["gpus"] for rows in schemes.values() for t in rows})
        width = max(len(name) for name in ["gpus", *schemes])
        lines.append("    " + f"{'gpus':<{width}}" + "".join(f"{g:>8}" for g in counts))
        for name, rows in schemes.items():
            by_gpus = {t["gpus"]: t for t in rows}
            lines.append("    " + f"{name:<{width}}" + "".join(f"{by_gpus[g]['hours']:>8.2f}" if g in by_gpus else f"{'-':>8}"
                                                        for g in counts))
    return "\n".join(lines)


@click.command("recipes", context_settings=CONTEXT)
@click.argument("name", required=False, type=click.Choice([r.value for r in Recipe]))
@click.option("--assume-img-per-s", type=click.FloatRange(min=0, min_open=True), default=ASSUMED_IMG_PER_S,
              show_default=True, help="per-GPU training img/s the wall-time prediction assumes")
@click.option("--link-gbps", type=click.FloatRange(min=0, min_open=True), default=ASSUMED_LINK_GBPS,
              show_default=True, help="per-GPU all-reduce bandwidth, Gbit/s")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
def recipes_command(name: str | None, assume_img_per_s: float, link_gbps: float, as_json: bool) -> None:
    """Show a recipe (or all four): every value `train --recipe NAME` starts from and its source,
    the published accuracy, and a predicted wall time for the full run on 1, 2 and 8 GPUs.
    Every value can still be overridden by its `train` flag."""
    names = [name] if name else [r.value for r in Recipe]
    reports = [recipe_report(n, assume_img_per_s, link_gbps) for n in names]
    if as_json:
        click.echo(json.dumps(reports if name is None else reports[0], indent=2))
    else:
        click.echo("\n\n".join(format_report(r) for r in reports))
