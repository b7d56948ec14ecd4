"""Run a Python module and send it SIGTERM right after the N-th time a file is made final.

    python sigterm_at.py OUT NAME N -- -m alexnet_fast.tools.cli train ...

The project writes every file through `os.replace(temp, final)`; this wrapper watches the renames
into OUT and, after the N-th one of NAME (e.g. `last.pt`: the N-th checkpoint), signals its own
process: a SIGTERM at a chosen step instead of a race against a timer (tests/reliability/killpoint.py
does the same with SIGKILL).
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    split = argv.index("--")
    out, name, times = Path(argv[0]).resolve(), argv[1], int(argv[2])
    rest = argv[split + 1:]
    real_replace, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if Path(os.fspath(dst)).resolve() == out / name:
            seen[0] += 1
            if seen[0] == times:
                os.kill(os.getpid(), signal.SIGTERM)

    os.replace = replace
    if rest[0] != "-m":
        raise SystemExit("usage: sigterm_at.py OUT NAME N -- -m MODULE ARGS...")
    sys.argv = [rest[1], *rest[2:]]
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
