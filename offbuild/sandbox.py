"""offbuild's side of the spawner (see spawner.py): start it, ask it for recipes, track them."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable

from .spawner import receive_request, write_all


class SpawnerGone(Exception):
    """The spawner process died; recipes can no longer be started through it."""


class RemoteProcess:
    """A recipe started by the spawner: `stop` it, `wait` for it. `on_exit(process)` is called on the
    spawner's reader thread when it ends (`returncode`), or could not start (126 or 127, as a shell
    would exit, and `error` says why)."""

    def __init__(self, spawner: Spawner, request_id: int, on_exit: Callable[[RemoteProcess], None] | None = None):
        self.returncode: int | None = None
        self.error = ""
        self.logged = False  # whether the recipe printed anything (its log exists)
        self.seconds = 0.0  # how long it ran, from its real start (it may have waited for a slot)
        self.timed_out = False  # the spawner stopped it at its timeout
        self.dropped = False  # withdrawn or stopped before it started: it never ran
        self._spawner = spawner
        self._id = request_id
        self._on_exit = on_exit
        # Held until the recipe ends: a bare lock is a fraction of an Event's cost, per recipe.
        self._pending = threading.Lock()
        self._pending.acquire()

    def _dropped(self) -> None:
        """It never started: withdrawn, or stopped while it waited."""
        self.dropped = True
        self._exited(-1)

    def _exited(self, code: int, error: str = "") -> None:
        self.returncode, self.error = code, error
        self._pending.release()
        on_exit, self._on_exit = self._on_exit, None  # it refers back to its owner: no cycle for the collector
        if on_exit is not None:
            try:
                on_exit(self)
            except Exception:  # a bug in the callback: the reader thread must go on for the other recipes
                traceback.print_exc()

    def stop(self, grace: float) -> None:
        """SIGTERM the recipe's process group, SIGKILL it `grace` seconds later if it has not ended
        (and at once whatever it leaves behind when it does); drop it if it has not started yet.
        Returns at once."""
        if self.returncode is None:
            self._spawner._stop(self._id, grace)

    def wait(self, timeout: float | None = None) -> int:
        if not self._pending.acquire(timeout=-1 if timeout is None else timeout):
            raise subprocess.TimeoutExpired("recipe", timeout)
        self._pending.release()  # for any other waiter
        return self.returncode  # type: ignore[return-value]


class JobSlots:
    """The pipe of `-j` job slots that a run's spawners share (see spawner.py): one byte per slot."""

    def __init__(self, read_fd: int, write_fd: int, count: int):
        self.read_fd, self.write_fd = read_fd, write_fd
        self.count = count

    # A pipe holds 64 KiB on Linux, but in 16 pages: a byte taken frees no page until its page is
    # empty, and a byte given back may need a page of its own. Half the pipe never fills it, so a
    # spawner giving a slot back never blocks.
    MOST = 32768

    @classmethod
    def open(cls, count: int) -> JobSlots | None:
        """`count` slots, or None for more than MOST: such a `-j` is no limit in practice, and
        offbuild's own cap on the recipes it hands over keeps it."""
        if count > cls.MOST:
            return None
        read_fd, write_fd = os.pipe()
        os.write(write_fd, b"+" * count)
        return cls(read_fd, write_fd, count)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class Spawner:
    """One spawner process; `isolate` puts it (and every recipe it starts) in an empty network namespace.
    With `slots`, it runs no more recipes at once than the slots allow, and holds the others until
    one frees; without, it starts each recipe as soon as it is asked."""

    # The queue keeps each request one message: SOCK_SEQPACKET on Linux; elsewhere (macOS has no
    # SOCK_SEQPACKET for Unix sockets) a datagram socket, whose messages must be small. A request
    # bigger than LARGEST_MESSAGE goes as a file descriptor holding it.
    QUEUE_KIND, LARGEST_MESSAGE = ((socket.SOCK_SEQPACKET, 32768) if sys.platform.startswith("linux")
                                   else (socket.SOCK_DGRAM, 1024))

    def __init__(self, isolate: bool, slots: JobSlots | None = None, workers: int | None = None):
        workers = workers or _worker_count(slots)
        # Requests go straight to the workers through one queue; offbuild keeps its receiving end
        # as well, to take back what no worker has taken yet (withdraw, stop).
        self._queue, self._queue_end = socket.socketpair(socket.AF_UNIX, self.QUEUE_KIND)
        # Room for many requests (each system caps these): Linux counts a Unix socket's queue
        # against the sender's buffer, BSDs against the receiver's.
        for end, option, size in ((self._queue, socket.SO_SNDBUF, 1 << 22),
                                  (self._queue_end, socket.SO_RCVBUF, 1 << 20)):
            try:
                end.setsockopt(socket.SOL_SOCKET, option, size)
            except OSError:  # above what the system allows (where it refuses rather than caps)
                pass
        controls = [os.pipe() for _ in range(workers)]
        self._controls = [write_fd for _, write_fd in controls]
        options = ["--isolate"] if isolate else []
        options += ["--queue", str(self._queue_end.fileno()),
                    "--control", ",".join(str(read_fd) for read_fd, _ in controls)]
        passed = [self._queue_end.fileno()] + [read_fd for read_fd, _ in controls]
        if slots is not None:
            options += ["--slots", f"{slots.read_fd},{slots.write_fd}",
                        "--capacity", str(math.ceil(slots.count / workers))]
            passed += [slots.read_fd, slots.write_fd]
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-S", "-m", "offbuild.spawner"] + options,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True, pass_fds=passed,
                env={**os.environ, "PYTHONPATH": _package_parent() + os.pathsep + os.environ.get("PYTHONPATH", "")})
        finally:
            for read_fd, _ in controls:
                os.close(read_fd)
        ready = json.loads(self.process.stdout.readline() or b'{"isolated": false, "reason": "spawner died"}')
        self.isolated: bool = ready["isolated"]
        self.reason: str = ready.get("reason", "")
        self._lock = threading.Lock()
        self._next_id = 0
        self._running: dict[int, RemoteProcess] = {}  # request id → process, until it exits
        self._env_sent: dict[str, str] | None = None  # the base environment the workers hold now
        self._generation = 0  # of `_env_sent`
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="spawner-reader", daemon=True)
        self._reader.start()

    def start(self, argv: list[str], cwd: str, env: dict[str, str], log_path: str,
              on_exit: Callable[[RemoteProcess], None] | None = None, extra: dict[str, str] | None = None,
              timeout: float | None = None, grace: float = 5.0) -> RemoteProcess:
        """Ask for a recipe to start in its own session with `env` plus `extra`, its output appended
        to `log_path`, and to be stopped (as by `stop(grace)`) if it runs `timeout` seconds. Returns
        at once: no round trip, recipes start while offbuild goes on. Raises SpawnerGone."""
        with self._lock:
            if not self._alive:
                raise SpawnerGone("the recipe spawner has exited")
            request_id = self._next_id
            self._next_id += 1
            process = self._running[request_id] = RemoteProcess(self, request_id, on_exit)
            try:
                # Recipes share one environment but for their OFFBUILD_* values (`extra`): every
                # worker is sent it once, before the first request that needs it.
                if env != self._env_sent:
                    self._broadcast({"op": "env", "generation": self._generation + 1, "env": env})
                    self._env_sent, self._generation = dict(env), self._generation + 1
                request = {"id": request_id, "argv": argv, "cwd": cwd, "log": log_path, "extra": extra or {},
                           "generation": self._generation}
                if timeout is not None:
                    request["timeout"], request["grace"] = timeout, grace
                self._enqueue(request)
            except SpawnerGone:
                del self._running[request_id]
                raise
        return process

    def withdraw(self) -> None:
        """Drop every recipe still waiting for a slot; each reports `dropped`."""
        with self._lock:
            dropped = [self._running.pop(request["id"]) for request in self._take_back()]
            self._tell_all({"op": "withdraw"})
        for process in dropped:
            process._dropped()

    def resume(self) -> None:
        """Let waiting recipes start again: a failed one holds them back (see spawner.py)."""
        with self._lock:
            self._tell_all({"op": "resume"})

    def _stop(self, request_id: int, grace: float) -> None:
        """RemoteProcess.stop: take the request back if no worker has taken it, else tell them all."""
        with self._lock:
            dropped = None
            for request in self._take_back():
                if request["id"] == request_id:
                    dropped = self._running.pop(request_id)
                else:
                    self._enqueue(request)  # in the order they came: the queue holds no others now
            if dropped is None:
                self._tell_all({"op": "stop", "id": request_id, "grace": grace})
        if dropped is not None:
            dropped._dropped()

    def _tell_all(self, message: dict) -> None:
        """A control message, when offbuild would not know what to do if the spawner is gone."""
        if self._alive:
            try:
                self._broadcast(message)
            except SpawnerGone:
                pass

    def _broadcast(self, message: dict) -> None:
        line = (json.dumps(message) + "\n").encode()
        try:
            for control in self._controls:
                write_all(control, line)
        except OSError:
            raise SpawnerGone("the recipe spawner has exited") from None

    def _enqueue(self, request: dict) -> None:
        data = json.dumps(request).encode()
        try:
            if len(data) <= self.LARGEST_MESSAGE:
                self._queue.send(data)
                return
            holder = _request_holder()
            try:
                write_all(holder, data)
                os.lseek(holder, 0, os.SEEK_SET)
                socket.send_fds(self._queue, [b"+"], [holder])
            finally:
                os.close(holder)
        except OSError:
            raise SpawnerGone("the recipe spawner has exited") from None

    def _take_back(self) -> list[dict]:
        """The requests no worker has taken yet, out of the queue, in order."""
        taken = []
        while True:
            try:
                data = receive_request(self._queue_end)
            except OSError:  # closed: the spawner is gone
                data = None
            if data is None:
                return taken
            taken.append(json.loads(data))

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            # No lock: `start` registers a process before its request is written, and a dict's pop is
            # atomic. Taking the lock here could wait for a writer that waits for this very reader.
            process = self._running.pop(message["id"])
            if message["op"] == "exit":
                process.logged, process.seconds = message["logged"], message.get("seconds", 0.0)
                process.timed_out = message.get("timed_out", False)
                process._exited(message["code"])
            elif message["op"] == "dropped":
                process._dropped()
            else:  # "error": it could not start
                process._exited(message["code"], message["message"])
        # The workers are gone: shut the queue first, so a `start` blocked on a full queue (under
        # the lock) fails instead of waiting for ever.
        try:
            self._queue_end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:  # the spawner died: nothing it started will report again
            self._alive = False
            orphans, self._running = list(self._running.values()), {}
        for process in orphans:
            process._exited(255, "the recipe spawner has exited")

    def close(self) -> None:
        with self._lock:  # no other thread may write to a descriptor number once it is closed
            controls, self._controls = self._controls, []
            for control in controls:  # each worker kills what it still runs, and ends
                os.close(control)
        self.process.wait()
        self._reader.join()
        self._queue.close()
        self._queue_end.close()


def _request_holder() -> int:
    """A descriptor of a new, nameless file to pass a big request in: a memfd where there is one."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("offbuild-request", os.MFD_CLOEXEC)
    with tempfile.TemporaryFile() as handle:
        return os.dup(handle.fileno())


# Each worker is a forked Python process of about 2.5 MB of its own; past a few per core's worth
# of wake-ups, more of them would only cost memory and start-up.
MOST_WORKERS = 16


def _worker_count(slots: JobSlots | None) -> int:
    """One worker per core that -j can keep busy (see spawner.py), up to MOST_WORKERS; one without
    slots (then recipes start as they come, nothing waits) or where a worker cannot follow its
    parent's death."""
    if slots is None or not sys.platform.startswith("linux"):
        return 1
    return max(1, min(slots.count, len(os.sched_getaffinity(0)), MOST_WORKERS))


def _package_parent() -> str:
    """So `python -S -m offbuild.spawner` (no site: it needs only the standard library, and starts
    faster without) finds this very offbuild, installed or not."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
