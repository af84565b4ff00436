"""Live progress on a terminal, drawn with rich. The only module that imports rich, and only
`reporter.make_reporter` imports it, when the output is a terminal."""
from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .reporter import ORIGIN, summary_line


class LiveReporter:
    """On a terminal: a live panel (done/total, the jobs running now, elapsed time, ETA) under
    which each finished job's line and output are printed in one block.

    The panel is redrawn by rich's own thread; `_lock` guards what it reads."""

    def __init__(self, total: int, verbosity: int, stream: TextIO, *, parallel: int = 1,
                 estimates: dict[str, float | None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.verbosity = verbosity
        self.parallel = max(1, parallel)
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.running: dict[str, float] = {}  # job → when it started
        self.expected = dict(estimates or {})  # jobs still expected to run → last duration
        self._lock = threading.Lock()
        self.console = Console(file=stream, highlight=False, force_terminal=True)
        self.live = Live(console=self.console, get_renderable=self._panel, refresh_per_second=4,
                         transient=True, redirect_stdout=False, redirect_stderr=False)
        self.live.start()
        atexit.register(self._stop)  # an unexpected error must not leave the cursor hidden

    def _stop(self) -> None:
        if self.live.is_started:
            self.live.stop()
        atexit.unregister(self._stop)

    def _print(self, renderable) -> None:
        self.console.print(renderable, soft_wrap=True)

    def job_started(self, name: str, command: str) -> None:
        with self._lock:
            self.running[name] = self.clock()
            self.expected.setdefault(name, None)
        self.live.refresh()
        if self.verbosity > 0:
            self._print(Text.assemble(("$ ", "dim"), (name, "bold"), (": ", "dim"), (command, "dim")))

    def job_finished(self, name: str, action: str, duration: float, output: str, detail: str = "") -> None:
        with self._lock:
            self.done += 1
            self.running.pop(name, None)
            self.expected.pop(name, None)
        self.live.refresh()
        failed = action in ("failed", "interrupted")
        if action == "skipped" and self.verbosity <= 0:
            return
        mark, style = _MARKS.get(action, ("✗", "bold red"))
        line = Text.assemble((f"{mark} {action} ", style), (name, "bold"), (ORIGIN.get(action, ""), style))
        if action != "skipped":
            line.append(f" in {duration:.2f}s", style="dim")
        if detail:
            line.append(f" ({detail})", style="red" if failed else "dim")
        block = [line]
        if output and (failed or self.verbosity >= 0):
            block.append(Text.from_ansi(output.rstrip("\n")))
        self._print(Group(*block))  # one print: the line and its output stay together

    def message(self, text: str) -> None:
        self._print(Text(text))

    def summary(self, counts: dict, wall: float, status: str) -> None:
        self._stop()
        self.console.file.write(summary_line(counts, wall, status) + "\n")
        self.console.file.flush()

    def eta(self, now: float) -> float | None:
        """Seconds left by the recorded durations of the jobs still expected to run, spread over
        the parallel slots; None when no duration is known."""
        known = [seconds for seconds in self.expected.values() if seconds is not None]
        if not self.expected:
            return 0.0
        if not known:
            return None
        fallback = sum(known) / len(known)  # a never-timed job is taken as an average one
        work = 0.0
        for name, seconds in self.expected.items():
            seconds = fallback if seconds is None else seconds
            if name in self.running:
                seconds = max(0.0, seconds - (now - self.running[name]))
            work += seconds
        return work / min(self.parallel, len(self.expected))

    def _panel(self) -> Group:
        """The live part: a bar with counts, times and ETA, then the running jobs."""
        with self._lock:
            now = self.clock()
            # The executor may hold up to -j more, each waiting for a slot (see LocalExecutor); slots
            # free in the order recipes were handed over, so the oldest -j are the ones running.
            running = sorted(self.running.items(), key=lambda item: item[1])[:self.parallel]
            done, eta = self.done, self.eta(now)
            expected = dict(self.expected)
        head = Table.grid(padding=(0, 1))
        head.add_row(ProgressBar(total=max(self.total, 1), completed=done, width=30),
                     Text(f"{done}/{self.total} done", style="bold"),
                     Text(f"· {len(running)} running · {_clock(now - self.started)} elapsed · ETA "
                          + ("?" if eta is None else _clock(eta)), style="dim"))
        rows = [head]
        shown = running[:_MAX_RUNNING_SHOWN]
        for name, since in shown:
            guess = expected.get(name)
            typical = f" / ~{_clock(guess)}" if guess is not None else ""
            times = f"  {_clock(now - since)}{typical}"
            rows.append(Text.assemble(("  ▸ ", "yellow"), (name, "bold"), (times, "dim")))
        if len(running) > len(shown):
            rows.append(Text(f"  … and {len(running) - len(shown)} more", style="dim"))
        return Group(*rows)


_MAX_RUNNING_SHOWN = 8
_MARKS = {"ran": ("✓", "green"), "resumed": ("↻", "cyan"), "restored": ("⇣", "blue"), "skipped": ("·", "dim")}


def _clock(seconds: float) -> str:
    """`0:07`, `12:30`, `1:02:03`."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
