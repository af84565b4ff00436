"""Runs one recipe: `sh -e` in its own process group, output to a log, timeout, retries.

`Executor` is the seam the Builder uses; `LocalExecutor` runs recipes on this machine and
`dask_executor.DaskExecutor` on a Dask cluster. Both share `run_with_retries`, each providing
its own single attempt.
"""
from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from .errors import OffbuildError
from .model import Job
from .sandbox import JobSlots, Spawner, SpawnerGone

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
    logged: bool = True  # False: nothing was written to the log, so there is none to read
    started: bool = True  # False: withdrawn before its first attempt started (it never ran)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.interrupted

    def has_log(self) -> bool:
        """Whether the log exists: a recipe that printed nothing leaves none."""
        return self.logged and os.path.exists(self.log_path)

    def output(self) -> str:
        if not self.logged:
            return ""
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

    ahead: int  # how many recipes beyond -j it may be handed: they wait for a slot, and start as one frees

    def submit(self, job: Job) -> Future[RecipeResult]:
        """Start the job's recipe (with its retries); the future holds how it ended."""

    def withdraw(self) -> None:
        """Drop the handed-over recipes that have not started (their results say `started=False`)."""

    def resume(self) -> None:
        """Go on after a failure (-k): a failed recipe holds back the handed-over ones until then."""

    def interrupt(self) -> None:
        """Stop every running recipe; their futures complete soon after, marked interrupted."""

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


def retry_delay(stage, attempt: Attempt, stopping: threading.Event) -> float | None:
    """How long to wait before the next attempt (exponential backoff, ±10% jitter), or None when
    this one is the last: it succeeded, the stage's retries are used up, its exit code is not one
    of `retry-on`, or offbuild is stopping."""
    if attempt.exit_code == 0 or stopping.is_set() or attempt.number > stage.retries:
        return None
    if stage.retry_on and attempt.exit_code not in stage.retry_on:
        return None
    return stage.backoff * (2 ** (attempt.number - 1)) * random.uniform(0.9, 1.1)


def retry_note(attempt: Attempt, delay: float) -> str:
    return f"offbuild: attempt {attempt.number} exited {attempt.exit_code}; retrying in {delay:.1f}s\n"


def timeout_note(seconds: float) -> str:
    return f"\noffbuild: timed out after {seconds:g}s; stopping the recipe\n"


def append_to_log(log_path: str, text: str) -> None:
    """offbuild's own lines in a job's log (the recipe's output is appended by the spawner); a
    log that cannot be written (its folder deleted meanwhile) must not stop the build."""
    try:
        with open(log_path, "ab") as log:
            log.write(text.encode())
    except OSError:
        pass


def discard_log(log_path: str) -> None:
    """Before a job's first attempt: its log will hold this run's output only (and exists only if
    there is some)."""
    try:
        os.unlink(log_path)
    except FileNotFoundError:
        pass


def run_with_retries(job: Job, log_path: str, attempt: Callable[[int], Attempt],
                     stopping: threading.Event) -> RecipeResult:
    """Discard the job's log, then `attempt(number)` until `retry_delay` says it was the last;
    blocks, so it suits executors whose attempts block (Dask)."""
    started = time.monotonic()
    attempts: list[Attempt] = []
    discard_log(log_path)
    for number in range(1, job.stage.retries + 2):
        result = attempt(number)
        attempts.append(result)
        delay = retry_delay(job.stage, result, stopping)
        if delay is None:
            break
        append_to_log(log_path, retry_note(result, delay))
        if stopping.wait(delay):
            break
    last = attempts[-1]
    return RecipeResult(last.exit_code, time.monotonic() - started, log_path, attempts, stopping.is_set(),
                        worker=last.worker, error=last.error)


# A recipe made only of these characters, on one line, has no quoting, expansion, redirection,
# globbing, comment or control operator: the shell would only split it at spaces and run it.
_PLAIN_RECIPE = re.compile(r"[A-Za-z0-9_./:,+@%=-]+(?: +[A-Za-z0-9_./:,+@%=-]+)*")
# Words the shell itself carries out (or that mean something else to it than to a program of the
# same name, like `echo` and `test`): a recipe starting with one of them goes to the shell.
_SHELL_WORDS = frozenset(
    "! { } case do done elif else esac fi for if in then until while . : break continue eval exec exit"
    " export readonly return set shift times trap unset alias bg cd command echo false fc fg getopts hash"
    " jobs kill local newgrp printf pwd read test true type ulimit umask unalias wait [ source let".split())


def recipe_command(recipe: str, cwd: str) -> tuple[list[str], dict[str, str]]:
    """How to run a recipe in `cwd`: `sh -e -c RECIPE`, or, for a plain command (one line of words:
    no quote, `$`, glob, redirection, `;`, `|`, `&`..., not starting with a shell builtin or
    `NAME=`), the command itself, as GNU make does, with the `PWD` the shell would have set. The
    result is the same, and a shell process less per recipe (about 0.7 ms of CPU here)."""
    line = recipe.strip()
    if _PLAIN_RECIPE.fullmatch(line):
        words = line.split()
        if words[0] not in _SHELL_WORDS and "=" not in words[0]:
            return words, {"PWD": cwd}
    return ["sh", "-e", "-c", recipe], {}


def recipe_variables(job: Job, run_id: str, number: int, checkpoint: str | None) -> dict[str, str]:
    """The OFFBUILD_* variables of one attempt (the rest of its environment is offbuild's own)."""
    variables = {"OFFBUILD_STAGE": job.name, "OFFBUILD_RUN_ID": run_id, "OFFBUILD_ATTEMPT": str(number)}
    if checkpoint is not None:
        variables["OFFBUILD_CHECKPOINT"] = os.path.abspath(checkpoint)
    return variables


def recipe_env(environ: dict[str, str], job: Job, run_id: str, number: int, checkpoint: str | None) -> dict[str, str]:
    """The environment of one attempt: offbuild's own plus the OFFBUILD_* variables."""
    return {**environ, **recipe_variables(job, run_id, number, checkpoint)}


def exit_code_of(returncode: int, timed_out: bool) -> int:
    """A timeout counts as 124 and death by signal N as 128+N, for `retry-on` and the record."""
    return TIMEOUT_EXIT_CODE if timed_out else (128 - returncode if returncode < 0 else returncode)


class LocalExecutor:
    """Starts recipes through spawners (see spawner.py); `interrupt()` stops every running one.

    Stages without `network: true` go through a spawner in an empty network namespace, unless
    `offline` is "off"; with "auto" a system that cannot isolate gets a warning, "strict" refuses.
    """

    def __init__(self, root: str, state_dir: str, run_id: str, environ: dict[str, str] | None = None,
                 offline: str = "auto", warn=lambda text: None, spawner_factory=Spawner, slots: int | None = None):
        self.root = root
        self.spawner_factory = spawner_factory  # tests pass a fake that cannot isolate
        # With `slots` (-j), the spawners themselves keep to that many recipes at once, so the
        # Builder can hand over as many again: each starts the moment a recipe ends, without waiting
        # for offbuild to hear of that end, do its bookkeeping and answer.
        self._slots = JobSlots.open(slots) if slots else None
        self.ahead = slots if self._slots is not None else 0
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
                spawner = self.spawner_factory(isolate, self._slots)
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
        for spawner in self._spawner_list():  # a spawner `warm_up` is starting is listed once it has started
            spawner.close()
        if self._slots is not None:
            self._slots.close()
            self._slots = None

    def checkpoint_path(self, job: Job) -> str:
        return checkpoint_path_for(self.state_dir, job.name)

    def submit(self, job: Job) -> Future[RecipeResult]:
        """Start the job's recipe and return at once: no thread waits for it. The spawner's reader
        thread completes the future when the last attempt ends; timeouts and retries use timers."""
        run = _LocalRun(self, job)
        run.begin()
        return run.future

    def run(self, job: Job) -> RecipeResult:
        """Run the recipe, retrying as the stage allows; blocks until it ends."""
        return self.submit(job).result()

    def withdraw(self) -> None:
        for spawner in self._spawner_list():
            spawner.withdraw()

    def resume(self) -> None:
        for spawner in self._spawner_list():
            spawner.resume()

    def _spawner_list(self) -> list[Spawner]:
        with self._lock:
            return list(self._spawners.values())

    def interrupt(self) -> None:
        """Stop every running recipe's process group (SIGTERM, then SIGKILL after a grace) and
        every retry that is waiting for its turn; their futures complete as they end."""
        self.stopping.set()
        with self._lock:
            runs = list(self._running.values())
        for run in runs:
            run.stop()


class _LocalRun:
    """One job's recipe over its attempts, moved on by events (the spawner's exit messages,
    timers) rather than by a thread of its own: a build of 10,000 short recipes would otherwise
    spend as much on thread hand-offs as on the recipes.

    The spawner times the attempt out itself, from when it really starts. `timer` is the wait
    before the next attempt (`waiting`); both are read and changed under the executor's lock, so
    an interrupt, a timer and an exit racing each other end the run exactly once."""

    def __init__(self, executor: LocalExecutor, job: Job):
        self.executor = executor
        self.job = job
        self.log_path = log_path_for(executor.log_dir, job.name)
        self.future: Future[RecipeResult] = Future()
        self.attempts: list[Attempt] = []
        self.started = time.monotonic()
        self.number = 0
        self.process = None
        self.spawner: Spawner | None = None
        self.timer: threading.Timer | None = None
        self.waiting = False
        self.logged = False  # whether the log got anything: the recipe's output or offbuild's notes

    def begin(self) -> None:
        discard_log(self.log_path)
        self._start_attempt(1)

    def _retry(self, number: int) -> None:
        """On the retry timer's thread, unless `stop` ended the run first."""
        with self.executor._lock:
            if not self.waiting:
                return
            self.waiting = False
        self._start_attempt(number)

    def _start_attempt(self, number: int) -> None:
        executor, job = self.executor, self.job
        if job.stage.checkpoint:
            os.makedirs(executor.checkpoint_dir, exist_ok=True)
        argv, shell_variables = recipe_command(job.recipe, executor.root)
        variables = recipe_variables(job, executor.run_id, number,
                                     executor.checkpoint_path(job) if job.stage.checkpoint else None)
        variables.update(shell_variables)
        spawner = self.spawner = executor.spawner(isolate=not job.stage.network)
        self.number = number
        with executor._lock:
            stopping = executor.stopping.is_set()
            if not stopping:
                executor._running[job.name] = self
        if stopping:
            self._attempt_ended(Attempt(number, 130, 0.0))
            return
        try:  # not under the lock: writing to a busy spawner may block
            process = spawner.start(argv, executor.root, executor.environ, os.path.abspath(self.log_path),
                                    self._exited, variables, job.stage.timeout, KILL_GRACE_SECONDS)
        except SpawnerGone as error:
            self._note(f"offbuild: cannot start the recipe: {error}\n")
            self._attempt_ended(Attempt(number, 127, 0.0, error=str(error)))
            return
        with executor._lock:
            if process.returncode is None:  # else it has ended already, and `_exited` has run or will
                self.process = process
            missed_interrupt = executor.stopping.is_set()
        if missed_interrupt:  # `interrupt` came while it was starting, and found no process to stop
            process.stop(KILL_GRACE_SECONDS)

    def _guarded(self, step, *args) -> None:
        """Run `step` on the spawner's reader thread or a timer's: the Builder waits for this run's
        future, so a bug must reach it there rather than leave it waiting for ever."""
        try:
            step(*args)
        except BaseException as bug:
            if not self.future.done():
                self.future.set_exception(bug)
            raise

    def _exited(self, process) -> None:
        """On the spawner's reader thread: the attempt ended, could not start (`error`) or was
        dropped before it started."""
        self._guarded(self._attempt_exited, process)

    def _attempt_exited(self, process) -> None:
        with self.executor._lock:
            self.process = None
            self.logged = self.logged or process.logged
        if process.dropped:
            self._dropped()
            return
        if self.number == 1:  # the run's time counts from its real start, not from a wait for a slot
            self.started = time.monotonic() - process.seconds
        if process.timed_out:
            self._note(timeout_note(self.job.stage.timeout))
        if process.error:
            self._note(f"offbuild: cannot run the recipe: {process.error}\n")
        self._attempt_ended(Attempt(self.number, exit_code_of(process.returncode, process.timed_out),
                                    process.seconds, process.timed_out, error=process.error))

    def _dropped(self) -> None:
        """The attempt was withdrawn before it started: the run ends with the attempts it had."""
        with self.executor._lock:
            self.executor._running.pop(self.job.name, None)
        if self.attempts:
            self._finish()
        else:
            self.future.set_result(RecipeResult(-1, 0.0, self.log_path, [], self.executor.stopping.is_set(),
                                                logged=self.logged, started=False))

    def _attempt_ended(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)
        executor = self.executor
        delay = retry_delay(self.job.stage, attempt, executor.stopping)
        if delay is not None:
            self._note(retry_note(attempt, delay))
            self.spawner.resume()  # a failure that will be retried holds nobody back
        with executor._lock:
            if delay is not None and not executor.stopping.is_set():
                self.waiting = True
                self.timer = _daemon_timer(delay, self._guarded, self._retry, self.number + 1)
                return
            executor._running.pop(self.job.name, None)
        self._finish()

    def _note(self, text: str) -> None:
        self.logged = True
        append_to_log(self.log_path, text)

    def _finish(self) -> None:
        last = self.attempts[-1]
        self.future.set_result(RecipeResult(last.exit_code, time.monotonic() - self.started, self.log_path,
                                            self.attempts, self.executor.stopping.is_set(), error=last.error,
                                            logged=self.logged))

    def stop(self) -> None:
        """For `interrupt`: end the running attempt, or the wait for the next one."""
        with self.executor._lock:
            waiting, self.waiting = self.waiting, False
            if waiting:
                self.executor._running.pop(self.job.name, None)
                self.timer.cancel()
            process = self.process
        if waiting:
            self._finish()
        elif process is not None:
            process.stop(KILL_GRACE_SECONDS)


def _daemon_timer(seconds: float, function, *args) -> threading.Timer:
    timer = threading.Timer(seconds, function, args)
    timer.daemon = True
    timer.start()
    return timer
