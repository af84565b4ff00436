"""offbuild's side of the spawner (see spawner.py): start it, ask it for recipes, track them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading


class SpawnerGone(Exception):
    """The spawner process died; recipes can no longer be started through it."""


class RemoteProcess:
    """A recipe started by the spawner, with the part of `Popen`'s interface the executor uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self._done = threading.Event()

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._done.set()

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
        self._starting: dict[int, tuple[threading.Event, list]] = {}
        self._running: dict[int, RemoteProcess] = {}
        self._env_sent: dict[str, str] | None = None  # the environment the spawner holds now
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="spawner-reader", daemon=True)
        self._reader.start()

    def spawn(self, argv: list[str], cwd: str, env: dict[str, str], log_path: str) -> RemoteProcess:
        """Start a recipe in its own session, output appended to `log_path`."""
        started = threading.Event()
        answer: list = []
        with self._lock:
            if not self._alive:
                raise SpawnerGone("the recipe spawner has exited")
            request_id = self._next_id
            self._next_id += 1
            self._starting[request_id] = (started, answer)
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
                raise SpawnerGone("the recipe spawner has exited") from None
        started.wait()
        if not answer or isinstance(answer[0], str):
            raise SpawnerGone(answer[0] if answer else "the recipe spawner has exited")
        return answer[0]

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            with self._lock:
                if message["op"] == "started":
                    process = RemoteProcess(message["pid"])
                    self._running[message["id"]] = process
                    event, answer = self._starting.pop(message["id"])
                    answer.append(process)
                    event.set()
                elif message["op"] == "error":
                    event, answer = self._starting.pop(message["id"])
                    answer.append(message["message"])
                    event.set()
                elif message["op"] == "exit":
                    self._running.pop(message["id"])._exited(message["code"])
        with self._lock:  # the spawner died: nothing it started will report again
            self._alive = False
            for event, _ in self._starting.values():
                event.set()
            for process in self._running.values():
                process._exited(255)

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
