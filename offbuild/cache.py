"""The shared output cache (SPEC section 7): job outputs by stage key, on any fsspec filesystem.

Layout under the cache's root (a local folder or a URL such as `s3://bucket/prefix`):

    blobs/<d[:2]>/<d>           the bytes of one file, named by its BLAKE3 digest (offbuild's own)
    entries/<k[:2]>/<k>.json    a stage key → each output path with its digest, and for every file
                                its blob, size and executable bit; `used` is the last hit (for LRU)

Every write goes to a unique `….tmp-<random>` name beside its final name and is then moved into
place, so a reader sees a whole blob or entry or none; two writers of the same name write the
same bytes, so whichever move lands last is as good as the other. An entry is written only after
all its blobs. Restores hash every fetched file before moving it into place: a corrupt or missing
blob makes the restore fail (the job then runs) and never reaches the project.

fsspec is imported only when a cache is opened: a build without one never pays for it.
"""
from __future__ import annotations

import json
import os
import re
import stat as stat_module
import time
from collections import Counter
from dataclasses import dataclass

from .errors import UsageError
from .hashing import DIRECTORY_PREFIX, hash_file_contents, tree_digest, tree_files
from .model import Job

ENTRY_FORMAT = 1
REFRESH_SECONDS = 3600  # a hit rewrites the entry's `used` time at most this often (LRU to the hour)
STALE_TEMP_SECONDS = 3600  # prune removes temporary files older than this (a writer died)
_TEMP = ".tmp-"
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\Z", re.I)
_HEX = re.compile(r"[0-9a-f]{16,128}\Z")


class NotCacheable(Exception):
    """The job's outputs cannot be stored faithfully (a symbolic link, a socket...)."""


@dataclass(frozen=True, slots=True)
class CachedFile:
    """One stored file: its blob's digest, its size and whether it was executable."""

    digest: str
    size: int
    executable: bool


@dataclass(frozen=True, slots=True)
class CachedOutput:
    """One declared output: a file (`files[""]`) or a directory tree (`files` by relative name)."""

    digest: str  # as FileHasher.digest gives it ("tree:…" for a directory)
    files: dict[str, CachedFile]
    directories: tuple[str, ...] = ()  # subfolders of a tree, so empty ones come back too

    @property
    def is_tree(self) -> bool:
        return self.digest.startswith(DIRECTORY_PREFIX)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """What the cache holds for one stage key."""

    key: str
    job: str
    outputs: dict[str, CachedOutput]
    used: float
    duration: float | None = None  # how long the recipe took that made these outputs


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What `prune` removed and what is left."""

    entries_removed: int
    blobs_removed: int
    bytes_before: int
    bytes_after: int


def why_not_cached(job: Job) -> str | None:
    """Why a job is never stored nor restored, or None when it may be."""
    if job.is_check:
        return "it is a check (no outputs)"
    if job.stage.checkpoint:
        return "checkpoint stages are never cached"
    if job.stage.always:
        return "always stages are never cached"
    if not job.stage.cache:
        return "its stage says cache: false"
    return None


def parse_size(text: str) -> int:
    """`500M`, `2G`, `1.5T`, `800k`, `123` (bytes); binary multiples, like `du -h`."""
    match = _SIZE.match(text.strip())
    if not match:
        raise UsageError(f"bad size '{text}' for --cache-prune (use e.g. 500M, 2G or a number of bytes)")
    scale = 1024 ** " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * scale)


class OutputCache:
    """A cache at `location`, opened with `open` (which turns unusable locations into UsageError)."""

    @staticmethod
    def why_not(job: Job) -> str | None:
        """Why `job` is never stored or restored, or None (see `why_not_cached`)."""
        return why_not_cached(job)

    @staticmethod
    def is_refusal(error: BaseException) -> bool:
        """Is `error` a store's "this job cannot be cached" (a note, not a failure)?"""
        return isinstance(error, NotCacheable)

    def __init__(self, fs, root: str, location: str, warn=lambda text: None, clock=time.time):
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self.location = location
        self.warn = warn
        self.clock = clock
        self._made: set[str] = set()  # folders known to exist

    @classmethod
    def open(cls, location: str, *, create: bool, warn=lambda text: None, clock=time.time) -> "OutputCache":
        """Connect to the cache; with `create`, make its folder (read-only callers leave the disk alone)."""
        try:
            import fsspec  # only here: builds without a cache never import it

            fs, root = fsspec.core.url_to_fs(location)
        except ImportError as error:  # e.g. "Install s3fs to access S3"
            raise UsageError(f"cannot use the cache '{location}': {error}"
                             " (install the fsspec backend for this protocol)") from None
        except (ValueError, OSError) as error:  # e.g. "Protocol not known: nosuch"
            raise UsageError(f"cannot use the cache '{location}': {error}") from None
        cache = cls(fs, root, location, warn, clock)
        if create:
            try:
                fs.makedirs(cache.root, exist_ok=True)
                if not fs.isdir(cache.root):
                    raise NotADirectoryError(f"'{location}' is not a directory")
            except OSError as error:
                reason = error.strerror or str(error)
                raise UsageError(f"cannot create the cache directory '{location}': {reason}") from None
        return cache

    # -- names

    def _path(self, *parts: str) -> str:
        return "/".join((self.root.rstrip("/"),) + parts)

    def blob_path(self, digest: str) -> str:
        return self._path("blobs", digest[:2], digest)

    def entry_path(self, key: str) -> str:
        return self._path("entries", key[:2], key + ".json")

    # -- reading

    def lookup(self, key: str) -> CacheEntry | None:
        """The entry for a stage key, or None (absent, unreadable or malformed; the latter two warn)."""
        try:
            raw = self.fs.cat_file(self.entry_path(key))
        except FileNotFoundError:
            return None
        except Exception as error:  # any backend's error: a cache problem never fails a build
            self.warn(f"offbuild: warning: cannot read the cache entry {key[:12]} in {self.location}: {error}")
            return None
        entry = _parse_entry(raw, key)
        if entry is None:
            self.warn(f"offbuild: warning: ignoring a malformed cache entry {key[:12]} in {self.location}")
        return entry

    def restore(self, entry: CacheEntry, job: Job) -> bool:
        """Put the entry's outputs in place for `job`; False (with a warning) when a blob is missing
        or corrupt, in which case nothing of the job's outputs is moved into place."""
        if sorted(entry.outputs) != sorted(job.outputs):
            self.warn(f"offbuild: warning: cache entry {entry.key[:12]} does not list the outputs of '{job.name}'")
            return False
        staged: list[tuple[str, str]] = []  # (temporary, final)
        try:
            for path in job.outputs:
                output = entry.outputs[path]
                if output.is_tree:
                    for folder in output.directories:
                        os.makedirs(os.path.join(path, folder), exist_ok=True)
                    os.makedirs(path, exist_ok=True)
                for relative, cached in output.files.items():
                    final = os.path.join(path, relative) if output.is_tree else path
                    staged.append((self._fetch(cached, final, job), final))
            for temporary, final in staged:
                os.replace(temporary, final)
            staged = []
        except _BadBlob as problem:
            self.warn(f"offbuild: warning: {problem}; running '{job.name}' instead")
            return False
        finally:
            for temporary, _ in staged:
                _unlink(temporary)
        self._refresh(entry)
        return True

    def _fetch(self, cached: CachedFile, final: str, job: Job) -> str:
        """Copy a blob beside `final` under a temporary name and check its hash; returns that name."""
        parent = os.path.dirname(final)
        if parent:
            os.makedirs(parent, exist_ok=True)
        # One name per output: the job's lock means no one else restores it now, and a leftover of
        # a killed restore is overwritten by the next one instead of piling up in the project.
        temporary = f"{final}.offbuild-restoring"
        blob = self.blob_path(cached.digest)
        try:
            self.fs.get_file(blob, temporary)
        except FileNotFoundError:
            _unlink(temporary)
            raise _BadBlob(f"the cache has no blob {cached.digest[:12]} for '{final}' (pruned?)") from None
        except Exception as error:  # the backend's own errors: treat as a miss
            _unlink(temporary)
            raise _BadBlob(f"cannot fetch blob {cached.digest[:12]} for '{final}': {error}") from None
        try:
            size = os.path.getsize(temporary)
            digest = hash_file_contents(temporary, size)
        except OSError as error:
            _unlink(temporary)
            raise _BadBlob(f"cannot read the fetched blob for '{final}': {error}") from None
        if digest != cached.digest or size != cached.size:
            _unlink(temporary)
            self._discard(blob)  # it is wrong under its own name: let the next store replace it
            raise _BadBlob(f"cache blob {cached.digest[:12]} for '{final}' is corrupt "
                           f"({size} bytes hashing to {digest[:12]})")
        if cached.executable:
            mode = os.stat(temporary).st_mode
            os.chmod(temporary, mode | (mode & 0o444) >> 2)  # x wherever r, as a fresh `chmod +x` would
        return temporary

    def _refresh(self, entry: CacheEntry) -> None:
        """A hit makes the entry recently used (for `prune`); at most once per REFRESH_SECONDS, best effort."""
        now = self.clock()
        if now - entry.used < REFRESH_SECONDS:
            return
        try:
            self._write(self.entry_path(entry.key), _entry_bytes(entry, used=now))
        except Exception:  # a read-only cache still serves hits
            pass

    # -- writing

    def store(self, key: str, job: Job, outputs: dict[str, str], duration: float | None = None) -> None:
        """Save the job's outputs (`outputs` maps each path to the digest the builder recorded) under
        `key`. Raises NotCacheable for outputs that cannot be stored faithfully, OSError and the
        backend's errors otherwise; the caller turns those into warnings."""
        described: dict[str, CachedOutput] = {}
        for path in job.outputs:
            digest = outputs[path]
            if digest.startswith(DIRECTORY_PREFIX):
                described[path] = self._put_tree(path, digest)
            else:
                described[path] = CachedOutput(digest, {"": self._put_file(path, digest)})
        now = self.clock()
        entry = CacheEntry(key, job.name, described, now, duration)
        self._write(self.entry_path(key), _entry_bytes(entry, used=now))

    def _put_tree(self, directory: str, digest: str) -> CachedOutput:
        folders = []
        for root, dirs, _ in os.walk(directory):
            for name in dirs:
                path = os.path.join(root, name)
                if os.path.islink(path):
                    raise NotCacheable(f"'{path}' is a symbolic link")
                folders.append(os.path.relpath(path, directory))
        files, listed = {}, []
        for relative, path in tree_files(directory):
            info = os.lstat(path)
            file_digest = hash_file_contents(path, info.st_size) if stat_module.S_ISREG(info.st_mode) else ""
            files[relative] = self._put_file(path, file_digest)
            listed.append((relative, file_digest))
        if tree_digest(listed) != digest:
            raise OSError(f"'{directory}' changed after the job finished")
        return CachedOutput(digest, files, tuple(sorted(folders)))

    def _put_file(self, path: str, digest: str) -> CachedFile:
        info = os.lstat(path)
        if stat_module.S_ISLNK(info.st_mode):
            raise NotCacheable(f"'{path}' is a symbolic link")
        if not stat_module.S_ISREG(info.st_mode):
            raise NotCacheable(f"'{path}' is not a regular file")
        cached = CachedFile(digest, info.st_size, bool(info.st_mode & 0o100))
        blob = self.blob_path(digest)
        try:
            if self.fs.size(blob) == info.st_size:
                return cached  # already there (a blob of the wrong size is replaced below)
        except FileNotFoundError:
            pass
        if hash_file_contents(path, info.st_size) != digest:
            raise OSError(f"'{path}' changed after the job finished")
        self._put(blob, lambda temporary: self.fs.put_file(path, temporary))
        return cached

    def _write(self, final: str, data: bytes) -> None:
        """Write `data` to `final` whole or not at all."""
        self._put(final, lambda temporary: self.fs.pipe_file(temporary, data))

    def _put(self, final: str, upload) -> None:
        """`upload(name)` to a temporary name beside `final`, then move it there: readers see all or nothing."""
        self._ensure_folder(final)
        temporary = f"{final}{_TEMP}{os.urandom(6).hex()}"
        try:
            upload(temporary)
            self.fs.mv(temporary, final)
        except BaseException:
            self._discard(temporary)
            raise

    def _ensure_folder(self, path: str) -> None:
        folder = path.rsplit("/", 1)[0]
        if folder not in self._made:
            self.fs.makedirs(folder, exist_ok=True)
            self._made.add(folder)

    def _discard(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except Exception:  # already gone, or the cache is read-only: nothing more to do
            pass

    # -- pruning

    def prune(self, max_bytes: int, dry: bool = False) -> PruneReport:
        """Remove least-recently-used entries, then every blob no remaining entry needs, until the
        cache holds at most `max_bytes`. Leftovers of dead writers go too. `dry` only counts."""
        entries = self._listing("entries")
        blobs = self._listing("blobs")
        now = self.clock()
        for path, info in list(entries.items()) + list(blobs.items()):
            if _TEMP in path.rsplit("/", 1)[-1]:
                entries.pop(path, None)
                blobs.pop(path, None)
                modified = _modified(info)
                if modified is not None and now - modified > STALE_TEMP_SECONDS and not dry:
                    self._discard(path)
        blob_sizes = {path.rsplit("/", 1)[-1]: info.get("size") or 0 for path, info in blobs.items()}
        bytes_before = sum(info.get("size") or 0 for info in entries.values()) + sum(blob_sizes.values())
        kept: list[tuple[float, str, int, set[str]]] = []  # (used, path, size, blob digests)
        doomed_entries = []
        for path, info in entries.items():
            entry = self._read_entry(path)
            if entry is None:
                doomed_entries.append(path)
                continue
            needs = {cached.digest for output in entry.outputs.values() for cached in output.files.values()}
            kept.append((entry.used, path, info.get("size") or 0, needs))
        kept.sort()
        references = Counter(digest for *_, needs in kept for digest in needs)
        size = sum(entry_size for _, _, entry_size, _ in kept) + sum(
            blob_sizes.get(digest, 0) for digest in references)
        for _, path, entry_size, needs in kept:  # oldest first
            if size <= max_bytes:
                break
            doomed_entries.append(path)
            size -= entry_size
            for digest in needs:
                references[digest] -= 1
                if references[digest] == 0:
                    size -= blob_sizes.get(digest, 0)
        doomed_blobs = [path for path in blobs if references[path.rsplit("/", 1)[-1]] <= 0]
        if not dry:
            for path in doomed_entries + doomed_blobs:  # entries first: no entry ever names a removed blob
                self._discard(path)
        return PruneReport(len(doomed_entries), len(doomed_blobs), bytes_before, size)

    def _listing(self, folder: str) -> dict[str, dict]:
        try:
            return dict(self.fs.find(self._path(folder), detail=True))
        except FileNotFoundError:
            return {}

    def _read_entry(self, path: str) -> CacheEntry | None:
        key = path.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            return _parse_entry(self.fs.cat_file(path), key)
        except FileNotFoundError:
            return None


class _BadBlob(Exception):
    """A blob that is missing, unreadable or not what its name says."""


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _entry_bytes(entry: CacheEntry, used: float) -> bytes:
    outputs = {}
    for path, output in entry.outputs.items():
        files = {name: {"digest": cached.digest, "size": cached.size, "executable": cached.executable}
                 for name, cached in output.files.items()}
        outputs[path] = {"digest": output.digest, "files": files, "directories": list(output.directories)}
    document = {"format": ENTRY_FORMAT, "key": entry.key, "job": entry.job, "used": used,
                "duration": entry.duration, "outputs": outputs}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _parse_entry(raw: bytes, key: str) -> CacheEntry | None:
    """An entry as `_entry_bytes` wrote it, or None if it is anything else (cut short, edited, newer)."""
    try:
        document = json.loads(raw)
        if document.get("format") != ENTRY_FORMAT or document.get("key") != key:
            return None
        outputs = {}
        for path, output in document["outputs"].items():
            files = {}
            for name, cached in output["files"].items():
                digest = cached["digest"]
                if not isinstance(digest, str) or not _HEX.match(digest) or (name and not _inside(name)):
                    return None
                files[name] = CachedFile(digest, int(cached["size"]), bool(cached["executable"]))
            directories = tuple(str(folder) for folder in output.get("directories", ()))
            if not all(_inside(folder) for folder in directories):
                return None
            if not output["digest"].startswith(DIRECTORY_PREFIX) and list(files) != [""]:
                return None
            outputs[str(path)] = CachedOutput(str(output["digest"]), files, directories)
        duration = document.get("duration")
        return CacheEntry(key, str(document.get("job", "")), outputs, float(document["used"]),
                          float(duration) if duration is not None else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _inside(name: str) -> bool:
    """A relative name that stays inside its tree (a shared cache is not trusted to be well-formed)."""
    return bool(name) and not os.path.isabs(name) and ".." not in name.split("/")


def _modified(info: dict) -> float | None:
    """A listing's modification time as a timestamp, whatever the backend calls it."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(name)
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
        if isinstance(value, str):
            try:
                from datetime import datetime

                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None
