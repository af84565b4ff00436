"""Runs one recipe: `sh -e` in its own process group, output to a log, timeout, retries.

`Executor` is the seam the Builder uses; `LocalExecutor` runs recipes on this machine and
`dask_executor.DaskExecutor` on a Dask cluster. Both share `run_with_retries`, each providing
its own single attempt.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import quote

from .errors import OffbuildError
from .model import Job
from .sandbox import Spawner, SpawnerGone

KILL_GRACE_SECONDS = 5.0
TIMEOUT_EXIT_CODE = 124


@dataclass(frozen=True, slots=True)
class Attempt:
    number: int
    exit_code: int
    duration: float
    timed_out: bool = False
    worker: str | None = None  # where it ran, when not on this machine
    error: str = ""  # why it could not run or finish, when the exit code alone would not say


@dataclass(slots=True)
class RecipeResult:
    """How a recipe ended, after all its attempts."""

    exit_code: int
    duration: float
    log_path: str
    attempts: list[Attempt] = field(default_factory=list)
    interrupted: bool = False
    worker: str | None = None  # the Dask worker that ran the last attempt
    error: str = ""  # the last attempt's error, if it could not run or finish

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.interrupted

    def output(self) -> str:
        try:
            return Path(self.log_path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


def checkpoint_path_for(state_dir: str, job_name: str) -> str:
    """Where a checkpoint stage's job keeps its checkpoint (`<path>.key` holds the stage key)."""
    return os.path.join(state_dir, "checkpoints", quote(job_name, safe="[]-_.") + ".ckpt")


def log_path_for(log_dir: str, job_name: str) -> str:
    """One log per job, its name made safe for a file name (`shout[a/b]` → `shout[a%2Fb]`)."""
    return os.path.join(log_dir, quote(job_name, safe="[]-_.") + ".log")


OFFLINE_MODES = ("auto", "strict", "off")
NETWORK_HINT = "recipes run offline: add `network: true` to this stage if it needs the network"
# What failed network access looks like in a log; only then is NETWORK_HINT worth showing.
NETWORK_SYMPTOMS = re.compile(
    r"network is unreachable|connection refused|temporary failure in name resolution|name or service not known"
    r"|could not resolve|getaddrinfo|no address associated|name resolution|failed to establish a new connection"
    r"|no route to host|nodename nor servname", re.I)


class Executor(Protocol):
    """What the Builder (and `commands.build`) needs from whatever runs recipes."""

    state_dir: str
    run_id: str
    warn: Callable[[str], None]
    stopping: threading.Event

    def run(self, job: Job) -> RecipeResult:
        """Run the job's recipe with its retries; blocks until it ends."""

    def interrupt(self) -> None:
        """Stop every running recipe; `run` calls return soon after, marked interrupted."""

    def checkpoint_path(self, job: Job) -> str:
        """Where a checkpoint stage's job keeps its checkpoint."""

    def is_isolated(self, job: Job) -> bool:
        """Whether this job's recipe ran without network access."""

    def require_isolation(self) -> None:
        """For --offline=strict: raise OffbuildError unless recipes can be isolated."""

    def offline_status(self) -> dict:
        """The run record's `offline` section."""

    def close(self) -> None:
        """Release processes and connections."""


def run_with_retries(job: Job, log_path: str, attempt: Callable[[int, BinaryIO], Attempt],
                     stopping: threading.Event) -> RecipeResult:
    """Truncate the job's log, then `attempt(number, log)` until one succeeds, the stage's
    retries (exponential backoff with jitter; only `retry-on` codes) run out, or `stopping` is set."""
    stage = job.stage
    started = time.monotonic()
    attempts: list[Attempt] = []
    with open(log_path, "ab") as log:  # appending: the recipe's output is appended by the spawner too
        log.truncate(0)
        for number in range(1, stage.retries + 2):
            result = attempt(number, log)
            attempts.append(result)
            if result.exit_code == 0 or stopping.is_set():
                break
            if stage.retry_on and result.exit_code not in stage.retry_on:
                break
            if number <= stage.retries:
                delay = stage.backoff * (2 ** (number - 1)) * random.uniform(0.9, 1.1)
                log.write(f"offbuild: attempt {number} exited {result.exit_code}; retrying in {delay:.1f}s\n".encode())
                log.flush()
                if stopping.wait(delay):
                    break
    last = attempts[-1]
    return RecipeResult(last.exit_code, time.monotonic() - started, log_path, attempts, stopping.is_set(),
                        worker=last.worker, error=last.error)


def recipe_env(environ: dict[str, str], job: Job, run_id: str, number: int, checkpoint: str | None) -> dict[str, str]:
    """The environment of one attempt: offbuild's own plus the OFFBUILD_* variables."""
    env = dict(environ)
    env.update(OFFBUILD_STAGE=job.name, OFFBUILD_RUN_ID=run_id, OFFBUILD_ATTEMPT=str(number))
    if checkpoint is not None:
        env["OFFBUILD_CHECKPOINT"] = os.path.abspath(checkpoint)
    return env


def exit_code_of(returncode: int, timed_out: bool) -> int:
    """A timeout counts as 124 and death by signal N as 128+N, for `retry-on` and the record."""
    return TIMEOUT_EXIT_CODE if timed_out else (128 - returncode if returncode < 0 else returncode)


class LocalExecutor:
    """Starts recipes through spawners (see spawner.py); `interrupt()` stops every running one.

    Stages without `network: true` go through a spawner in an empty network namespace, unless
    `offline` is "off"; with "auto" a system that cannot isolate gets a warning, "strict" refuses.
    """

    def __init__(self, root: str, state_dir: str, run_id: str, environ: dict[str, str] | None = None,
                 offline: str = "auto", warn=lambda text: None, spawner_factory=Spawner):
        self.root = root
        self.spawner_factory = spawner_factory  # tests pass a fake that cannot isolate
        self.state_dir = state_dir
        self.log_dir = os.path.join(state_dir, "logs")
        self.checkpoint_dir = os.path.join(state_dir, "checkpoints")
        self.run_id = run_id
        self.environ = dict(os.environ if environ is None else environ)
        self.offline = offline
        self.warn = warn
        self.stopping = threading.Event()
        self.isolation_failure: str | None = None  # why recipes could not be isolated, if they could not
        self._warned = False
        self._spawners: dict[bool, Spawner] = {}
        self._running: dict[str, object] = {}
        self._lock = threading.Lock()
        os.makedirs(self.log_dir, exist_ok=True)

    def require_isolation(self) -> None:
        """For --offline=strict: start the isolated spawner now, so a refusal comes before anything runs."""
        self.spawner(isolate=True)

    def spawner(self, isolate: bool) -> Spawner:
        """The spawner for isolated or networked recipes, started on first use."""
        isolate = isolate and self.offline != "off"
        spawner = self._started_spawner(isolate)
        with self._lock:
            warn = isolate and self.isolation_failure is not None and not self._warned
            self._warned = self._warned or warn
        if warn:  # here, not when it starts: `warm_up` may start it before `warn` is set
            self.warn(f"offbuild: warning: recipes are NOT network-isolated here ({self.isolation_failure});"
                      " --offline=strict refuses to run in that case")
        return spawner

    def _started_spawner(self, isolate: bool) -> Spawner:
        with self._lock:
            if isolate not in self._spawners:
                spawner = self.spawner_factory(isolate)
                if isolate and not spawner.isolated:
                    self.isolation_failure = spawner.reason
                    if self.offline == "strict":
                        spawner.close()
                        raise OffbuildError(f"--offline=strict: cannot isolate recipes from the network"
                                            f" ({spawner.reason})")
                self._spawners[isolate] = spawner
            return self._spawners[isolate]

    def warm_up(self) -> None:
        """Start the isolated spawner in the background, so its start overlaps the deciding."""
        if self.offline != "off":
            threading.Thread(target=self._warm_up, name="spawner-start", daemon=True).start()

    def _warm_up(self) -> None:
        try:
            self._started_spawner(isolate=True)
        except Exception:  # noqa: BLE001 - the recipe's own call starts it again and reports why
            pass

    def offline_status(self) -> dict:
        """For the run record: the mode asked for and whether isolation was in force."""
        status: dict = {"mode": self.offline}
        if self.offline != "off":  # None: no recipe needed isolating in this run
            status["isolated"] = (self.isolation_failure is None) if True in self._spawners else None
            if self.isolation_failure:
                status["reason"] = self.isolation_failure
        return status

    def is_isolated(self, job: Job) -> bool:
        return not job.stage.network and self.offline != "off" and self.isolation_failure is None

    def close(self) -> None:
        with self._lock:  # a spawner `warm_up` is starting is registered once it has started
            spawners = list(self._spawners.values())
        for spawner in spawners:
            spawner.close()

    def checkpoint_path(self, job: Job) -> str:
        return checkpoint_path_for(self.state_dir, job.name)

    def run(self, job: Job) -> RecipeResult:
        """Run the recipe, retrying as the stage allows; output goes to the job's log."""
        return run_with_retries(job, log_path_for(self.log_dir, job.name),
                                lambda number, log: self._attempt(job, number, log), self.stopping)

    def _attempt(self, job: Job, number: int, log) -> Attempt:
        if job.stage.checkpoint:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
        env = recipe_env(self.environ, job, self.run_id, number,
                         self.checkpoint_path(job) if job.stage.checkpoint else None)
        started = time.monotonic()
        spawner = self.spawner(isolate=not job.stage.network)
        log.flush()
        with self._lock:
            if self.stopping.is_set():
                return Attempt(number, 130, 0.0)
            try:
                process = spawner.spawn(["sh", "-e", "-c", job.recipe], self.root, env, os.path.abspath(log.name))
            except SpawnerGone as error:
                log.write(f"offbuild: cannot start the recipe: {error}\n".encode())
                return Attempt(number, 127, 0.0)
            self._running[job.name] = process
        timed_out = False
        try:
            process.wait(timeout=job.stage.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            log.write(f"\noffbuild: timed out after {job.stage.timeout:g}s; stopping the recipe\n".encode())
            log.flush()
            terminate_group(process)
        finally:
            with self._lock:
                self._running.pop(job.name, None)
        return Attempt(number, exit_code_of(process.returncode, timed_out), time.monotonic() - started, timed_out)

    def interrupt(self) -> None:
        """Stop every running recipe's process group (SIGTERM, then SIGKILL after a grace)."""
        self.stopping.set()
        with self._lock:
            running = list(self._running.values())
        threads = [threading.Thread(target=terminate_group, args=(process,)) for process in running]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def terminate_group(process, grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the whole group, SIGKILL it if still alive after the grace period."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            # The leader is gone; make sure nothing it left behind in the group survives.
            os.killpg(process.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
