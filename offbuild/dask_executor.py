"""Runs recipes on a Dask distributed cluster whose workers see the project's filesystem.

offbuild still plans, hashes, locks and records on this machine; each attempt of a recipe is one
Dask task (`remote.run_attempt`) that runs it on a worker through offbuild's own spawner, so
isolation, timeouts, the log and the OFFBUILD_* environment mean what they mean locally. Retries
are offbuild's (`run_with_retries`), not Dask's; Dask only reruns an attempt whose worker died.
A job's pool becomes a Dask resource of the same name. Imported only for `--executor dask`.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

import distributed
from distributed.scheduler import KilledWorker

from .errors import OffbuildError
from .executor import (KILL_GRACE_SECONDS, Attempt, RecipeResult, append_to_log, checkpoint_path_for, log_path_for,
                       recipe_command, recipe_env, run_with_retries)
from .model import Job
from .remote import CANNOT_START_EXIT_CODE, RecipeRunner, probe_isolation, run_attempt

CONNECT_TIMEOUT_SECONDS = 5.0
POLL_SECONDS = 0.5  # how often a waiting attempt looks at `stopping` and at the cluster's workers
WORKERS_TTL_SECONDS = 1.0  # how long a look at the scheduler's worker list is reused
UNSERVABLE_GRACE_SECONDS = 10.0  # a queued task fails once no worker could run it for this long
STOP_GRACE_SECONDS = KILL_GRACE_SECONDS + 5.0  # after an interrupt, the wait for remote recipes to stop
KILLED_EXIT_CODE = 137  # every worker that ran it died: as if killed by SIGKILL
INTERRUPTED_EXIT_CODE = 130


class DaskExecutor:
    """`Executor` that submits each attempt to the Dask scheduler at `scheduler`."""

    def __init__(self, root: str, state_dir: str, run_id: str, scheduler: str, environ: dict[str, str] | None = None,
                 offline: str = "auto", warn=lambda text: None):
        self.root = os.path.abspath(root)
        self.state_dir = state_dir
        self.log_dir = os.path.join(state_dir, "logs")
        self.run_id = run_id
        self.scheduler = scheduler
        self.environ = dict(os.environ if environ is None else environ)
        self.offline = offline
        self.warn = warn
        self.stopping = threading.Event()
        self.ahead = 0  # the cluster's own scheduler queues; handing it more than -j would defeat -j
        self._token = uuid.uuid4().hex[:12]  # names this executor's tasks and its stop event on the cluster
        self._serial = itertools.count()  # watch mode runs a job again with the same executor: keys stay unique
        self._lock = threading.Lock()
        self._isolation: dict[str, str] = {}  # worker → "" when it isolated recipes, else why it could not
        self._warned = False
        self._workers_seen: tuple[float, dict] = (0.0, {})
        self._waiters = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="dask-job")
        os.makedirs(self.log_dir, exist_ok=True)
        self.client = _connect(scheduler)
        try:
            self.client.register_plugin(RecipeRunner())
        except Exception as error:  # the workers cannot unpickle it: no offbuild importable there
            self.client.close()
            raise OffbuildError(f"the Dask workers of {scheduler} cannot load offbuild ({error});"
                                " install offbuild where the workers run") from None
        self.stop_event = distributed.Event(f"offbuild-stop-{self._token}", client=self.client)

    # -- the Executor interface -------------------------------------------------------------

    def submit(self, job: Job) -> Future[RecipeResult]:
        """Run the recipe on the cluster, retrying as the stage allows; output goes to the job's log.
        A thread waits for each (the Builder starts no more at once than `-j` allows)."""
        return self._waiters.submit(self.run, job)

    def run(self, job: Job) -> RecipeResult:
        log_path = log_path_for(self.log_dir, job.name)
        return run_with_retries(job, log_path, lambda number: self._attempt(job, number, log_path), self.stopping)

    def withdraw(self) -> None:
        """Nothing waits here for a slot: the Builder hands over no more than -j recipes."""

    def resume(self) -> None:
        """Nothing is held back after a failure here."""

    def interrupt(self) -> None:
        """Tell every worker to stop this build's recipes (SIGTERM to their groups, SIGKILL after the grace)."""
        self.stopping.set()
        try:
            self.stop_event.set()
        except Exception:  # scheduler gone: its workers' tasks are released, and they stop their recipes
            pass

    def checkpoint_path(self, job: Job) -> str:
        return checkpoint_path_for(self.state_dir, job.name)

    def is_isolated(self, job: Job) -> bool:
        return not job.stage.network and self.offline != "off" and not any(self._isolation.values())

    def require_isolation(self) -> None:
        """--offline=strict: every connected worker must be able to isolate, or nothing runs."""
        results = self.client.run(probe_isolation, on_error="return")
        failing = {address: (answer[1] if isinstance(answer, tuple) else f"{type(answer).__name__}: {answer}")
                   for address, answer in results.items() if not (isinstance(answer, tuple) and answer[0])}
        if failing:
            where = "; ".join(f"{address}: {reason}" for address, reason in sorted(failing.items()))
            raise OffbuildError(f"--offline=strict: Dask workers cannot isolate recipes from the network ({where})")

    def offline_status(self) -> dict:
        """For the run record: the mode asked for, and which workers isolated the recipes they ran."""
        status: dict = {"mode": self.offline, "executor": "dask"}
        if self.offline != "off":
            with self._lock:
                isolation = dict(self._isolation)
            status["isolated"] = None if not isolation else not any(isolation.values())
            status["workers"] = {worker: not reason for worker, reason in sorted(isolation.items())}
            failures = [f"{worker}: {reason}" for worker, reason in sorted(isolation.items()) if reason]
            if failures:
                status["reason"] = "; ".join(failures)
        return status

    def close(self) -> None:
        self._waiters.shutdown(wait=True)
        try:
            if self.stop_event.is_set():
                self.stop_event.clear()  # the scheduler forgets it
        except Exception:
            pass
        self.client.close(timeout=CONNECT_TIMEOUT_SECONDS)

    # -- one attempt ------------------------------------------------------------------------

    def _attempt(self, job: Job, number: int, log: str) -> Attempt:
        pool = job.stage.pool
        missing = self._unservable(pool)
        if missing:
            return _failed(number, CANNOT_START_EXIT_CODE, missing, log)
        if job.stage.checkpoint:
            os.makedirs(os.path.dirname(self.checkpoint_path(job)), exist_ok=True)
        env = recipe_env(self.environ, job, self.run_id, number,
                         self.checkpoint_path(job) if job.stage.checkpoint else None)
        isolate = not job.stage.network and self.offline != "off"
        argv, shell_variables = recipe_command(job.recipe, self.root)
        request = {"argv": argv, "cwd": self.root, "env": {**env, **shell_variables},
                   "log": os.path.abspath(log), "log_size": _size(log), "isolate": isolate,
                   "strict": self.offline == "strict", "timeout": job.stage.timeout, "grace": KILL_GRACE_SECONDS,
                   "stop_event": self.stop_event.name}
        started = time.monotonic()
        if self.stopping.is_set():
            return Attempt(number, INTERRUPTED_EXIT_CODE, 0.0)
        future = self.client.submit(run_attempt, request, key=f"offbuild-{self._token}-{next(self._serial)}-{job.name}",
                                    pure=False, resources={pool: 1} if pool else None)
        try:
            answer = self._wait(future, pool)
        finally:
            future.release()
        duration = time.monotonic() - started
        if "exit_code" not in answer:  # Dask could not run it or gave up on it
            return _failed(number, answer["code"], answer["error"], log, duration)
        if isolate and answer["isolated"] is not None:
            self._note_isolation(answer["worker"], answer["reason"] if not answer["isolated"] else "")
        if answer["error"]:
            return _failed(number, answer["exit_code"], answer["error"], log, duration, answer["worker"])
        return Attempt(number, answer["exit_code"], duration, answer["timed_out"], worker=answer["worker"])

    def _wait(self, future, pool: str | None) -> dict:
        """The task's answer, or {"code", "error"} when Dask cannot give one."""
        unservable_since: float | None = None
        stop_deadline: float | None = None
        while True:
            try:
                return future.result(timeout=POLL_SECONDS)
            except TimeoutError:
                pass
            except KilledWorker as error:
                return {"code": KILLED_EXIT_CODE,
                        "error": f"Dask gave up on it: {error.allowed_failures + 1} workers died while running it"
                                 f" (the last was {error.last_worker.address})"}
            except CancelledError:
                return {"code": INTERRUPTED_EXIT_CODE if self.stopping.is_set() else CANNOT_START_EXIT_CODE,
                        "error": "its Dask task was cancelled (lost the connection to the scheduler?)"}
            except Exception as error:  # the worker-side function failed: a bug, or a broken worker
                return {"code": CANNOT_START_EXIT_CODE, "error": f"its Dask task failed: {type(error).__name__}: {error}"}
            now = time.monotonic()
            if self.stopping.is_set():
                stop_deadline = stop_deadline or now + STOP_GRACE_SECONDS
                if now >= stop_deadline:
                    future.cancel()
                    return {"code": INTERRUPTED_EXIT_CODE, "error": "interrupted; its Dask worker did not answer"}
                continue
            reason = self._unservable(pool) if future.status == "pending" else ""
            unservable_since = (unservable_since or now) if reason else None
            if reason and now - unservable_since >= UNSERVABLE_GRACE_SECONDS:
                future.cancel()
                return {"code": CANNOT_START_EXIT_CODE, "error": reason}

    def _unservable(self, pool: str | None) -> str:
        """Why no worker of the cluster could run a job of `pool` now, or ''."""
        workers = self._workers()
        if not workers:
            return f"no Dask worker is connected to the scheduler at {self.scheduler}"
        if pool and not any(info.get("resources", {}).get(pool, 0) >= 1 for info in workers.values()):
            return (f"no Dask worker offers the resource '{pool}' that pool '{pool}' needs"
                    f" (start one with: dask worker {self.scheduler} --resources \"{pool}=1\")")
        return ""

    def _workers(self) -> dict:
        with self._lock:
            seen, workers = self._workers_seen
            if time.monotonic() - seen < WORKERS_TTL_SECONDS:
                return workers
        try:
            workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        except Exception:  # keep the last look while the scheduler does not answer
            return workers
        with self._lock:
            self._workers_seen = (time.monotonic(), workers)
        return workers

    def _note_isolation(self, worker: str, reason: str) -> None:
        with self._lock:
            known = self._isolation.get(worker)
            self._isolation[worker] = reason
            warn = reason and known is None and not self._warned
            self._warned = self._warned or bool(warn)
        if warn:
            self.warn(f"offbuild: warning: recipes on Dask worker {worker} are NOT network-isolated ({reason});"
                      " --offline=strict refuses to run in that case")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # no log yet: nothing was printed
        return 0


def _connect(scheduler: str) -> "distributed.Client":
    """A client of the scheduler, or a clear error within CONNECT_TIMEOUT_SECONDS."""
    try:
        return distributed.Client(scheduler, timeout=CONNECT_TIMEOUT_SECONDS, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as error:
        raise OffbuildError(f"cannot reach the Dask scheduler at {scheduler} within {CONNECT_TIMEOUT_SECONDS:g}s"
                            f" ({error})") from None


def _failed(number: int, code: int, error: str, log: str, duration: float = 0.0, worker: str | None = None) -> Attempt:
    """An attempt that Dask could not run or finish; the reason goes to the log too."""
    append_to_log(log, f"offbuild: {error}\n")
    return Attempt(number, code, duration, worker=worker, error=error)
