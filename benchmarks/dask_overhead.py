#!/usr/bin/env python3
"""What does running recipes on a Dask cluster cost per job, compared with local processes?

Starts its own `dask scheduler` and two `dask worker`s (one thread each) on 127.0.0.1, writes a
pipeline of `--jobs` trivial stages (`run: true`) in a temporary folder, then times whole
`offbuild -B -jN` builds (wall clock around the child process), taking turns between
`--executor local` and `--executor dask`, `--repeat` times each. Also times a one-stage build, the
fixed cost of connecting to the cluster. Prints medians, per-job wall time and the difference,
and the median recipe duration offbuild recorded per job (submit → answer, for Dask). Tears the
cluster down (kills the process groups) whatever happens.

    python benchmarks/dask_overhead.py                      # 200 jobs, -j2, 3 repeats
    python benchmarks/dask_overhead.py --jobs 500 --parallel 4 --repeat 5

Uses the `offbuild` console script beside `sys.executable` (or `--offbuild PATH`) and the `dask`
one beside it, with this checkout first on PYTHONPATH (for offbuild and the workers alike);
needs `pip install -e '.[dask]'`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A scheduler and two single-threaded workers, each in its own process group."""

    def __init__(self, folder: str):
        self.folder = folder
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        self.processes: list[subprocess.Popen] = []

    def _start(self, name: str, argv: list[str]) -> None:
        with open(os.path.join(self.folder, f"{name}.log"), "ab") as output:
            self.processes.append(subprocess.Popen(argv, cwd=self.folder, env=self.env, stdout=output,
                                                   stderr=output, stdin=subprocess.DEVNULL, start_new_session=True))

    def start(self) -> None:
        dask = os.path.join(BIN, "dask")
        self._start("scheduler", [dask, "scheduler", "--host", "127.0.0.1", "--port",
                                  self.address.rsplit(":", 1)[1], "--no-dashboard"])
        for name in ("w1", "w2"):
            self._start(name, [dask, "worker", self.address, "--name", name, "--nworkers", "1", "--nthreads", "1",
                               "--no-nanny", "--no-dashboard", "--local-directory", os.path.join(self.folder, name)])
        import distributed

        with distributed.Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)

    def stop(self) -> None:
        """Workers first (a worker whose scheduler is gone lingers, retrying), then the scheduler."""
        for group in (self.processes[1:], self.processes[:1]):
            for process in group:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for process in group:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def write_project(folder: str, jobs: int) -> None:
    os.makedirs(folder)
    with open(os.path.join(folder, "Pipefile"), "w") as handle:
        handle.write("".join(f"stage s{n}:\n    run: true\n" for n in range(jobs)))


def build(offbuild: str, folder: str, extra: list[str], parallel: int, env: dict) -> tuple[float, list[float]]:
    """One forced build: (wall seconds, each job's recorded duration)."""
    started = time.perf_counter()
    result = subprocess.run([offbuild, "-B", "-q", "-j", str(parallel), "--json", *extra], cwd=folder,
                            capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"offbuild {' '.join(extra)} failed ({result.returncode}):\n{result.stderr}")
    record = json.loads(result.stdout)
    return wall, [job["duration"] for job in record["jobs"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="trivial stages in the pipeline (default 200)")
    parser.add_argument("--parallel", "-j", type=int, default=2, help="offbuild -j (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="builds per executor (default 3)")
    parser.add_argument("--offbuild", default=os.path.join(BIN, "offbuild"), help="the offbuild command")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="offbuild-dask-bench-") as workdir:
        cluster = Cluster(workdir)
        try:
            log(f"starting a scheduler and 2 workers at {cluster.address}")
            cluster.start()
            many, one = os.path.join(workdir, "many"), os.path.join(workdir, "one")
            write_project(many, args.jobs)
            write_project(one, 1)
            executors = {"local": ["--executor", "local"], "dask": ["--executor", "dask", "--scheduler", cluster.address]}
            walls = {name: [] for name in executors}
            singles = {name: [] for name in executors}
            durations = {name: [] for name in executors}
            for name, extra in executors.items():  # a warm-up each: spawners, worker imports
                build(args.offbuild, many, extra, args.parallel, cluster.env)
            for repeat in range(args.repeat):
                order = list(executors) if repeat % 2 == 0 else list(reversed(executors))
                for name in order:
                    wall, per_job = build(args.offbuild, many, executors[name], args.parallel, cluster.env)
                    walls[name].append(wall)
                    durations[name].extend(per_job)
                    singles[name].append(build(args.offbuild, one, executors[name], args.parallel, cluster.env)[0])
                    log(f"  {name:5} run {repeat + 1}: {wall:.2f}s for {args.jobs} jobs")
        finally:
            cluster.stop()
    print(f"{args.jobs} trivial jobs (`true`), -j{args.parallel}, median of {args.repeat} forced builds;"
          " 2 Dask workers x 1 thread on this machine")
    print(f"{'executor':9} {'build s':>8} {'per job ms':>11} {'recipe ms':>10} {'1-job build s':>14}")
    median = {name: statistics.median(values) for name, values in walls.items()}
    for name in executors:
        print(f"{name:9} {median[name]:8.2f} {1000 * median[name] / args.jobs:11.2f}"
              f" {1000 * statistics.median(durations[name]):10.2f} {statistics.median(singles[name]):14.2f}")
    extra_ms = 1000 * (median["dask"] - median["local"]) / args.jobs
    print(f"Dask overhead: {extra_ms:+.2f} ms per job of wall time at -j{args.parallel}"
          f" ({median['dask'] / median['local']:.1f}x the local build);"
          f" connecting adds {statistics.median(singles['dask']) - statistics.median(singles['local']):+.2f}s per build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
