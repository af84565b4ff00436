"""Progress and output for people. It decides nothing; the builder tells it what happened.

`PlainReporter` writes lines (pipes, CI, -q); `LiveReporter` draws live progress on a terminal.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Protocol, TextIO


ORIGIN = {"restored": " from cache"}  # said after the job's name: "restored copy from cache"


class Reporter(Protocol):
    def job_started(self, name: str, command: str) -> None: ...
    def job_finished(self, name: str, action: str, duration: float, output: str, detail: str = "") -> None: ...
    def message(self, text: str) -> None: ...
    def summary(self, counts: dict, wall: float, status: str) -> None: ...


class PlainReporter:
    """One line per finished job, its output in one block; for pipes, CI and terminals alike."""

    def __init__(self, total: int, verbosity: int = 0, stream: TextIO | None = None):
        self.total = total
        self.done = 0
        self.verbosity = verbosity
        self.stream = stream or sys.stdout

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def job_started(self, name: str, command: str) -> None:
        if self.verbosity > 0:
            self._write(f"[start] {name}: {command}\n")

    def job_finished(self, name: str, action: str, duration: float, output: str, detail: str = "") -> None:
        self.done += 1
        failed = action in ("failed", "interrupted")
        if action == "skipped" and self.verbosity <= 0:
            return
        if self.verbosity < 0 and not failed:
            return
        suffix = f" ({detail})" if detail else ""
        if action == "skipped":
            line = f"skipped {name}{suffix}"
        else:
            line = f"{action} {name}{ORIGIN.get(action, '')} in {duration:.2f}s{suffix}"
        self._write(f"[{self.done}/{self.total}] {line}\n")
        if output and (failed or self.verbosity >= 0):
            self._write(output if output.endswith("\n") else output + "\n")

    def message(self, text: str) -> None:
        self._write(text + "\n")

    def summary(self, counts: dict, wall: float, status: str) -> None:
        self._write(summary_line(counts, wall, status) + "\n")


def summary_line(counts: dict, wall: float, status: str) -> str:
    """`offbuild: done: 2 ran, 4 skipped, 0 failed in 0.31s` (plus resumed/restored/blocked when any)."""
    parts = [f"{counts['ran']} ran", f"{counts['skipped']} skipped", f"{counts['failed']} failed"]
    for extra in ("resumed", "restored", "blocked"):
        if counts.get(extra):
            parts.append(f"{counts[extra]} {extra}")
    return f"offbuild: {status}: {', '.join(parts)} in {wall:.2f}s"


def make_reporter(total: int, verbosity: int, stream: TextIO, *, parallel: int = 1,
                  estimates: Callable[[], dict[str, float | None]] | None = None) -> Reporter:
    """Live progress on a terminal (unless -q), one line per finished job anywhere else.

    `estimates` (called only for the live display, as it costs a dry run) gives the jobs the build
    is expected to run with their last recorded durations, for the ETA."""
    if verbosity >= 0 and is_terminal(stream):
        from .live import LiveReporter  # rich loads only here: a no-op build in CI never pays for it

        return LiveReporter(total, verbosity, stream, parallel=parallel, estimates=estimates() if estimates else {})
    return PlainReporter(total, verbosity, stream)


def is_terminal(stream: TextIO) -> bool:
    """A terminal that can redraw in place (not a pipe, a file or TERM=dumb)."""
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False
