"""`alexnet-fast profile`: img/s of each stage, which one bounds the run, and the scaling model.

    alexnet-fast profile --data shards/imagenet [--device cuda|cpu] [--batch-size N] [--json F] [--plot F]
    alexnet-fast profile --data shards/imagenet --scaling --link-gbps 400
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from alexnet_fast.pipeline.loader_spec import GPU_LOADER_WORKERS_CAP
from alexnet_fast.tools.common import CONTEXT, UserError, check_device
from alexnet_fast.tools.flags import config_options
from alexnet_fast.tools.profile_config import ALL_STAGES, BY_DEVICE, DATA_STAGES, ProfileConfig, Stage


def _default_note(name: str, default) -> str:
    """--help's "[default: ...]": by device for the fields left None (profile_config.BY_DEVICE)."""
    if name in BY_DEVICE:
        return f" [default: {BY_DEVICE[name]['cuda']} GPU, {BY_DEVICE[name]['cpu']} CPU]"
    if name == "workers":
        return f" [default: 0 = this process's cores, at most {GPU_LOADER_WORKERS_CAP} with a GPU]"
    return f" [default: {default}]" if default not in ("", None) else ""


def _parse_stages(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return tuple(Stage(n) for n in names)
    except ValueError:
        raise click.BadParameter(f"{value!r}: choose from {', '.join(s.value for s in Stage)}") from None


def _parse_gpu_counts(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        counts = tuple(int(v) for v in value.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{value!r}: give GPU counts >= 1, comma-separated (e.g. 8,16,32,64)")
    return counts


@click.command("profile", context_settings=CONTEXT)
@config_options(ProfileConfig, exclude=("stages", "num_classes"), default_note=_default_note)
@click.option("--stages", callback=_parse_stages, default=None,
              help="comma-separated subset of read,decode,baseline_decode,model,end_to_end [default: all]")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write the report as JSON here")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write a PNG bar chart of img/s per stage here")
@click.option("--scaling", is_flag=True, help="also predict multi-GPU img/s from the measured model step")
@click.option("--link-gbps", type=click.FloatRange(min=0, min_open=True), default=400.0, show_default=True,
              help="scaling: per-GPU all-reduce bandwidth in Gbit/s (400 = one InfiniBand NDR port per GPU)")
@click.option("--overlap", type=click.FloatRange(0, 1), default=None,
              help="scaling: fraction of the step's compute that hides the all-reduce [2/3: the backward pass]")
@click.option("--hop-latency-us", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="scaling: latency per ring step")
@click.option("--assume-img-per-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="scaling what-if: take this per-GPU model img/s at --batch-size instead of measuring it")
@click.option("--scaling-batch-factor", type=click.IntRange(min=2), default=4, show_default=True,
              help="scaling: the 'larger per-GPU batch' rows use this multiple of --batch-size")
@click.option("--scaling-gpus", callback=_parse_gpu_counts, default=None,
              help="scaling: comma-separated GPU counts to predict, e.g. 8,16,32,64 for 1-8 nodes of 8 GPUs, "
                   "in both tables [default: 1,2,8,64,512 for DDP's strategies, 1,2,4,8,16,32,64 for the "
                   "--parallel schemes]")
def profile_command(stages, json_path, plot_path, scaling, link_gbps, overlap, hop_latency_us, assume_img_per_s,
                    scaling_batch_factor, scaling_gpus, **values):
    """Measure img/s of each stage (read, decode, baseline_decode, model, end_to_end) and say which
    one bounds the run: warm-up, timed repetitions, median.

    Profiles the trainer's run on ONE device in one process: its loader, network, precision and
    backend flags are built as train builds them. --batch-size is the GLOBAL batch of that
    one-device run, which is the batch the device steps on; the --scaling rows give per-GPU
    batches where they mean them.
    """
    from alexnet_fast.pipeline.shardset import ShardSetError
    from alexnet_fast.tools import scaling as sc
    from alexnet_fast.tools.profile_config import ProfileError
    from alexnet_fast.tools.profile_report import format_table, write_plot
    from alexnet_fast.tools.profile_stages import profile

    device = check_device(values.pop("device"))
    if assume_img_per_s is not None and not scaling:
        raise click.BadParameter("only means something with --scaling", param_hint="--assume-img-per-s")
    data = values["data"]
    if stages is None:
        stages = ALL_STAGES if data is not None else () if assume_img_per_s else (Stage.MODEL,)
    if scaling and assume_img_per_s is None and Stage.MODEL not in stages:
        raise click.BadParameter("--scaling needs the model stage (or --assume-img-per-s)", param_hint="--stages")
    for path in (json_path, plot_path):
        if path is not None and not path.parent.is_dir():
            raise UserError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    cfg = ProfileConfig(device=device, stages=tuple(s for s in ALL_STAGES if s in stages), **values).resolved()
    if data is None and set(cfg.stages) & DATA_STAGES:
        raise click.BadParameter("stages other than model need a shard set", param_hint="--data")

    log = lambda msg: click.echo(f"profile: {msg}", err=True)  # noqa: E731
    try:
        report = profile(cfg, log=log).as_dict()
    except (ShardSetError, ProfileError) as e:
        raise UserError(str(e)) from None
    if report["stages"]:
        click.echo(format_table(report))

    if scaling:
        inputs, source = _scaling_inputs(report, cfg, assume_img_per_s, link_gbps, hop_latency_us,
                                         sc.DEFAULT_OVERLAP if overlap is None else overlap)
        report["scaling"] = sc.scaling_report(inputs, sc.default_strategies(scaling_batch_factor),
                                              scaling_gpus or sc.DEFAULT_GPU_COUNTS, source=source)
        click.echo(sc.format_scaling(report["scaling"]))
        report["scaling"]["schemes"] = sc.scheme_table(inputs, cfg.arch, cfg.num_classes,
                                                       scaling_gpus or sc.SCHEME_GPU_COUNTS)
        click.echo(sc.format_scheme_table(report["scaling"]["schemes"]))

    if json_path is not None:
        json_path.write_text(json.dumps(_finite(report), indent=2) + "\n")
        click.echo(f"profile: wrote {json_path}")
    if plot_path is not None:
        write_plot(report, plot_path)
        click.echo(f"profile: wrote {plot_path}")


def _scaling_inputs(report: dict, cfg, assume_img_per_s: float | None, link_gbps: float, hop_latency_us: float,
                    overlap: float):
    """(the scaling model's inputs, where its step time came from): the measured model stage, or
    the what-if img/s the user gave."""
    from alexnet_fast.model.alexnet import build_model, count_parameters
    from alexnet_fast.model.runtime import resolve_precision
    from alexnet_fast.tools.scaling import ScalingInputs, activation_bytes

    if assume_img_per_s is not None:
        step_seconds, batch = cfg.batch_size / assume_img_per_s, cfg.batch_size
        params = count_parameters(build_model(cfg.arch, cfg.num_classes))
        source = f"an assumed {assume_img_per_s:g} img/s per GPU (--assume-img-per-s), not a measurement"
    else:
        model = report["stages"]["model"]
        step_seconds, batch, params = model["step_ms"] / 1e3, model["batch_size"], model["params"]
        source = f"the model stage measured on {report['device']}"
    decode = report["stages"].get("decode", {}).get("img_per_s")
    # the schemes' exchanged activations weigh what the run's autocast makes them; an assumed img/s
    # is a what-if about GPUs, so 'auto' resolves as on a GPU there (bf16)
    precision = resolve_precision(cfg.precision, "cuda") if assume_img_per_s is not None else cfg.resolved_precision
    inputs = ScalingInputs(step_seconds=step_seconds, batch=batch, params=params, link_gbps=link_gbps,
                           overlap=overlap, hop_latency_us=hop_latency_us, loader_img_per_s=decode,
                           activation_bytes=activation_bytes(precision))
    return inputs, source


def _finite(value):
    """JSON has no inf/nan: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
