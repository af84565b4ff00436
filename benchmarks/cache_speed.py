#!/usr/bin/env python3
"""How much a warm shared cache saves: each pipeline built in a fresh checkout by running its
recipes, against the same pipeline restored from a warm cache in another fresh checkout.

    python benchmarks/cache_speed.py [--repeat 3] [--size 1000] [--jobs 2] [--workdir DIR] [--keep]

Pipelines: `demo` (this repository's Pipefile, rules/ and data/input/ copied to a temp dir; its
checkpoint stage `upper` is never cached, so it runs in both) and `wide` (benchmarks/generate.py's
wide shape with --size stages: one `cp` per stage, then one stage over all of them).

For each pipeline the cache is warmed once (a build with --cache in a throwaway checkout); then
each repetition times, as whole processes, `offbuild -j N` in a fresh checkout without a cache
(`run`) and `offbuild -j N --cache WARM` in another fresh checkout (`restored`), checking exit
codes, the run record's counts and that both checkouts end with byte-identical outputs. It prints
the median wall seconds of each and their ratio.

Uses only the standard library and the `offbuild` console script installed beside this Python
(as benchmarks/run.py does), with this repository first on PYTHONPATH so its code is what runs.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import generate  # noqa: E402


def offbuild_command() -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "offbuild")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("offbuild")
    return [found] if found else [sys.executable, "-m", "offbuild"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env.pop("OFFBUILD_CACHE", None)
    return env


def demo_checkout(path: str) -> None:
    os.makedirs(path)
    shutil.copy(os.path.join(REPO, "Pipefile"), path)
    shutil.copytree(os.path.join(REPO, "rules"), os.path.join(path, "rules"))
    shutil.copytree(os.path.join(REPO, "data", "input"), os.path.join(path, "data", "input"))


def wide_checkout(size: int):
    pipeline = generate.build("wide", size)

    def make(path: str) -> None:
        generate.write(pipeline, path, tools=("offbuild",))

    return make


def timed_build(command: list[str], cwd: str, extra: list[str], timeout: float) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run(command + extra + ["--json"], cwd=cwd, env=child_env(), capture_output=True,
                            text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"offbuild failed in {cwd} (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return wall, json.loads(result.stdout)


def same_outputs(a: str, b: str) -> bool:
    """Every file outside .offbuild/ is byte-identical in both checkouts."""
    for root, dirs, files in os.walk(a):
        dirs[:] = [d for d in dirs if d != ".offbuild"]
        for name in files:
            left = os.path.join(root, name)
            right = os.path.join(b, os.path.relpath(left, a))
            if not os.path.exists(right) or not filecmp.cmp(left, right, shallow=False):
                print(f"  differs: {os.path.relpath(left, a)}", file=sys.stderr)
                return False
    return True


def measure(name: str, make_checkout, workdir: str, args) -> dict:
    command = offbuild_command() + ["-j", str(args.jobs)]
    cache = os.path.join(workdir, f"{name}-cache")
    warm = os.path.join(workdir, f"{name}-warm")
    make_checkout(warm)
    timed_build(command, warm, ["--cache", cache], args.timeout)
    runs, restores = [], []
    for index in range(args.repeat):
        ran_dir = os.path.join(workdir, f"{name}-run-{index}")
        restored_dir = os.path.join(workdir, f"{name}-restored-{index}")
        make_checkout(ran_dir)
        make_checkout(restored_dir)
        wall, record = timed_build(command, ran_dir, [], args.timeout)
        runs.append(wall)
        ran = record["counts"]["ran"]
        wall, record = timed_build(command, restored_dir, ["--cache", cache], args.timeout)
        restores.append(wall)
        counts = record["counts"]
        if counts["restored"] == 0 or not same_outputs(ran_dir, restored_dir):
            raise SystemExit(f"{name}: the restored checkout is wrong (counts {counts})")
        if not args.keep:
            shutil.rmtree(ran_dir)
            shutil.rmtree(restored_dir)
        print(f"  {name} #{index + 1}: run {runs[-1]:.3f}s ({ran} ran), restored {restores[-1]:.3f}s "
              f"({counts['restored']} restored, {counts['ran']} ran)", file=sys.stderr, flush=True)
    return {"pipeline": name, "jobs": record["counts"]["total"], "run": statistics.median(runs),
            "restored": statistics.median(restores), "restored_count": counts["restored"],
            "still_ran": counts["ran"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time builds that run recipes against restores from a warm cache.")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=1000, help="stages of the generated wide pipeline")
    parser.add_argument("--jobs", "-j", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the checkouts and caches")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="offbuild-cache-bench-", dir=args.workdir)
    print(f"offbuild: {' '.join(offbuild_command())} (code from {REPO}); -j {args.jobs}; "
          f"{args.repeat} repetitions; workdir {workdir}", flush=True)
    try:
        rows = [measure("demo", demo_checkout, workdir, args),
                measure(f"wide-{args.size}", wide_checkout(args.size), workdir, args)]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("median wall seconds per whole-process build in a fresh checkout")
    print(f"{'pipeline':<12} {'jobs':>5} {'run s':>8} {'restored s':>11} {'run/restored':>13}  restored/still ran")
    for row in rows:
        print(f"{row['pipeline']:<12} {row['jobs']:>5} {row['run']:>8.3f} {row['restored']:>11.3f} "
              f"{row['run'] / row['restored']:>12.1f}x  {row['restored_count']}/{row['still_ran']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
