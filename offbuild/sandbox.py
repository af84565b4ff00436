"""offbuild's side of the spawner (see spawner.py): start it, ask it for recipes, track them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable


class SpawnerGone(Exception):
    """The spawner process died; recipes can no longer be started through it."""


class RemoteProcess:
    """A recipe started by the spawner, with the part of `Popen`'s interface the executor uses.

    Its `pid` is known once the spawner has answered (`wait_started`); `on_exit(code, error)` is
    called on the spawner's reader thread when it ends, or could not start (code 127 and why)."""

    def __init__(self, on_exit: Callable[[int, str], None] | None = None):
        self.pid: int | None = None
        self.returncode: int | None = None
        self.error = ""
        self._on_exit = on_exit
        self._started = threading.Event()
        self._done = threading.Event()

    def _began(self, pid: int) -> None:
        self.pid = pid
        self._started.set()

    def _exited(self, code: int, error: str = "") -> None:
        self.returncode, self.error = code, error
        self._started.set()
        self._done.set()
        if self._on_exit is not None:
            try:
                self._on_exit(code, error)
            except Exception:  # a bug in the callback: the reader thread must go on for the other recipes
                traceback.print_exc()

    def wait_started(self) -> bool:
        """Wait for the spawner's answer; whether the recipe started (it may have ended since)."""
        self._started.wait()
        return self.pid is not None

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired("recipe", timeout)
        return self.returncode  # type: ignore[return-value]


class Spawner:
    """One spawner process; `isolate` puts it (and every recipe it starts) in an empty network namespace."""

    def __init__(self, isolate: bool):
        self.process = subprocess.Popen(
            [sys.executable, "-S", "-m", "offbuild.spawner"] + (["--isolate"] if isolate else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
            env={**os.environ, "PYTHONPATH": _package_parent() + os.pathsep + os.environ.get("PYTHONPATH", "")})
        ready = json.loads(self.process.stdout.readline() or b'{"isolated": false, "reason": "spawner died"}')
        self.isolated: bool = ready["isolated"]
        self.reason: str = ready.get("reason", "")
        self._lock = threading.Lock()
        self._next_id = 0
        self._running: dict[int, RemoteProcess] = {}  # request id → process, until it exits
        self._env_sent: dict[str, str] | None = None  # the environment the spawner holds now
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="spawner-reader", daemon=True)
        self._reader.start()

    def start(self, argv: list[str], cwd: str, env: dict[str, str], log_path: str,
              on_exit: Callable[[int, str], None] | None = None) -> RemoteProcess:
        """Ask for a recipe to start in its own session, its output appended to `log_path`; returns at
        once (no round trip: recipes start while offbuild goes on). Raises SpawnerGone."""
        process = RemoteProcess(on_exit)
        with self._lock:
            if not self._alive:
                raise SpawnerGone("the recipe spawner has exited")
            request_id = self._next_id
            self._next_id += 1
            self._running[request_id] = process
            message = {"op": "spawn", "id": request_id, "argv": argv, "cwd": cwd, "log": log_path}
            # Recipes' environments differ in a few OFFBUILD_* values: send the whole of it once, then
            # only what changed (the spawner applies each request's changes in order).
            if self._env_sent is None:
                message["env"] = self._env_sent = dict(env)
            else:
                sent = self._env_sent
                message["env_set"] = {name: value for name, value in env.items() if sent.get(name) != value}
                message["env_unset"] = [name for name in sent if name not in env]
                sent.update(message["env_set"])
                for name in message["env_unset"]:
                    del sent[name]
            try:
                self.process.stdin.write((json.dumps(message) + "\n").encode())
                self.process.stdin.flush()
            except (BrokenPipeError, OSError):
                del self._running[request_id]
                raise SpawnerGone("the recipe spawner has exited") from None
        return process

    def spawn(self, argv: list[str], cwd: str, env: dict[str, str], log_path: str) -> RemoteProcess:
        """Start a recipe and wait until it has started (its pid is known)."""
        process = self.start(argv, cwd, env, log_path)
        if not process.wait_started():
            raise SpawnerGone(process.error or "the recipe spawner has exited")
        return process

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            op = message["op"]
            if op == "started":
                with self._lock:
                    process = self._running[message["id"]]
                process._began(message["pid"])
                continue
            with self._lock:
                process = self._running.pop(message["id"])
            if op == "exit":
                process._exited(message["code"])
            elif op == "error":
                process._exited(127, message["message"])
        with self._lock:  # the spawner died: nothing it started will report again
            self._alive = False
            orphans, self._running = list(self._running.values()), {}
        for process in orphans:
            process._exited(255, "the recipe spawner has exited")

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        self.process.wait()


def _package_parent() -> str:
    """So `python -S -m offbuild.spawner` (no site: it needs only the standard library, and starts
    faster without) finds this very offbuild, installed or not."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
