"""Run a Python command and SIGKILL it at a chosen file write, or list the files it writes.

    python killpoint.py OUT --trace LIST -- SCRIPT ARGS...         # append each finished file to LIST
    python killpoint.py OUT --kill NAME:WHEN[:N] -- SCRIPT ARGS... # kill -9 at that file (its N-th write)
    python killpoint.py OUT --kill-in MODULE:FUNCTION[:N] -- SCRIPT ARGS...  # kill -9 as FUNCTION's N-th call begins
    KILLPOINT_NOTE=FILE python killpoint.py ...                     # and write the killing thread's name there

Every file the project writes in OUT becomes final through `os.replace(temp, final)` (shards,
indices, resume sidecars, stats.json, manifest.json, checkpoints). This wrapper watches those
renames: NAME is the final file's path relative to OUT (`train-000003.tar`,
`.make_shards/train-000003.json`, `manifest.json`, `last.pt`); WHEN is `before` (its temp file is
complete, the rename has not happened), `during` (its temp file is being written: at the temp
file's fsync, before it is durable or renamed), `midway` (inside the write itself: half of the bytes
of the temp file's first write call are on disk, the rest never will be; for files written with
Python's `open`) or `after` (renamed; nothing after it has run); N (default
1) picks the N-th time that name is made final (last.pt is replaced on every save). The process
then sends itself a real SIGKILL: no `finally`, atexit or flush runs, exactly as after `kill -9`
from outside, but at a point of the job that a test can choose and reproduce, instead of a race
against a timer.
"""
from __future__ import annotations

import builtins
import os
import runpy
import signal
import sys
import threading
from pathlib import Path


def main(argv: list[str]) -> None:
    split = argv.index("--")
    out, mode, arg = Path(argv[0]).resolve(), argv[1], argv[2]
    script, script_args = argv[split + 1], argv[split + 2:]
    real_replace = os.replace

    def name_in_out(dst) -> str | None:
        path = Path(os.fspath(dst)).resolve()
        return path.relative_to(out).as_posix() if path.is_relative_to(out) else None

    if mode == "--trace":
        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            name = name_in_out(dst)
            if name is not None:
                with open(arg, "a") as trace:
                    trace.write(name + "\n")
    elif mode == "--kill":
        target, when, *nth = arg.split(":")
        assert when in ("before", "during", "midway", "after"), when
        seen = [0, int(nth[0]) if nth else 1]     # [times the name was written, the one to kill at]

        def kill() -> None:
            note = os.environ.get("KILLPOINT_NOTE")
            if note:                              # which thread did the write: the main one, or a writer's
                with open(note, "w") as f:
                    f.write(threading.current_thread().name)
            os.kill(os.getpid(), signal.SIGKILL)

        at_rename = when in ("before", "after")

        def replace(src, dst, *args, **kwargs):
            if name_in_out(dst) == target and at_rename:
                seen[0] += 1
            hit = name_in_out(dst) == target and seen[0] == seen[1] and at_rename
            if hit and when == "before":
                kill()
            real_replace(src, dst, *args, **kwargs)
            if hit:
                kill()

        real_fsync = os.fsync

        def fsync(fd):
            if when == "during":
                name = name_in_out(os.readlink(f"/proc/self/fd/{fd}")) if isinstance(fd, int) else None
                if name is not None and name.startswith(target + ".tmp"):
                    seen[0] += 1
                    if seen[0] == seen[1]:
                        kill()
            return real_fsync(fd)

        os.fsync = fsync

        def is_target_temp(file) -> bool:
            name = name_in_out(file) if isinstance(file, (str, os.PathLike)) else None
            return name is not None and name.startswith(target + ".tmp")

        class HalfWriter:
            """The temp file as `open` returned it, except that its first write stops half-way."""
            def __init__(self, file):
                self._file = file

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._file.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self._file, name)

            def write(self, data):
                self._file.write(data[: len(data) // 2])
                self._file.flush()                # half the bytes reach the file, as a kill mid-write leaves
                kill()

        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            opened = real_open(file, mode, *args, **kwargs)
            if when == "midway" and "w" in mode and is_target_temp(file):
                seen[0] += 1
                if seen[0] == seen[1]:
                    return HalfWriter(opened)
            return opened

        builtins.open = open_
    elif mode == "--kill-in":
        import importlib

        module_name, function_name, *nth = arg.split(":")
        module = importlib.import_module(module_name)
        real_function, calls = getattr(module, function_name), [0, int(nth[0]) if nth else 1]

        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == calls[1]:
                for thread in threading.enumerate():
                    if thread.name == "checkpoint writer":
                        thread.join()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_function(*args, **kwargs)

        setattr(module, function_name, wrapped)
    else:
        raise SystemExit(f"killpoint: unknown mode {mode!r}")

    if mode != "--kill-in":
        os.replace = replace
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
