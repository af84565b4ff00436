"""Progress and output for people. It decides nothing; the builder tells it what happened."""
from __future__ import annotations

import sys
from typing import Protocol, TextIO


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
        self._write(f"[{self.done}/{self.total}] {action} {name} in {duration:.2f}s{suffix}\n"
                    if action != "skipped" else f"[{self.done}/{self.total}] skipped {name}{suffix}\n")
        if output and (failed or self.verbosity >= 0):
            self._write(output if output.endswith("\n") else output + "\n")

    def message(self, text: str) -> None:
        self._write(text + "\n")

    def summary(self, counts: dict, wall: float, status: str) -> None:
        parts = [f"{counts['ran']} ran", f"{counts['skipped']} skipped", f"{counts['failed']} failed"]
        for extra in ("resumed", "restored", "blocked"):
            if counts.get(extra):
                parts.append(f"{counts[extra]} {extra}")
        self._write(f"offbuild: {status}: {', '.join(parts)} in {wall:.2f}s\n")
