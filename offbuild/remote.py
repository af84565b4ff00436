"""The worker side of the Dask executor: one attempt of one recipe, run on a Dask worker.

Workers import this module by reference (the tasks and the plugin are pickled by name), so it
stays light: the standard library, distributed (already loaded in a worker), and offbuild's
spawner client. Each worker process holds one `RecipeRunner` plugin, whose spawners (one in an
empty network namespace, one not) start on first use, exactly as on the machine running
offbuild; when the worker process dies, the spawners see their pipe close and kill every recipe
they started, so no recipe outlives its worker.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time

from distributed import Event, WorkerPlugin, get_worker
from distributed.worker import thread_state

from .executor import KILL_GRACE_SECONDS, append_to_log, discard_log, exit_code_of, timeout_note
from .sandbox import Spawner, SpawnerGone

PLUGIN_NAME = "offbuild-recipes"
WAIT_SLICE_SECONDS = 0.25  # how often a waiting attempt looks at its deadline and its task's state
STOP_CHECK_SECONDS = 0.5  # how often it asks the scheduler whether offbuild was interrupted
CANNOT_START_EXIT_CODE = 127


class RecipeRunner(WorkerPlugin):
    """Per worker process: the spawners that start recipes, started lazily, closed with the worker."""

    name = PLUGIN_NAME
    idempotent = True  # a second offbuild on the cluster must not restart spawners that are in use

    def setup(self, worker) -> None:
        self._spawners: dict[bool, Spawner] = {}
        self._lock = threading.Lock()

    def teardown(self, worker) -> None:
        with self._lock:
            spawners, self._spawners = list(self._spawners.values()), {}
        for spawner in spawners:
            spawner.close()  # its stdin closes: it kills what it started

    def spawner(self, isolate: bool) -> Spawner:
        """The spawner for isolated or networked recipes; a dead one is replaced."""
        with self._lock:
            spawner = self._spawners.get(isolate)
            if spawner is None or spawner.process.poll() is not None:
                spawner = self._spawners[isolate] = Spawner(isolate)
            return spawner


def worker_name(worker) -> str:
    """The worker's `--name` if it has one, else its address."""
    return str(worker.name) if worker.name is not None else worker.address


def probe_isolation(dask_worker) -> tuple[bool, str]:
    """For `client.run`: can this worker isolate recipes? (isolated, reason if not)."""
    spawner = _runner(dask_worker).spawner(isolate=True)
    return spawner.isolated, spawner.reason


def run_attempt(request: dict) -> dict:
    """Run one attempt as `request` describes (argv, cwd, env, log, isolate, strict, timeout,
    stop_event); return a plain dict: exit_code, timed_out, stopped, worker, isolated, reason, error."""
    worker = get_worker()
    name = worker_name(worker)
    answer: dict = {"worker": name, "exit_code": CANNOT_START_EXIT_CODE, "timed_out": False, "stopped": False,
                    "isolated": None, "reason": "", "error": ""}
    if not os.path.isdir(request["cwd"]):
        answer["error"] = f"Dask worker {name} does not see the project folder {request['cwd']}"
        return answer
    spawner = _runner(worker).spawner(request["isolate"])
    if request["isolate"]:
        answer.update(isolated=spawner.isolated, reason=spawner.reason)
        if not spawner.isolated and request["strict"]:
            answer["error"] = (f"--offline=strict: Dask worker {name} cannot isolate recipes from the network"
                               f" ({spawner.reason})")
            return answer
    _cut_log(request["log"], request.get("log_size"))
    try:
        process = spawner.start(request["argv"], request["cwd"], request["env"], request["log"],
                                extra={"OFFBUILD_WORKER": name})
    except SpawnerGone as error:
        answer["error"] = f"cannot start the recipe on Dask worker {name}: {error}"
        return answer
    ending = _wait(process, request["timeout"], request["stop_event"], worker, thread_state.key)
    if ending == "timed out":
        append_to_log(request["log"], timeout_note(request["timeout"]))
    if ending != "exited":
        process.stop(request.get("grace", KILL_GRACE_SECONDS))
        process.wait()
    if process.error:
        answer["error"] = f"cannot start the recipe on Dask worker {name}: {process.error}"
        return answer
    answer.update(exit_code=exit_code_of(process.returncode, ending == "timed out"), timed_out=ending == "timed out",
                  stopped=ending in ("stopped", "cancelled"))
    return answer


def _cut_log(path: str, size: int | None) -> None:
    """Back to the size offbuild saw before it sent the attempt: when Dask runs an attempt again
    because its worker died, the dead run's partial output goes (earlier attempts' stays)."""
    if size is None:  # an offbuild that does not say
        return
    try:
        if os.path.getsize(path) > size:
            if size:
                os.truncate(path, size)
            else:
                discard_log(path)  # a log exists only when something was printed
    except OSError:
        pass


def _runner(worker) -> RecipeRunner:
    runner = worker.plugins.get(PLUGIN_NAME)
    if runner is None:  # the executor registers it; this covers a worker that missed it
        runner = RecipeRunner()
        runner.setup(worker)
        worker.plugins[PLUGIN_NAME] = runner
    return runner


def _wait(process, timeout: float | None, stop_event: str, worker, key) -> str:
    """Wait for the recipe; 'exited', or why it must be stopped: 'timed out', 'stopped' (offbuild
    was interrupted) or 'cancelled' (the scheduler released the task: offbuild is gone)."""
    now = time.monotonic()
    deadline = None if timeout is None else now + timeout
    next_stop_check = now + STOP_CHECK_SECONDS
    event = Event(stop_event)
    while True:
        slice_ = WAIT_SLICE_SECONDS if deadline is None else max(0.0, min(WAIT_SLICE_SECONDS, deadline - now))
        try:
            process.wait(timeout=slice_)
            return "exited"
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return "timed out"
        task = worker.state.tasks.get(key)
        if task is None or task.state == "cancelled":
            return "cancelled"
        if now >= next_stop_check:
            next_stop_check = now + STOP_CHECK_SECONDS
            try:
                if event.is_set():
                    return "stopped"
            except Exception:  # the scheduler is unreachable for now: the task state above still guards
                pass
