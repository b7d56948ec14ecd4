"""`alexnet-fast shards RAW OUT` (= tools/make_shards) and `alexnet-fast verify OUT`."""
from __future__ import annotations

from pathlib import Path

import click

from alexnet_fast.tools.common import UserError
from alexnet_fast.tools.sharding.driver import ShardOptions, default_workers, make_shards
from alexnet_fast.tools.sharding.errors import ShardingError


@click.command("shards")
@click.argument("raw", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--per-shard", type=click.IntRange(min=1), default=1000, show_default=True, help="samples per shard")
@click.option("--size", type=click.IntRange(min=8), default=256, show_default=True, help="stored shorter side (and crop size)")
@click.option("--keep-aspect", is_flag=True, help="keep the whole image at shorter side SIZE (no centre crop)")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the global train shuffle")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="processes [default: all cores]")
@click.option("--stats-images", type=click.IntRange(min=1), default=None,
              help="train images sampled for stats.json [default: all]")
@click.option("--overwrite", is_flag=True, help="replace a different shard set already in OUT")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="convert and write the shards as Ray tasks: on the cluster at ADDRESS (as ray.init takes it: "
                   "host:port, auto, ray://host:port) or, with no ADDRESS, a local Ray instance; RAW and OUT must "
                   "be paths every node sees. Same bytes as a local run. Needs pip install 'alexnet-fast[ray]'")
def shards_command(raw, out, per_shard, size, keep_aspect, quality, seed, workers, stats_images, overwrite, no_progress,
                   ray_address):
    """Convert raw ImageNet in RAW to WebDataset shards in OUT (resumable: rerun after a kill).

    RAW may hold train/<wnid>/ folders or ILSVRC2012_img_train.tar, and val/<wnid>/ folders, a flat
    val/ or ILSVRC2012_img_val.tar labelled by the devkit or LOC_val_solution.csv.
    """
    opts = ShardOptions(per_shard, size, keep_aspect, quality, seed, stats_images)
    log = lambda msg: click.echo(f"make_shards: {msg}", err=True)  # noqa: E731
    executor = None if ray_address is None else _ray_executor(ray_address or None, log)
    try:
        report = make_shards(raw, out, opts, workers=workers or default_workers(), overwrite=overwrite,
                             progress=not no_progress, log=log, executor=executor)
    except ShardingError as e:
        raise UserError(str(e)) from None
    except OSError as e:  # writing OUT failed (disk full, quota): finished shards stay valid for a rerun
        where = e.filename or str(out)
        raise click.ClickException(f"cannot write {where}: {e.strerror or e}; finished shards are kept, "
                                   "rerun the same command once there is space") from None
    click.echo(f"make_shards: {report.summary()}")


def _ray_executor(address: str | None, log):
    """The Ray executor; Ray itself is imported only here, when --ray asks for it."""
    try:
        from alexnet_fast.tools.sharding.ray_executor import RayExecutor
    except ImportError as e:
        raise UserError(f"--ray needs Ray, which cannot be imported here ({e.name or e}): "
                        "pip install 'alexnet-fast[ray]'") from None
    return RayExecutor(address, log)


@click.command("verify")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--workers", type=click.IntRange(min=1), default=None, help="processes [default: all cores]")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def verify_command(out, workers, no_progress):
    """Re-read every shard in OUT: counts, sha256, index, every JPEG decodes. Exit 1 on any mismatch."""
    from alexnet_fast.pipeline.shardset import ShardSetError
    from alexnet_fast.tools.sharding.verify import verify_shard_set

    try:
        report = verify_shard_set(out, workers=workers or default_workers(), progress=not no_progress)
    except ShardSetError as e:
        raise UserError(str(e)) from None
    for problem in report.problems:
        click.echo(f"verify: {problem}", err=True)
    click.echo(f"verify: {report.summary()}")
    return 0 if report.ok else 1
