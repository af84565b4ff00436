"""Per-job exclusive locks shared by every offbuild process on a project.

`flock` locks belong to the open file, so the kernel drops them when their process dies:
a lock left by a killed offbuild never blocks anyone, and no `--unlock` is ever needed.
"""
from __future__ import annotations

import fcntl
import os
import threading
from urllib.parse import quote

POLL_SECONDS = 0.05


class JobLocks:
    """Lock files under `<state_dir>/locks/`, one per job name."""

    def __init__(self, state_dir: str):
        self.directory = os.path.join(state_dir, "locks")
        os.makedirs(self.directory, exist_ok=True)
        self.held: dict[str, int] = {}

    def _open(self, name: str) -> int:
        return os.open(os.path.join(self.directory, quote(name, safe="[]-_.") + ".lock"),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def try_acquire(self, name: str) -> bool:
        """Take the job's lock if nobody holds it; never waits."""
        fd = self._open(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.held[name] = fd
        return True

    def acquire(self, name: str, cancelled: threading.Event) -> bool:
        """Wait for the job's lock (polling, so Ctrl-C is not stuck behind another process)."""
        while not cancelled.is_set():
            if self.try_acquire(name):
                return True
            cancelled.wait(POLL_SECONDS)
        return False

    def release(self, name: str) -> None:
        fd = self.held.pop(name, None)
        if fd is not None:
            os.close(fd)  # closing drops the flock

    def release_all(self) -> None:
        for name in list(self.held):
            self.release(name)
