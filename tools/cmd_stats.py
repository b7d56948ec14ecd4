"""`alexnet-fast stats OUT`: recompute a shard set's stats.json (Numba) and print the numbers."""
from __future__ import annotations

from pathlib import Path

import click

from alexnet_fast.tools.common import UserError


@click.command("stats")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--stats-images", type=click.IntRange(min=1), default=None,
              help="train images sampled [default: what make_shards used, else all]")
@click.option("--seed", type=int, default=None, help="seed of the sample [default: what make_shards used, else 0]")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="processes [default: all cores]")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def stats_command(out: Path, stats_images: int | None, seed: int | None, workers: int | None, no_progress: bool):
    """Recompute OUT/stats.json: per-channel mean/std and the RGB covariance's eigen-decomposition
    of the train pixels on [0,1]. With no options it reproduces what make_shards wrote."""
    from alexnet_fast.pipeline.shardset import ShardSet, ShardSetError
    from alexnet_fast.pipeline.stats import StatsError, compute_stats, write_stats

    try:
        shard_set = ShardSet.open(out)
        if not shard_set.has_split("train"):
            raise UserError(f"shard set {str(out)!r} has no train images to compute statistics from")
        tars = [s.tar for s in shard_set.shards("train")]
        missing = [t.name for t in tars if not t.is_file()]
        if missing:
            raise UserError(f"shard set {str(out)!r} is missing {len(missing)} train shard(s), e.g. {missing[0]}")
        made_with = shard_set.manifest.get("created_by", {}).get("args", {})
        if stats_images is None:
            stats_images = made_with.get("stats_images")
        if seed is None:
            seed = int(made_with.get("seed", 0))
        stats = compute_stats(tars, max_images=stats_images, seed=seed, workers=workers, progress=not no_progress)
        write_stats(shard_set.root, stats)
    except (ShardSetError, StatsError) as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot write stats.json in {str(out)!r}: {e.strerror or e}") from None
    click.echo(format_stats(stats))
    click.echo(f"stats: wrote {shard_set.root / 'stats.json'}")


def format_stats(stats: dict) -> str:
    """The numbers as a few aligned lines (pixels on [0,1])."""
    def row(values) -> str:
        return "  ".join(f"{v:+.6f}" for v in values)

    sample = stats["sample"]
    how = "all images" if sample["max_images"] is None else f"sample of {sample['max_images']}, seed {sample['seed']}"
    lines = [
        f"stats: {stats['images']} images, {stats['pixels']} pixels ({how}), pixels scaled to [0,1]",
        f"  mean        {row(stats['mean'])}",
        f"  std         {row(stats['std'])}",
        f"  eigval      {row(stats['eigval'])}",
    ]
    for label, matrix in (("eigvec", stats["eigvec"]), ("covariance", stats["covariance"])):
        for i, r in enumerate(matrix):
            lines.append(f"  {label if i == 0 else '':<11} {row(r)}")
    lines.append("  (eigvec columns are the eigenvectors: eigvec[:, i] belongs to eigval[i])")
    return "\n".join(lines)
