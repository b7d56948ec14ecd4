"""Work the training loop hands off so that no GPU waits for it: one thread per kind of work.

    writer = Background("checkpoint writer")
    waited = writer.submit(lambda: save(snapshot))   # waits for the previous write first
    writer.wait()                                    # at the end: the last write is on disk (or its error raised)

`Background` runs one job at a time: a new job waits for the one before it (at most one in flight,
so two checkpoint writes never race and host memory holds at most one snapshot). An exception in
the job is kept and raised in the caller's thread by the next `submit` or `wait`, so a failure in
the background surfaces as the same error the caller would have raised itself, one step later.

`Redrawer` is for output nobody waits for (curves.png): a request while a drawing is under way is
folded into one more drawing after it, never queued up, and never blocks the caller.
"""
from __future__ import annotations

import threading
import time
from typing import Callable


class Background:
    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_seconds = 0.0          # how long the last finished job ran

    def submit(self, job: Callable[[], None]) -> float:
        """Start `job` once the previous one is done; returns the seconds spent waiting for it."""
        waited = self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name=self.name, daemon=True)
        self._thread.start()
        return waited

    def wait(self) -> float:
        """Block until the job in flight is done (re-raising its error); returns the seconds waited."""
        started = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        waited = time.perf_counter() - started
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return waited

    def _run(self, job: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            job()
        except BaseException as e:       # kept for the caller's thread: see wait()
            self._error = e
        finally:
            self.last_seconds = time.perf_counter() - started


class Redrawer:
    """Runs `draw` on a thread of its own whenever asked, coalescing requests."""

    def __init__(self, draw: Callable[[], None], name: str = "redrawer") -> None:
        self._draw, self._name = draw, name
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def request(self) -> None:
        with self._lock:
            self._wanted.set()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._wanted.is_set():
                    self._thread = None      # a request from now on starts a new thread
                    return
                self._wanted.clear()
            try:
                self._draw()
            except Exception as e:           # a figure is not worth stopping a run for: kept, reported
                self.errors.append(e)

    def flush(self) -> None:
        """Wait until every requested drawing is done (the end of a run)."""
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return
            thread.join()
