"""A small process that starts recipes for offbuild, optionally inside an empty network namespace.

offbuild starts one spawner per run (`python -m offbuild.spawner [--isolate]`); every recipe it
starts inherits its namespace, so isolation costs one `unshare` per run instead of one per recipe.

Workers: after isolating, the spawner forks into `--control`'s count of workers (about one per core,
see sandbox.Spawner), each an independent loop that starts and watches its own recipes. A recipe's
end wakes the worker that started it, and the kernel runs that worker on the core the recipe has
just freed; a single process woken by every recipe was often queued behind a recipe on the other
core while the freed one idled (measured: 10-14% idle cores at -j2, against 4% for ninja).
All workers take recipes from one queue (`--queue`, a SOCK_SEQPACKET socket, or a datagram one where
there is none: one whole request per message), a worker only while it has room (`--capacity`
recipes); each has its own control pipe from offbuild, and all write their reports to the one
stdout, a line per write (atomic in a pipe).
A worker that dies ends the spawner: the first worker, parent of the others, stops them all, and
they stop when it dies (PR_SET_PDEATHSIG). When offbuild dies the control pipes close and each
worker kills every recipe it started: no recipe outlives a crashed build.

A recipe's output (stdout and stderr) goes through a pipe to its worker, which writes it to the
recipe's log, appending, as it arrives; the log is created at the first byte, so a recipe that
prints nothing leaves no file behind (a big pipeline would otherwise make one empty file per job).
Before reporting an exit the worker writes out what is left in the pipe.

Stopping a recipe is its worker's job too: it alone knows whether the recipe's process still
exists, so a signal never reaches a reused pid.

Job slots: with `--slots R,W` (the two ends of a pipe holding one byte per `-j` slot, as GNU make's
jobserver) a recipe starts only once its worker has taken a byte, and gives it back when the recipe
ends. offbuild may then hand over more recipes than may run at once: they wait in the queue, in
order, and each starts the moment a slot frees, without a round trip through offbuild. Both of a
run's spawners (isolated and networked) share the one pipe, so `-j` holds across them. A recipe that
fails (or cannot start) holds every worker's next recipe back (a flag the workers share) until
offbuild says what follows: `resume` (a retry, or -k) or `withdraw` (the build stops), so nothing
new starts after a failure that stops the build, but what another worker started in the same
instant. A recipe's timeout is counted here too, from the moment it really starts.

Protocol (JSON):
  spawner → offbuild (stdout, a line each)
                      {"op": "ready", "isolated": bool, "reason": str}
  offbuild → queue    {"id": N, "argv": [...], "cwd": str, "log": path, "generation": G (of the base
                       environment, below), "extra": {...} (this recipe's own variables, on top of the
                       base), "timeout": seconds (optional; then stopped as below, with "grace")}; a
                       request too big for one message comes as a file descriptor (a memfd) holding it
  offbuild → each worker's control pipe (a line each)
                      {"op": "env", "generation": G, "env": {...}}: the base environment, sent before
                       the first request that needs it
                      {"op": "stop", "id": N, "grace": seconds}: SIGTERM to the recipe's process group,
                       SIGKILL after the grace if the recipe has not ended, and at once to whatever it
                       leaves behind in its group when it does; a recipe still waiting for a slot is
                       dropped (offbuild takes one still in the queue out itself)
                      {"op": "withdraw"}: drop every recipe waiting for a slot (offbuild empties the
                       queue itself), and hold none back from then on
                      {"op": "resume"}: start waiting recipes again after a failure
  spawner → offbuild  {"op": "exit", "id": N, "code": C, "logged": whether it printed anything,
                       "seconds": how long it ran, "timed_out": bool}
                      | {"op": "error", "id": N, "code": 126 or 127, "message": str} (it could not start)
                      | {"op": "dropped", "id": N} (it never started)
"""
from __future__ import annotations

import array
import ctypes
import fcntl
import json
import math
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_PR_SET_PDEATHSIG = 1
# Writes to a pipe up to this size are atomic: the workers' report lines never interleave.
_ATOMIC_WRITE = select.PIPE_BUF
# Python ignores SIGPIPE and this process ignores SIGINT; a recipe starts with neither ignored
# (`yes | head` must end), as subprocess's restore_signals would do.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGINT, signal.SIGXFSZ)


def isolate_network() -> str:
    """Enter a new, empty network namespace with loopback up; '' on success, else the reason."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWNET) != 0:
        # Unprivileged users may still own a user namespace in which they may make a network one.
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            return f"unshare failed: {os.strerror(ctypes.get_errno())}"
        try:
            with open("/proc/self/setgroups", "w") as handle:
                handle.write("deny")
            with open("/proc/self/uid_map", "w") as handle:
                handle.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as handle:
                handle.write(f"{gid} {gid} 1")
        except OSError as error:
            return f"cannot map ids in the user namespace: {error.strerror}"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH", b"lo", 0)
            flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))
    except OSError as error:
        return f"cannot bring up loopback: {error.strerror}"
    return ""


class _Output:
    """One recipe's output pipe and the log it is copied to, opened at the first byte."""

    __slots__ = ("pipe", "path", "log", "logged")

    def __init__(self, pipe: int, path: str):
        self.pipe, self.path = pipe, path
        self.log: int | None = None  # its descriptor while open
        self.logged = False  # whether the log was created (the recipe printed something)


class _Child:
    """A running recipe: its request's id, output, start, and what ends it if it runs too long."""

    __slots__ = ("request_id", "output", "started", "deadline", "grace", "timed_out")

    def __init__(self, request: dict, output: _Output):
        self.request_id, self.output = request["id"], output
        self.started = time.monotonic()
        timeout = request.get("timeout")
        self.deadline = math.inf if timeout is None else self.started + timeout
        self.grace = request.get("grace", 5.0)
        self.timed_out = False


class _Slots:
    """The shared pipe of job slots (see the module's docstring); None in `_Server` when unlimited."""

    def __init__(self, read_fd: int, write_fd: int):
        for fd in (read_fd, write_fd):
            os.set_inheritable(fd, False)  # this process's own: no recipe may hold or take a slot
        os.set_blocking(read_fd, False)
        self.read_fd, self.write_fd = read_fd, write_fd

    def take(self) -> bool:
        try:
            return os.read(self.read_fd, 1) != b""
        except BlockingIOError:  # all in use (or the other spawner took the one that was free)
            return False

    def give_back(self) -> None:
        os.write(self.write_fd, b"+")


class _Ended(Exception):
    """This worker must end: offbuild is gone (its control pipe closed or stdout broke), or a sibling
    worker died, or SIGTERM came."""


class _Worker:
    """One worker's loop (see the module's docstring): takes requests from the shared queue while it
    has room, starts them as slots allow, copies their output, reports their ends."""

    def __init__(self, control: int, queue: socket.socket, slots: _Slots | None, held: mmap.mmap,
                 capacity: float, siblings: frozenset[int] = frozenset()):
        self.control = control
        self.queue = queue
        self.slots = slots
        self.held = held  # byte 0 set: a recipe failed, every worker's waiting one waits for offbuild's word
        self.capacity = capacity  # recipes this worker may run at once (the slots cap them all together)
        self.siblings = set(siblings)  # the other workers' pids, in the first worker (their parent)
        self.waiting: deque[dict] = deque()  # requests taken from the queue, waiting for a slot, in order
        self.children: dict[int, _Child] = {}  # pid → the running recipe
        self.pids: dict[int, int] = {}  # request id → pid, while the recipe runs
        self.stopping: dict[int, float] = {}  # pid → when it gets SIGKILL (inf: it has had it)
        self.outputs: dict[int, _Output] = {}  # by pipe, until the pipe's end
        self.poller = select.poll()
        self.outbox: list[bytes] = []  # report lines for offbuild, written together once per wake-up
        self.cwd = os.getcwd()
        # The base environments by generation: later ones may come before the requests that still
        # need an earlier one, which go first (the queue keeps the order offbuild sent them in).
        self.envs: dict[int, dict[str, str]] = {0: {}}
        self.control_pending = b""
        self.terminated = False
        self._programs: dict[tuple[str, str], str] = {}

    def program(self, name: str, env: dict[str, str]) -> str:
        """The file `name` runs, found on PATH once: `posix_spawnp` would try every PATH entry before
        it for every recipe (a dozen failed `execve`s each with a long PATH)."""
        search = env.get("PATH", os.defpath)
        found = self._programs.get((name, search))
        if found is None:
            found = name
            if "/" not in name:
                for folder in search.split(os.pathsep):
                    candidate = os.path.join(folder or ".", name)
                    if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
                        found = os.path.abspath(candidate)
                        break
            self._programs[(name, search)] = found
        return found

    def send(self, message: dict) -> None:
        self.outbox.append(json.dumps(message).encode() + b"\n")

    def flush(self) -> None:
        """Write the reports, whole lines only in each write, so other workers' lines never land
        inside one of them."""
        chunk = b""
        for line in self.outbox:
            if len(chunk) + len(line) > _ATOMIC_WRITE and chunk:
                write_all(1, chunk)
                chunk = b""
            chunk += line
        if chunk:
            write_all(1, chunk)
        self.outbox.clear()

    @property
    def is_held(self) -> bool:
        return self.held[0] != 0

    def hold(self) -> None:
        self.held[0] = 1

    def release(self) -> None:
        self.held[0] = 0

    def read_control(self) -> None:
        """Handle what offbuild has written to this worker's control pipe."""
        chunk = os.read(self.control, 65536)
        if not chunk:
            raise _Ended
        *lines, self.control_pending = (self.control_pending + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                self.handle(json.loads(line))

    def handle(self, request: dict) -> None:
        if request["op"] == "env":
            self.envs[request["generation"]] = request["env"]
        elif request["op"] == "stop":
            self.stop(request["id"], request["grace"])
        elif request["op"] == "withdraw":  # the build stops: whatever comes next is a new one's
            while self.waiting:
                self.send({"op": "dropped", "id": self.waiting.popleft()["id"]})
            self.release()
        elif request["op"] == "resume":
            self.release()

    def takes_requests(self) -> bool:
        """Whether to take a request from the queue: with room for it; and while a failure holds
        every worker, all there are, to be started or dropped by offbuild's word. Else offbuild,
        blocked on a full queue, could never send that word."""
        return self.is_held or (not self.waiting and len(self.children) < self.capacity)

    def take_request(self) -> None:
        """One request from the shared queue, if another worker has not taken it first."""
        data = receive_request(self.queue)
        if data is None:
            return
        request = json.loads(data)
        generation = request["generation"]
        while generation not in self.envs:  # offbuild sent it first: it is in the pipe
            self.read_control()
        request["env"] = self.envs[generation]
        for older in [number for number in self.envs if number < generation]:  # no request needs it
            del self.envs[older]
        self.waiting.append(request)

    def start_waiting(self) -> None:
        """Start waiting recipes while there are free slots."""
        while (self.waiting and not self.is_held and len(self.children) < self.capacity
               and (self.slots is None or self.slots.take())):
            if not self.spawn(self.waiting.popleft()) and self.slots is not None:
                self.slots.give_back()
                self.hold()

    def spawn(self, request: dict) -> bool:
        """Start one recipe; False when it could not start (said to offbuild as an error)."""
        try:
            if request["cwd"] != self.cwd:  # posix_spawn has no chdir of its own here
                os.chdir(request["cwd"])
                self.cwd = request["cwd"]
        except OSError as error:
            self.send({"op": "error", "id": request["id"], "code": 127, "message": str(error)[:1000]})
            return False
        # Both ends are close-on-exec (PEP 446, like every descriptor of this process): a recipe gets
        # the write end only as its stdout and stderr, so another recipe never holds it open.
        output, output_writer = os.pipe()
        try:
            # posix_spawn (vfork) costs a fraction of subprocess's fork.
            pid = os.posix_spawn(self.program(request["argv"][0], request["env"]), request["argv"],
                                 {**request["env"], **request["extra"]},
                                 setsid=True, setsigdef=_DEFAULT_SIGNALS, file_actions=[
                                     (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                     (os.POSIX_SPAWN_DUP2, output_writer, 1),
                                     (os.POSIX_SPAWN_DUP2, output_writer, 2)])
        except OSError as error:  # what a shell would say, with its exit codes
            os.close(output)
            found = not isinstance(error, FileNotFoundError)
            message = f"{request['argv'][0]}: {error.strerror.lower() if found else 'command not found'}"
            self.send({"op": "error", "id": request["id"], "code": 126 if found else 127,
                       "message": message[:1000]})  # a report line stays one atomic write
            return False
        finally:
            os.close(output_writer)
        os.set_blocking(output, False)
        self.outputs[output] = _Output(output, request["log"])
        self.poller.register(output, select.POLLIN)
        self.children[pid] = _Child(request, self.outputs[output])
        self.pids[request["id"]] = pid
        return True

    def stop(self, request_id: int, grace: float) -> None:
        pid = self.pids.get(request_id)
        if pid is None:
            for request in self.waiting:  # not started yet: it never will
                if request["id"] == request_id:
                    self.waiting.remove(request)
                    self.send({"op": "dropped", "id": request_id})
                    break
            return  # else another worker's, or over
        if pid not in self.stopping:  # else it is being stopped already
            _signal_group(pid, signal.SIGTERM)
            self.stopping[pid] = time.monotonic() + grace

    def watch_clocks(self) -> float | None:
        """Stop the recipes whose timeout is over, SIGKILL the groups whose grace is over;
        milliseconds until the next of those moments, if any."""
        now = time.monotonic()
        pending = []
        for pid, child in self.children.items():
            if child.deadline <= now:
                child.deadline, child.timed_out = math.inf, True
                self.stop(child.request_id, child.grace)
            elif child.deadline != math.inf:
                pending.append(child.deadline)
        for pid, deadline in self.stopping.items():
            if deadline <= now:
                _signal_group(pid, signal.SIGKILL)
                self.stopping[pid] = math.inf
            elif deadline != math.inf:
                pending.append(deadline)
        return max(0.0, (min(pending) - now) * 1000) if pending else None

    def copy_output(self, output: _Output, most: int = 1 << 24) -> None:
        """Append what the pipe holds (up to `most` bytes) to its log; at its end, close both."""
        copied = 0
        while copied < most:
            try:
                data = os.read(output.pipe, 65536)
            except BlockingIOError:
                return
            if not data:
                self.poller.unregister(output.pipe)
                os.close(output.pipe)
                if output.log is not None:
                    os.close(output.log)
                del self.outputs[output.pipe]
                return
            copied += len(data)
            if output.log is None:
                try:
                    output.log = os.open(output.path, _LOG_FLAGS, 0o644)
                except OSError:  # the log folder went away: the output has nowhere to go
                    continue
                output.logged = True
            os.write(output.log, data)

    def reap(self) -> None:
        while self.children or self.siblings:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.siblings:  # a worker died: what it ran will never be reported
                self.siblings.discard(pid)
                raise _Ended
            child = self.children.pop(pid, None)
            if child is None:
                continue
            seconds = time.monotonic() - child.started
            if self.slots is not None:
                self.slots.give_back()
                if status != 0:
                    self.hold()
            del self.pids[child.request_id]
            if self.stopping.pop(pid, None) is not None:
                _signal_group(pid, signal.SIGKILL)  # what a stopped recipe left behind goes with it
            if child.output.pipe in self.outputs:  # so the log is whole when offbuild reads it
                self.copy_output(child.output)
            self.send({"op": "exit", "id": child.request_id, "code": os.waitstatus_to_exitcode(status),
                       "logged": child.output.logged, "seconds": seconds, "timed_out": child.timed_out})

    def kill_all(self) -> None:
        """offbuild is gone, or the spawner ends: nobody will record these recipes, so stop them at once."""
        for pid in self.children:
            _signal_group(pid, signal.SIGKILL)

    def serve(self) -> None:
        """Run until offbuild goes or this worker must end; then kill what it still runs."""
        try:
            self._serve()
        except (_Ended, BrokenPipeError):
            pass
        self.kill_all()

    def _serve(self) -> None:
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        os.set_blocking(wake_read, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._terminate)
        self.poller.register(self.control, select.POLLIN)
        self.poller.register(wake_read, select.POLLIN)
        queue = self.queue.fileno()
        self.poller.register(queue, select.POLLIN)
        if self.slots is not None:
            self.poller.register(self.slots.read_fd, 0)
        timeout = None
        while not self.terminated:
            try:
                events = self.poller.poll(timeout)
            except InterruptedError:
                continue
            ready = set()
            for fd, _ in events:
                if fd == wake_read:
                    try:
                        os.read(wake_read, 4096)
                    except BlockingIOError:
                        pass
                elif fd in self.outputs:
                    self.copy_output(self.outputs[fd])
                else:
                    ready.add(fd)
            if self.control in ready:  # first: a stop or a new environment applies to what follows
                self.read_control()
            self.reap()  # then: the slots it frees go to the waiting recipes at once
            if queue in ready and self.takes_requests():
                self.take_request()
            self.start_waiting()
            # Wake for the queue only to take a request, and for a free slot (the pipe readable)
            # only while one waits: otherwise every worker would wake for each.
            self.poller.modify(queue, select.POLLIN if self.takes_requests() else 0)
            if self.slots is not None:
                self.poller.modify(self.slots.read_fd,
                                   select.POLLIN if self.waiting and not self.is_held else 0)
            timeout = self.watch_clocks()
            self.flush()

    def _terminate(self, *_) -> None:
        self.terminated = True


def receive_request(queue: socket.socket) -> bytes | None:
    """One request from the queue, without waiting: as sent (whether as the message itself or in
    the memfd it carried, closed here); None when the queue is empty. (Python 3.11's
    `socket.recv_fds` ignores its flags, so it would wait.)"""
    fds = array.array("i")
    try:
        data, ancillary, _, _ = queue.recvmsg(65536, socket.CMSG_LEN(fds.itemsize), socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if not fds:
        return data or None
    for extra in fds[1:]:
        os.close(extra)
    os.set_inheritable(fds[0], False)  # no recipe may get it (MSG_CMSG_CLOEXEC is Linux's alone)
    with os.fdopen(fds[0], "rb") as holder:
        return holder.read()


def write_all(fd: int, data: bytes) -> None:
    """All of `data`, however many writes it takes."""
    while data:
        data = data[os.write(fd, data):]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _option(name: str) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None


def _own(fd: int) -> int:
    os.set_inheritable(fd, False)  # this process's own: no recipe may hold it
    return fd


def _become_sibling() -> None:
    """In a worker forked by the first: end with the first (the spawner's process for offbuild)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # offbuild decides what Ctrl-C stops
    reason = isolate_network() if "--isolate" in sys.argv else "not requested"
    slots = None
    if "--slots" in sys.argv:
        read_fd, write_fd = map(int, _option("--slots").split(","))
        slots = _Slots(read_fd, write_fd)
    controls = [_own(int(fd)) for fd in _option("--control").split(",")]
    queue = socket.socket(fileno=_own(int(_option("--queue"))))
    capacity = float(_option("--capacity") or "inf")
    held = mmap.mmap(-1, 1)  # shared with the workers forked below
    first = os.getpid()
    siblings = []
    for control in controls[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                _become_sibling()
                if os.getppid() == first:  # else the first died before it could say
                    _Worker(control, queue, slots, held, capacity).serve()
            finally:
                os._exit(0)
        siblings.append(pid)
    write_all(1, json.dumps({"op": "ready", "isolated": not reason, "reason": reason}).encode() + b"\n")
    worker = _Worker(controls[0], queue, slots, held, capacity, frozenset(siblings))
    try:
        worker.serve()
    finally:
        # They end with offbuild's control pipes too: this is for a worker's death or a SIGTERM.
        # Only those not reaped yet: a reaped one's pid may be another process's by now.
        for pid in worker.siblings:
            _terminate(pid)
        for pid in worker.siblings:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    # Nothing is left to flush or clean up: skip the interpreter's shutdown, which offbuild would
    # otherwise wait for at the end of every build.
    os._exit(0)


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    main()
