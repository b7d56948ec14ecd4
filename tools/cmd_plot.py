"""`alexnet-fast plot RUN [RUN ...]`: the loss, validation-accuracy and throughput curves of one or
more training runs (their metrics.jsonl) in one PNG, to compare runs (e.g. `--loader dali` against
`--loader baseline`, or the paper recipe against the fast one). Each run also keeps its own
RUN/curves.png, redrawn by the trainer at every epoch end."""
from __future__ import annotations

from pathlib import Path

import click

from alexnet_fast.tools.common import UserError


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=Path("curves.png"),
              show_default=True, help="the PNG to write")
def plot_command(runs: tuple[Path, ...], out: Path) -> None:
    """Plot train loss and img/s per step and val top-1/top-5 per epoch of each RUN directory."""
    from alexnet_fast.model.runlog import read_metrics, write_curves

    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise UserError(f"{str(run)!r} has no metrics.jsonl: not a run directory of `alexnet-fast train`")
        steps, epochs = read_metrics(run)
        if not steps and not epochs:
            raise UserError(f"{run / 'metrics.jsonl'} holds no records yet")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {str(out)!r}: folder {str(out.parent)!r} does not exist")
    write_curves(list(runs), out)
    click.echo(f"wrote {out} ({len(runs)} run(s))")
