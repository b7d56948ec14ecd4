"""The `alexnet-fast` command line.

Each subcommand lives in its own `cmd_*` module and is imported only when it runs, so
`alexnet-fast shards --help` does not pay for importing torch or DALI. What the commands share
(one-line errors, the device check) is in tools/common.py, not here: this entry point imports its
subcommands, never the other way round.

    alexnet-fast demo                         # built-in sample: shard, train, evaluate
    alexnet-fast shards RAW OUT               # raw ImageNet -> WebDataset shards (= tools/make_shards)
    alexnet-fast verify OUT                   # re-read and check every shard
    alexnet-fast stats OUT                    # (re)compute stats.json with Numba
    alexnet-fast train --data OUT --out RUN   # AlexNet, DDP over every visible GPU
    alexnet-fast eval --data OUT --checkpoint RUN/best.pt
    alexnet-fast profile --data OUT           # img/s per stage and what bounds the run
    alexnet-fast plot RUN [RUN ...]           # loss / accuracy / img/s curves of runs, compared
    alexnet-fast recipes [NAME]               # paper / bvlc / torchvision / fast: values, sources, cost

User mistakes (bad flags, missing paths, unreadable data) end with one line on stderr and a
non-zero exit (2 for usage errors), never a traceback.
"""
from __future__ import annotations

import difflib
import importlib
import sys

import click

# subcommand name -> "module:attribute" of its click.Command
COMMANDS: dict[str, str] = {
    "demo": "alexnet_fast.tools.cmd_demo:demo_command",
    "shards": "alexnet_fast.tools.cmd_shards:shards_command",
    "verify": "alexnet_fast.tools.cmd_shards:verify_command",
    "stats": "alexnet_fast.tools.cmd_stats:stats_command",
    "train": "alexnet_fast.tools.cmd_train:train_command",
    "eval": "alexnet_fast.tools.cmd_eval:eval_command",
    "profile": "alexnet_fast.tools.cmd_profile:profile_command",
    "plot": "alexnet_fast.tools.cmd_plot:plot_command",
    "recipes": "alexnet_fast.tools.cmd_recipes:recipes_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """An unknown command names the closest one (`evl` -> eval), which click's own message does not."""
        name = args[0] if args else ""
        if name in COMMANDS or name.startswith("-"):
            return super().resolve_command(ctx, args)
        close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else f" Commands: {', '.join(sorted(COMMANDS))}."
        raise click.UsageError(f"No such command {name!r}.{hint}", ctx)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="alexnet-fast")
def main() -> None:
    """alexnet-fast: train AlexNet on ImageNet as fast as the GPUs can compute."""


def run_command(command: click.Command, prog_name: str, args: list[str] | None = None) -> None:
    """Run a click command with one-line errors in one form for every kind (a flag, a path, the
    data): `prog: error: message`, exit 2 for usage errors, whose line ends by pointing at the
    subcommand's --help."""
    try:
        rv = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog_name}: aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:  # bare `alexnet-fast`: the help, not an error
        click.echo(e.ctx.get_help())
        sys.exit(0)
    except click.UsageError as e:  # bad flag, missing argument, wrong type, bad path
        where = e.ctx.command_path if e.ctx is not None else prog_name
        click.echo(f"{prog_name}: error: {e.format_message()} (see {where} --help)", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"{line_start(getattr(e, 'after_progress', False))}{prog_name}: error: {e.format_message()}",
                   err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{line_start(True)}{prog_name}: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
    sys.exit(rv if isinstance(rv, int) else 0)


def line_start(after_progress: bool) -> str:
    """What puts an error line at the start of a line of its own on stderr, never at the end of a
    progress bar a run left there: on a terminal, back to column 0 and erase the line (a no-op
    after a finished line); in a pipe or a log file, a newline after a run's bars (tqdm draws with
    carriage returns only)."""
    if sys.stderr.isatty():
        return "\r\033[K"
    return "\n" if after_progress else ""


def run() -> None:
    """Console-script entry point."""
    run_command(main, "alexnet-fast")


if __name__ == "__main__":
    run()
