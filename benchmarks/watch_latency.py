"""How long after a file is saved does `offbuild --watch` start the recipe that the save affects?

Builds a small project in a temporary folder (one edited stage, plus `--stages N` unrelated ones
so the cost of re-opening a bigger project each pass shows), starts the real `offbuild --watch`,
then saves the edited source `--edits` times (default 20), each with new content. The recipe
writes `date +%s.%N` the moment it starts; the latency of one edit is that time minus the time
just before the save. Prints the median, p90, min and max, and the same for save → the pass's
summary line (the whole pass). `--editor` saves by writing a temporary file and renaming it over
the source, as many editors do.

    python benchmarks/watch_latency.py
    python benchmarks/watch_latency.py --edits 50 --stages 1000 --editor
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

EDITED = """
stage edited:
    in:  src/edited.txt
    out: out/edited.txt out/started.stamp
    run: date +%s.%N > $out1; cp $in $out0
"""

OTHER = """
stage other{n}:
    in:  src/other{n}.txt
    out: out/other{n}.txt
    run: cp $in $out
"""


def make_project(root: str, stages: int) -> None:
    os.makedirs(os.path.join(root, "src"))
    with open(os.path.join(root, "Pipefile"), "w") as handle:
        handle.write(EDITED + "".join(OTHER.format(n=n) for n in range(stages)))
    for n in range(stages):
        with open(os.path.join(root, "src", f"other{n}.txt"), "w") as handle:
            handle.write(f"other {n}\n")
    save(root, "first\n", editor=False)


def save(root: str, text: str, editor: bool) -> None:
    path = os.path.join(root, "src", "edited.txt")
    if editor:
        temporary = os.path.join(root, "src", ".edited.txt.tmp")
        with open(temporary, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    else:
        with open(path, "w") as handle:
            handle.write(text)


class Lines:
    """The watcher's output, read on a thread so waiting for a line can time out."""

    def __init__(self, stream):
        self.queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, prefix: str, timeout: float) -> float:
        """Wall-clock time at which a line starting with `prefix` arrived."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError("offbuild --watch exited")
            if line.startswith(prefix):
                return time.time()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def describe(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (f"{name:<28} median {statistics.median(ms):6.1f} ms   p90 {percentile(ms, 0.9):6.1f} ms   "
            f"min {min(ms):6.1f} ms   max {max(ms):6.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=20, help="saves to time (default 20)")
    parser.add_argument("--stages", type=int, default=0, help="unrelated stages in the Pipefile (default 0)")
    parser.add_argument("--editor", action="store_true", help="save by renaming a temporary file over the source")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between saves (default 0.3)")
    parser.add_argument("--offbuild", default=None, help="the offbuild command (default: this Python's -m offbuild)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    options = parser.parse_args()

    root = tempfile.mkdtemp(prefix="offbuild-watch-latency-")
    make_project(root, options.stages)
    command = options.offbuild.split() if options.offbuild else [sys.executable, "-m", "offbuild"]
    process = subprocess.Popen([*command, "--watch", "-j2"], cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    to_start, to_summary = [], []
    try:
        lines = Lines(process.stdout)
        lines.wait_for("offbuild: watching", timeout=120)
        stamp = os.path.join(root, "out", "started.stamp")
        for edit in range(options.edits):
            time.sleep(options.pause)
            saved = time.time()
            save(root, f"edit {edit}\n", options.editor)
            finished = lines.wait_for("offbuild: done", timeout=30)
            with open(stamp) as handle:
                started = float(handle.read())
            to_start.append(started - saved)
            to_summary.append(finished - saved)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    how = "rename over" if options.editor else "write in place"
    print(f"offbuild --watch: {options.edits} saves ({how}), {options.stages + 1} stages, on {os.cpu_count()} CPUs")
    print(describe("save → recipe started", to_start))
    print(describe("save → pass summary printed", to_summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
