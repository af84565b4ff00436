"""Runs one recipe: `sh -e` in its own process group, output to a log, timeout, retries."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .model import Job

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


def log_path_for(log_dir: str, job_name: str) -> str:
    """One log per job, its name made safe for a file name (`shout[a/b]` → `shout[a%2Fb]`)."""
    return os.path.join(log_dir, quote(job_name, safe="[]-_.") + ".log")


class LocalExecutor:
    """Starts recipes as local processes; `interrupt()` stops every running one."""

    def __init__(self, root: str, state_dir: str, run_id: str, environ: dict[str, str] | None = None):
        self.root = root
        self.log_dir = os.path.join(state_dir, "logs")
        self.checkpoint_dir = os.path.join(state_dir, "checkpoints")
        self.run_id = run_id
        self.environ = dict(os.environ if environ is None else environ)
        self.stopping = threading.Event()
        self._running: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        os.makedirs(self.log_dir, exist_ok=True)

    def checkpoint_path(self, job: Job) -> str:
        return os.path.join(self.checkpoint_dir, quote(job.name, safe="[]-_.") + ".ckpt")

    def run(self, job: Job) -> RecipeResult:
        """Run the recipe, retrying as the stage allows; output goes to the job's log."""
        log_path = log_path_for(self.log_dir, job.name)
        stage = job.stage
        started = time.monotonic()
        attempts: list[Attempt] = []
        with open(log_path, "wb") as log:
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
        with self._lock:
            if self.stopping.is_set():
                return Attempt(number, 130, 0.0)
            process = subprocess.Popen(["sh", "-e", "-c", job.recipe], cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


def _terminate_group(process: subprocess.Popen) -> None:
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
