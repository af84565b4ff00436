"""Content hashes (BLAKE3) behind a stat cache, so an unchanged file is never read twice."""
from __future__ import annotations

import os
import stat as stat_module
import time
from dataclasses import dataclass

import blake3

# An entry recorded this soon after the file's mtime may miss a same-tick rewrite (git's
# "racy" problem); 2 s covers file systems with whole-second or FAT-style timestamps. On a file
# system that stamps finely (`fine_timestamps_device`) no entry is racy.
RACY_NS = 2_000_000_000
_MMAP_THRESHOLD = 1 << 20  # below this a plain read beats mapping the file
_THREAD_THRESHOLD = 16 << 20  # blake3's threads pay off only on large files
DIRECTORY_PREFIX = "tree:"


@dataclass(frozen=True, slots=True)
class StatEntry:
    """What a file looked like when its content hash was taken."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int
    digest: str
    recorded_ns: int
    # Taken by this process on a file system that stamps finely: never racy. Not saved in the store:
    # an entry loaded from it may have been taken under another kernel, and keeps the clock's rule.
    fine: bool = False

    def vouches_for(self, st: os.stat_result) -> bool:
        """True when the stat proves the file is unchanged since `digest` was taken."""
        return (st.st_size == self.size and st.st_mtime_ns == self.mtime_ns and st.st_ino == self.ino
                and st.st_ctime_ns == self.ctime_ns and self.settled)

    @property
    def settled(self) -> bool:
        """Whether a rewrite after the hash was taken must have changed the stat."""
        return self.fine or self.recorded_ns - self.mtime_ns >= RACY_NS


def fine_timestamps_device(folder: str) -> int | None:
    """The device of `folder` if its file system gives a write that follows a stat a new mtime, however
    soon (Linux's multigrain timestamps, 6.13+ on ext4, xfs, btrfs and tmpfs), else None. There a
    stat entry is never racy, so an output hashed as its recipe ends vouches for it at once.
    Writes a probe file five times in a row: a coarse clock gives one of them the same mtime."""
    probe = os.path.join(folder, f".timestamps.{os.getpid()}.tmp")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:
        device = os.fstat(fd).st_dev
        for _ in range(5):
            os.write(fd, b"-")
            before = os.fstat(fd).st_mtime_ns
            os.write(fd, b"-")
            if os.fstat(fd).st_mtime_ns == before:
                return None
        return device
    except OSError:
        return None
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass


def hash_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def hash_file_contents(path: str, size: int) -> str:
    """BLAKE3 of one file: read for small files, memory-mapped (and threaded) for large ones."""
    if size < _MMAP_THRESHOLD:  # plain reads: a build hashes thousands of small outputs, and open()'s
        # buffered file object costs more than the hashing itself
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            hasher = blake3.blake3()
            while chunk := os.read(fd, max(size, 65536)):
                hasher.update(chunk)
        finally:
            os.close(fd)
        return hasher.hexdigest()
    threads = blake3.blake3.AUTO if size >= _THREAD_THRESHOLD else 1
    return blake3.blake3(max_threads=threads).update_mmap(path).hexdigest()


class FileHasher:
    """Hashes paths through the stat cache; collects new cache entries for the store to save."""

    def __init__(self, entries: dict[str, StatEntry], fine_device: int | None = None):
        self.entries = entries
        self.fine_device = fine_device  # see `fine_timestamps_device`
        self.fresh: dict[str, StatEntry] = {}  # new or re-taken entries, not yet saved
        self.files_hashed = 0
        self.bytes_hashed = 0
        # The digest each path first had in this build. A path whose digest changes without
        # `forget` (a source edited mid-build) means decisions saw two versions of it.
        self.first_digest: dict[str, str] = {}
        self.unstable = False
        self.saw_directory = False
        # Digests of paths whose stat was compared with their entry's moments ago (the fast path
        # stats every file first): they hold without a second stat, until `forget`.
        self.verified: dict[str, str] = {}

    def digest(self, path: str) -> str | None:
        """The content hash of a file or directory tree, or None when the path does not exist."""
        verified = self.verified.get(path)
        if verified is not None:  # `_seen` inlined: a fast-path build asks this for every input of a big job
            if self.first_digest.setdefault(path, verified) != verified:
                self.unstable = True
            return verified
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat_module.S_ISDIR(st.st_mode):
            return self._tree_digest(path)
        entry = self.entries.get(path)
        if entry is not None and entry.vouches_for(st):
            return self._seen(path, entry.digest)
        recorded_ns = time.time_ns()  # taken before reading: a write during the read makes it racy
        try:
            digest = hash_file_contents(path, st.st_size)
        except (FileNotFoundError, NotADirectoryError):  # deleted since the stat (another offbuild)
            return None
        self.files_hashed += 1
        self.bytes_hashed += st.st_size
        new = StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, digest, recorded_ns,
                        st.st_dev == self.fine_device)
        self.entries[path] = new
        self.fresh[path] = new
        return self._seen(path, digest)

    def _seen(self, path: str, digest: str) -> str:
        first = self.first_digest.setdefault(path, digest)
        if first != digest:
            self.unstable = True
        return digest

    def _tree_digest(self, directory: str) -> str:
        """A directory counts its whole tree: relative names and contents, in sorted order."""
        self.saw_directory = True
        return tree_digest((relative, self.digest(path)) for relative, path in tree_files(directory))

    def forget(self, path: str) -> None:
        """Drop what is known about a path a recipe is about to rewrite."""
        self.entries.pop(path, None)
        self.fresh.pop(path, None)
        self.verified.pop(path, None)
        self.first_digest.pop(path, None)

    def recheck(self, path: str) -> None:
        """Stat `path` again before trusting what is known about it (another process may have
        written it since it was verified)."""
        self.verified.pop(path, None)

    def take_fresh(self) -> dict[str, StatEntry]:
        """New entries since the last call, for saving."""
        fresh, self.fresh = self.fresh, {}
        return fresh


def tree_files(directory: str):
    """(relative name, path) of each file under `directory`, in the order its tree digest lists them."""
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            yield os.path.relpath(path, directory), path


def tree_digest(entries) -> str:
    """The digest of a directory from its files' (relative name, digest) pairs, in `tree_files` order."""
    return DIRECTORY_PREFIX + hash_bytes("".join(f"{relative}\0{digest}\n" for relative, digest in entries).encode())
