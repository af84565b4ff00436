#!/usr/bin/env python3
"""Time offbuild against GNU make and ninja on generated pipelines (see README.md).

    python benchmarks/run.py [--shapes wide,chain] [--sizes 1000,10000] [--repeat 3]
                             [--scenarios full,noop,edit,dry] [--jobs 2] [--timeout 180]

For each shape and size, the same pipeline is generated three times (one tree per tool, so the
tools never see each other's outputs or state), then each scenario is run `--repeat` times, the
tools taking turns in a rotating order. Every build is one whole process, timed by wall clock
(perf_counter around the child) with the child's peak RSS from os.wait4. Exit codes are checked
and outputs spot-checked after every build; a failure is reported loudly, the tool is dropped for
the rest of that shape and size, and run.py exits 1 at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate  # noqa: E402

TOOLS = ("offbuild", "make", "ninja")
SCENARIOS = ("full", "noop", "edit", "dry")
STATE = {"offbuild": [".offbuild"], "make": [], "ninja": [".ninja_log", ".ninja_deps"]}


class ToolFailure(Exception):
    """A build failed, timed out, or left wrong outputs."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # FAILED | TIMEOUT | WRONG


@dataclass
class Measurement:
    wall: float
    maxrss_kb: int


@dataclass
class Tree:
    """One tool's copy of the pipeline and what run.py knows about its state."""

    tool: str
    path: str
    sources: dict[str, str]
    built: bool = False
    edits: int = 0
    last_write: float = 0.0  # time.monotonic() when a build last ended in this tree
    dead: str = ""  # why this tool is out for the rest of this shape/size


@dataclass
class Cell:
    """All repetitions of one (shape, size, scenario, tool)."""

    walls: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    error: str = ""

    def median(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- processes -----------------------------------------------------------------------------

def run_timed(cmd: list[str], cwd: str, timeout: float, log_base: str) -> tuple[Measurement, int, bool]:
    """Run `cmd` as one process (its own process group); returns (measurement, exit code, timed out).
    stdout/stderr go to `log_base`.out/.err so a huge dry-run listing costs the same for all tools."""
    with open(log_base + ".out", "wb") as out, open(log_base + ".err", "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits again
    return Measurement(wall, usage.ru_maxrss), proc.returncode, timed_out.is_set()


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def version(cmd: list[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    text = (result.stdout or result.stderr).strip().splitlines()
    return text[0] if text else "?"


# --- the harness ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.exe = {"offbuild": args.offbuild, "make": args.make, "ninja": args.ninja}
        self.results: dict[tuple, Cell] = {}
        self.warnings: list[str] = []
        self.failed = False
        self.rss_floor_kb: dict[tuple, int] = {}  # (shape, size) -> what a do-nothing child reports

    def rss_floor(self, where: str) -> int:
        """A child's ru_maxrss includes this (Python) process's RSS at the fork, because Linux keeps
        the pre-exec high-water mark; so a reading at or below this floor says only "<= floor"."""
        floor = 0
        for _ in range(3):
            m, _code, _ = run_timed(["true"], where, 30, os.path.join(where, "calibrate"))
            floor = max(floor, m.maxrss_kb)
        return floor

    def command(self, tool: str, scenario: str) -> list[str]:
        if scenario == "dry":
            return [self.exe[tool], "-n"]
        return [self.exe[tool], f"-j{self.args.jobs}"]

    # state of a tree

    def clean(self, tree: Tree) -> None:
        """Back to a never-built tree: no outputs, none of the tool's state."""
        shutil.rmtree(os.path.join(tree.path, "out"), ignore_errors=True)
        os.makedirs(os.path.join(tree.path, "out"))
        for name in STATE[tree.tool]:
            target = os.path.join(tree.path, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.unlink(target)
        tree.built = False

    def build(self, tree: Tree, scenario: str, timed: bool = True) -> Measurement:
        label = scenario if timed else f"{scenario}-setup"
        log_base = os.path.join(os.path.dirname(tree.path), f"{tree.tool}.{label}")
        cmd = self.command(tree.tool, scenario)
        measurement, code, timed_out = run_timed(cmd, tree.path, self.args.timeout, log_base)
        tree.last_write = time.monotonic()
        if timed_out:
            raise ToolFailure("TIMEOUT", f"`{' '.join(cmd)}` killed after {self.args.timeout:g}s "
                                         f"(per-run timeout; see --timeout)")
        if code != 0:
            raise ToolFailure("FAILED", f"`{' '.join(cmd)}` exited {code}\n--- stderr:\n{tail(log_base + '.err')}"
                                        f"\n--- stdout:\n{tail(log_base + '.out')}")
        return measurement

    def ensure_built(self, tree: Tree, pipeline) -> None:
        if not tree.built:
            self.build(tree, "full", timed=False)
            self.check_outputs(tree, pipeline)
            tree.built = True

    def check_outputs(self, tree: Tree, pipeline) -> None:
        """Spot-check: out/final.txt exactly as computed in Python, plus a few other outputs."""
        final = os.path.join(tree.path, generate.FINAL)
        try:
            with open(final, "rb") as handle:
                got = handle.read()
        except FileNotFoundError:
            raise ToolFailure("WRONG", f"{generate.FINAL} was not built") from None
        want = generate.expected_final(pipeline, tree.sources)
        if got != want:
            raise ToolFailure("WRONG", f"{generate.FINAL} has wrong content ({len(got)} bytes, expected {len(want)})")
        outs = [outs[0] for _, _, outs, _ in pipeline.stages]
        for path in {outs[0], outs[len(outs) // 2], outs[-2] if len(outs) > 1 else outs[0]}:
            want = generate.expected_output(pipeline, path, tree.sources)
            full = os.path.join(tree.path, path)
            if not os.path.exists(full):
                raise ToolFailure("WRONG", f"{path} was not built")
            if want is not None:
                with open(full, "rb") as handle:
                    if handle.read() != want:
                        raise ToolFailure("WRONG", f"{path} has wrong content")

    def edit(self, tree: Tree, pipeline) -> None:
        """A real content change to one source (an editor-style rewrite in place)."""
        tree.edits += 1
        path = pipeline.edit_source
        content = generate.source_line(path, tree.edits)
        with open(os.path.join(tree.path, path), "w") as handle:
            handle.write(content)
        tree.sources[path] = content

    def settle(self, tree: Tree) -> None:
        """Let --settle seconds pass since this tree's last build (untimed): a no-op or an edit
        then meets outputs that are not brand new, as in real use."""
        delay = self.args.settle - (time.monotonic() - tree.last_write)
        if delay > 0:
            time.sleep(delay)

    def mtime(self, tree: Tree, path: str) -> int | None:
        try:
            return os.stat(os.path.join(tree.path, path)).st_mtime_ns
        except FileNotFoundError:
            return None

    # one repetition of one scenario for one tool

    def one(self, tree: Tree, pipeline, scenario: str) -> Measurement:
        where = f"{pipeline.shape}/{pipeline.size}/{scenario}/{tree.tool}"
        if scenario == "full":
            self.clean(tree)
            m = self.build(tree, scenario)
            self.check_outputs(tree, pipeline)
            tree.built = True
        elif scenario == "noop":
            self.ensure_built(tree, pipeline)
            self.settle(tree)
            before = self.mtime(tree, generate.FINAL)
            m = self.build(tree, scenario)
            self.check_outputs(tree, pipeline)
            if self.mtime(tree, generate.FINAL) != before:
                self.warn(f"{where}: the no-op build rewrote {generate.FINAL}")
        elif scenario == "edit":
            self.ensure_built(tree, pipeline)
            self.settle(tree)
            keep = pipeline.untouched_output
            before = self.mtime(tree, keep) if keep else None
            self.edit(tree, pipeline)
            m = self.build(tree, scenario)
            self.check_outputs(tree, pipeline)
            if keep and self.mtime(tree, keep) != before:
                self.warn(f"{where}: {keep} was rebuilt although the edit of {pipeline.edit_source} does not affect it")
        elif scenario == "dry":
            if tree.built or os.path.exists(os.path.join(tree.path, generate.FINAL)):
                self.clean(tree)
            m = self.build(tree, scenario)
            if os.path.exists(os.path.join(tree.path, generate.FINAL)):
                raise ToolFailure("WRONG", f"the dry run built {generate.FINAL}")
        else:
            raise ValueError(scenario)
        return m

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            log(f"  warning: {message}")

    # a shape at a size

    def shape_size(self, shape: str, size: int) -> None:
        pipeline = generate.build(shape, size)
        base = tempfile.mkdtemp(prefix=f"bench-{shape}-{size}-", dir=self.args.workdir)
        try:
            started = time.perf_counter()
            trees = {}
            for tool in self.args.tools:
                path = os.path.join(base, tool)
                generate.write(pipeline, path, tools=(tool,))
                trees[tool] = Tree(tool, path, dict(pipeline.sources))
            floor = self.rss_floor_kb[(shape, size)] = self.rss_floor(base)
            log(f"== {shape} {size}: {pipeline.stage_count} stages, generated {len(trees)} trees in "
                f"{time.perf_counter() - started:.1f}s under {base} (RSS floor {floor / 1024:.0f} MB)")
            for scenario in self.args.scenarios:
                for rep in range(self.args.repeat):
                    shift = rep % len(self.args.tools)
                    order = self.args.tools[shift:] + self.args.tools[:shift]
                    line = []
                    for tool in order:
                        tree = trees[tool]
                        cell = self.results.setdefault((shape, size, pipeline.stage_count, scenario, tool), Cell())
                        if tree.dead:
                            cell.error = cell.error or "skipped"
                            continue
                        try:
                            m = self.one(tree, pipeline, scenario)
                        except ToolFailure as failure:
                            self.failed = True
                            tree.dead = failure.kind
                            cell.error = failure.kind
                            log(f"\n!!! {tool} {failure.kind} at {shape} {size} {scenario} (repetition {rep + 1}):\n"
                                f"{failure}\n!!! {tool} is skipped for the rest of {shape} {size}\n")
                            continue
                        cell.walls.append(m.wall)
                        cell.rss_kb.append(m.maxrss_kb)
                        line.append(f"{tool} {m.wall:.3f}s")
                    log(f"  {scenario:<5} rep {rep + 1}/{self.args.repeat}: " + ", ".join(line))
        finally:
            if self.args.keep:
                log(f"   kept {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)

    # report

    def table(self) -> str:
        head = ["shape", "size", "stages", "scenario", "make s", "ninja s", "offbuild s",
                "off/make", "off/ninja", "off RSS MB", "make RSS MB", "ninja RSS MB"]
        rows = [head]
        for (shape, size, stages, scenario, _), _cell in self.results.items():
            key = (shape, size, stages, scenario)
            if rows[-1][:4] == [shape, str(size), str(stages), scenario]:
                continue
            cells = {tool: self.results.get(key + (tool,)) for tool in TOOLS}

            def secs(tool):
                cell = cells[tool]
                if cell is None:
                    return "-"
                if cell.error:
                    return f"{cell.error}>{self.args.timeout:g}s" if cell.error == "TIMEOUT" else cell.error
                return f"{cell.median():.3f}"

            def ratio(other):
                a, b = cells["offbuild"], cells[other]
                if not a or not b or a.error or b.error or not a.walls or not b.walls or b.median() <= 0:
                    return "-"
                return f"{a.median() / b.median():.1f}x"

            def rss(tool):
                cell = cells[tool]
                if not cell or not cell.rss_kb or cell.error:
                    return "-"
                peak, floor = max(cell.rss_kb), self.rss_floor_kb.get((shape, size), 0)
                return f"<{floor / 1024:.0f}" if peak <= floor * 1.02 else f"{peak / 1024:.0f}"

            rows.append([shape, str(size), str(stages), scenario, secs("make"), secs("ninja"), secs("offbuild"),
                         ratio("make"), ratio("ninja"), rss("offbuild"), rss("make"), rss("ninja")])
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        left = 4
        lines = []
        for n, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def json_record(self) -> dict:
        return {"args": {k: v for k, v in vars(self.args).items()},
                "results": [{"shape": s, "size": n, "stages": st, "scenario": sc, "tool": t, "walls": c.walls,
                             "maxrss_kb": c.rss_kb, "error": c.error}
                            for (s, n, st, sc, t), c in self.results.items()],
                "rss_floor_kb": {f"{s}/{n}": kb for (s, n), kb in self.rss_floor_kb.items()},
                "warnings": self.warnings}


def header(args) -> str:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = version(["git", "-C", repo, "describe", "--always", "--dirty"])
    lines = [
        f"machine:  {platform.node()} {platform.system()} {platform.release()} {platform.machine()}; "
        f"cpu_count={os.cpu_count()}, usable CPUs={affinity}",
        f"python:   {platform.python_version()} ({sys.executable})",
        f"offbuild: {version([args.offbuild, '--version'])} ({args.offbuild}; repo at {commit})",
        f"make:     {version([args.make, '--version'])} ({args.make})",
        f"ninja:    {version([args.ninja, '--version'])} ({args.ninja})",
        f"settings: shapes={','.join(args.shapes)} sizes={','.join(map(str, args.sizes))} repeat={args.repeat} "
        f"scenarios={','.join(args.scenarios)} jobs={args.jobs} timeout={args.timeout:g}s settle={args.settle:g}s",
    ]
    return "\n".join(lines)


def csv(kind, choices=None):
    def parse(text: str):
        items = [kind(part.strip()) for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        if choices:
            bad = [item for item in items if item not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items
    return parse


def _offbuild_next_to_python() -> str | None:
    """The console script installed beside this Python: a version manager's shim on PATH (pyenv's
    is a bash script) would add its own ~100 ms to every offbuild run and none to make's or ninja's."""
    beside = os.path.join(os.path.dirname(sys.executable), "offbuild")
    return beside if os.access(beside, os.X_OK) else shutil.which("offbuild")


def compile_offbuild() -> str:
    """Byte-compile offbuild's modules, as `pip install` does: an editable install in an environment
    with PYTHONDONTWRITEBYTECODE set would otherwise compile them from source on every run (some
    20-30 ms), which no installed copy does. Says what it did, for the header."""
    found = subprocess.run([sys.executable, "-c", "import offbuild, os; print(os.path.dirname(offbuild.__file__))"],
                           capture_output=True, text=True)
    package = found.stdout.strip()
    if found.returncode != 0 or not package:
        return "not found by this Python: not compiled"
    done = subprocess.run([sys.executable, "-m", "compileall", "-q", package], capture_output=True, text=True)
    return f"compiled in {package}" if done.returncode == 0 else f"could not compile {package}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark offbuild against make and ninja.")
    parser.add_argument("--shapes", type=csv(str, generate.SHAPES), default=["wide", "chain"])
    parser.add_argument("--sizes", type=csv(int), default=[1000, 10000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenarios", type=csv(str, SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--tools", type=csv(str, TOOLS), default=list(TOOLS),
                        help="subset of offbuild,make,ninja (default all)")
    parser.add_argument("--jobs", "-j", type=int, default=2, help="parallel jobs for full/noop/edit builds")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="per-run cap in seconds; a tool that exceeds it is marked TIMEOUT (default 180)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds that must pass after a tree's last build before a timed noop or edit "
                             "(default 3; 0 = right away)")
    parser.add_argument("--workdir", default=None, help="where the temporary trees go (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated trees")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    parser.add_argument("--offbuild", default=_offbuild_next_to_python())
    parser.add_argument("--make", default=shutil.which("make"))
    parser.add_argument("--ninja", default=shutil.which("ninja"))
    args = parser.parse_args(argv)
    if args.repeat < 1 or min(args.sizes) < 1:
        parser.error("--repeat and --sizes must be positive")
    missing = [tool for tool in args.tools if not getattr(args, tool)]
    if missing:
        parser.error(f"not found on PATH: {', '.join(missing)} (pass --{missing[0]} PATH)")

    print(header(args), flush=True)
    if "offbuild" in args.tools:
        print(f"bytecode: {compile_offbuild()}", flush=True)
    bench = Bench(args)
    started = time.perf_counter()
    try:
        for shape in args.shapes:
            for size in args.sizes:
                bench.shape_size(shape, size)
    except KeyboardInterrupt:
        log("\ninterrupted: printing what was measured so far")
        bench.failed = True
    print()
    print("median wall seconds per whole-process build; RSS = the child's peak resident memory (max over\n"
          "repetitions, children included); '<N' = below what the harness itself can resolve (see README)")
    print(bench.table())
    for warning in bench.warnings:
        print(f"warning: {warning}")
    print(f"total benchmark time: {time.perf_counter() - started:.0f}s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(bench.json_record(), handle, indent=1)
    if bench.failed:
        print("SOME RUNS FAILED, TIMED OUT OR LEFT WRONG OUTPUTS (details above on stderr)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
