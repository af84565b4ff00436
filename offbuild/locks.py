"""Per-job exclusive locks shared by every offbuild process on a project.

All jobs share one lock file, `<state_dir>/jobs.lock`: a job's lock is one byte of it, at an
offset derived from the job's name. One file instead of one per job, because creating thousands
of small files is what a first build of a big pipeline would otherwise spend its time on (ext4
scans past recently deleted inodes for every new one).

These are POSIX record locks (`lockf`): the kernel drops them when their process dies, so a lock
left by a killed offbuild never blocks anyone and no `--unlock` is ever needed. They belong to
the process, not the descriptor: closing *any* descriptor of the file releases all of them, so
the file is opened once per `JobLocks` and closed only by `release_all`.
"""
from __future__ import annotations

import fcntl
import os
import threading

import blake3

POLL_SECONDS = 0.05
LOCK_FILE = "jobs.lock"


def _offset(name: str) -> int:
    """Where the job's byte is: 56 bits of a hash, so two jobs share a byte about never (and if
    they did, they would only wait for each other)."""
    return int.from_bytes(blake3.blake3(name.encode()).digest(7), "big")


class JobLocks:
    """The locks this process holds, by job name."""

    def __init__(self, state_dir: str):
        os.makedirs(state_dir, exist_ok=True)
        self._fd = os.open(os.path.join(state_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.held: dict[str, int] = {}

    def try_acquire(self, name: str) -> bool:
        """Take the job's lock if nobody holds it; never waits."""
        offset = _offset(name)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)
        except OSError:  # EAGAIN or EACCES, depending on the system: another process holds it
            return False
        self.held[name] = offset
        return True

    def acquire(self, name: str, cancelled: threading.Event) -> bool:
        """Wait for the job's lock (polling, so Ctrl-C is not stuck behind another process)."""
        while not cancelled.is_set():
            if self.try_acquire(name):
                return True
            cancelled.wait(POLL_SECONDS)
        return False

    def release(self, name: str) -> None:
        offset = self.held.pop(name, None)
        if offset is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)

    def release_all(self) -> None:
        """Release every lock and the file (the builder is done with both)."""
        self.held.clear()
        if self._fd >= 0:
            os.close(self._fd)  # closing drops every lock this process holds on the file
            self._fd = -1
