"""Runs one recipe: `sh -e` in its own process group, output to a log, timeout, retries."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass(slots=True)
class RecipeResult:
    """How a recipe ended, after all its attempts."""

    exit_code: int
    duration: float
    log_path: str
    attempts: list[Attempt] = field(default_factory=list)
    interrupted: bool = False

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
        log_path = log_path_for(self.log_dir, job.name)
        stage = job.stage
        started = time.monotonic()
        attempts: list[Attempt] = []
        open(log_path, "wb").close()  # truncate; the recipe's output is appended by the spawner
        with open(log_path, "ab") as log:
            for number in range(1, stage.retries + 2):
                attempt = self._attempt(job, number, log)
                attempts.append(attempt)
                if attempt.exit_code == 0 or self.stopping.is_set():
                    break
                if stage.retry_on and attempt.exit_code not in stage.retry_on:
                    break
                if number <= stage.retries:
                    delay = stage.backoff * (2 ** (number - 1)) * random.uniform(0.9, 1.1)
                    log.write(f"offbuild: attempt {number} exited {attempt.exit_code}; retrying in {delay:.1f}s\n".encode())
                    log.flush()
                    if self.stopping.wait(delay):
                        break
        last = attempts[-1]
        return RecipeResult(last.exit_code, time.monotonic() - started, log_path, attempts, self.stopping.is_set())

    def _attempt(self, job: Job, number: int, log) -> Attempt:
        env = dict(self.environ)
        env.update(OFFBUILD_STAGE=job.name, OFFBUILD_RUN_ID=self.run_id, OFFBUILD_ATTEMPT=str(number))
        if job.stage.checkpoint:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            env["OFFBUILD_CHECKPOINT"] = os.path.abspath(self.checkpoint_path(job))
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
            _terminate_group(process)
        finally:
            with self._lock:
                self._running.pop(job.name, None)
        code = process.returncode
        exit_code = TIMEOUT_EXIT_CODE if timed_out else (128 - code if code < 0 else code)
        return Attempt(number, exit_code, time.monotonic() - started, timed_out)

    def interrupt(self) -> None:
        """Stop every running recipe's process group (SIGTERM, then SIGKILL after a grace)."""
        self.stopping.set()
        with self._lock:
            running = list(self._running.values())
        threads = [threading.Thread(target=_terminate_group, args=(process,)) for process in running]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def _terminate_group(process) -> None:
    """SIGTERM the whole group, SIGKILL it if still alive after the grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, None)):
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
