"""The build snapshot: what the last successful build's decisions rested on, in a form that loads
in milliseconds, so the next build can prove most jobs up to date without parsing the Pipefile.

After every build that ended with all its jobs done, offbuild saves: the stat of each Pipefile
source and of each folder that globs and patterns listed, the `env:` values, the state store's
generation, and per job its input and output files with the stat each file's content hash was
vouched by, plus the dependency edges. The next build stats those files. A file whose stat is
unchanged has unchanged content (SPEC section 2's stat cache rule), so only the jobs that read or
make a changed file, and the jobs downstream of them, need deciding: when none do, the build is a
no-op; otherwise `fastpath.py` decides and runs just those (Bazel and Shake invalidate the same
way: from the changed leaves up through reverse dependencies).

Structural changes (a source, a listed folder, an `env:` value, another process's write to the
store) invalidate the snapshot and the full path runs. A stat taken within RACY_NS of its file's
mtime proves nothing, so such files are saved as "changed". The jobs themselves are pickled into
a second file that only a build with changes reads. This module imports nothing heavy.
"""
from __future__ import annotations

import marshal
import os
import time
from array import array

from . import __version__

FORMAT = 7  # bump on any change to what a snapshot holds
SNAPSHOT_NAME = "noop.snapshot"
JOBS_NAME = "noop.jobs"
STORE_SEEN_NAME = "noop.store"
RACY_NS = 2_000_000_000  # the same rule as hashing.RACY_NS; kept here so this module stays light
UNTRUSTED = (0, 0, 0, 0)  # the stat saved for a file whose stat proves nothing: never matches
_FIELDS = {"format", "key", "token", "sources", "folders", "env", "generation", "targets", "jobs", "file_paths",
           "file_stats", "inputs", "outputs", "successors", "always", "unsettled", "holds_source", "pools", "cache"}


def snapshot_key(pipefile: str, targets: list[str], overrides: dict[str, str], cwd_offset: str) -> tuple:
    """What must be the same for a snapshot to apply: the invocation, and this offbuild's model format."""
    return (os.path.abspath(pipefile), tuple(targets), tuple(sorted(overrides.items())), cwd_offset,
            __version__, FORMAT)


def stat_tuple(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def capture(key: tuple, project, order: list[str], shown_targets: list[str], pipefile_cache: str | None = None,
            unsettled: set[str] = frozenset()) -> tuple[dict, list] | None:
    """The snapshot (and pickled jobs) after a full-path build, or None when a snapshot would not be
    sound (directory inputs, a file changing mid-build, an unsettled source). `unsettled` are the
    jobs the build did not bring up to date (failed, blocked, interrupted): every later fast-path
    build decides them again, as it does `always` jobs."""
    graph, hasher, store = project.graph, project.hasher, project.store
    if not order or hasher.unstable or hasher.saw_directory:
        return None
    generation = store.generation()
    if generation != project.start_generation + store.bumps:  # another process wrote meanwhile
        return None
    sources = []
    for path, size, mtime_ns, ino, ctime_ns, taken in graph.pipeline.source_stats:
        if taken - mtime_ns < RACY_NS:
            return None
        sources.append((path, (size, mtime_ns, ino, ctime_ns)))
    folders = []
    for path, info in graph.listed_folders.items():
        if info is not None and info[3] - info[0] < RACY_NS:
            return None
        folders.append((path, None, None) if info is None else (path, info[:3], info[4]))
    index_of_job = {name: index for index, name in enumerate(order)}
    file_index: dict[str, int] = {}
    env: dict[str, str] = {}
    inputs, outputs, successors = _Lists(), _Lists(), _Lists()
    always, holding_sources = [], []
    pickled = _JobPickler()
    for name in order:
        job = graph.jobs[name]
        if job.stage.always:
            always.append(index_of_job[name])
        for variable in job.stage.env:
            env[variable] = os.environ.get(variable, "")
        inputs.add(file_index.setdefault(path, len(file_index)) for path in job.inputs)
        outputs.add(file_index.setdefault(path, len(file_index)) for path in job.outputs)
        successors.add(index_of_job[next_job] for next_job in graph.dependents(name) if next_job in index_of_job)
        holding_sources.extend(path for path in job.outputs if graph.holds_source(path))
        pickled.add(job)
    stats = array("q")
    for path in file_index:
        stats.extend(_trusted_stat(hasher.entries.get(path)))
    job_names, file_paths = "\n".join(order), "\n".join(file_index)
    if job_names.count("\n") != max(len(order) - 1, 0) or file_paths.count("\n") != max(len(file_index) - 1, 0):
        return None  # a name with a newline in it would not split back
    token = os.urandom(8).hex()
    snapshot = {
        "format": FORMAT, "key": key, "token": token, "sources": sources, "folders": folders,
        "env": sorted(env.items()), "generation": generation, "targets": list(shown_targets),
        "jobs": job_names, "file_paths": file_paths, "file_stats": stats.tobytes(),
        "inputs": inputs.dump(), "outputs": outputs.dump(), "successors": successors.dump(),
        "always": always, "unsettled": sorted(index_of_job[name] for name in unsettled if name in index_of_job),
        "holds_source": holding_sources, "pools": dict(graph.pipeline.pools),
        "cache": pipefile_cache,  # the Pipefile's `cache = ...`, for a fast-path build
    }
    return snapshot, [token, pickled.offsets.tobytes(), pickled.buffer.getvalue()]


class _JobPickler:
    """Jobs pickled one after another into one buffer, each a whole pickle of its own (`offsets`
    say where), without what only loading and explaining use: source locations, and the stage's
    declared paths and recipe template. A 10,000-input stage then unpickles in microseconds instead
    of 20 ms, and leaving them out copies nothing."""

    def __init__(self):
        import io
        import pickle  # here: a no-op build needs neither, nor the model's dataclasses

        from .model import Job, Stage

        def emptying(kind, blanks: set[str]):
            """Pickles `kind` (as model.py does: its fields in order) with the `blanks` fields empty."""
            indexes = [index for index, name in enumerate(kind.__dataclass_fields__) if name in blanks]

            def reduce(item):
                fields = list(item.__reduce__()[1])
                for index in indexes:
                    fields[index] = ()
                return kind, tuple(fields)
            return reduce

        reducers = {Job: emptying(Job, {"input_locations"}),
                    Stage: emptying(Stage, {"inputs", "outputs", "recipe", "after"})}

        class Pickler(pickle.Pickler):
            def reducer_override(self, item):
                reduce = reducers.get(type(item))
                return NotImplemented if reduce is None else reduce(item)

        self.buffer = io.BytesIO()
        self.pickler = Pickler(self.buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.offsets = array("q", [0])

    def add(self, job) -> None:
        self.pickler.clear_memo()  # each job's pickle stands alone
        self.pickler.dump(job)
        self.offsets.append(self.buffer.tell())


def refresh(snapshot: dict, paths: list[str], entries: dict, looked_at: set[int], generation: int,
            unsettled: list[int]) -> dict:
    """The same snapshot after a fast-path build: new stats for the files it may have seen change
    (`looked_at`: the changed files and the affected jobs' outputs; one it did not hash stays
    untrusted), and the jobs this build left unsettled."""
    stats = array("q")
    stats.frombytes(snapshot["file_stats"])
    for index in looked_at:
        stats[4 * index:4 * index + 4] = array("q", _trusted_stat(entries.get(paths[index])))
    return {**snapshot, "file_stats": stats.tobytes(), "generation": generation, "unsettled": unsettled}


def _trusted_stat(entry) -> tuple[int, int, int, int]:
    if entry is None or not entry.settled:
        return UNTRUSTED
    return (entry.size, entry.mtime_ns, entry.ino, entry.ctime_ns)


class _Lists:
    """Lists of ints as one flat array plus offsets: compact to save, quick to load."""

    def __init__(self):
        self.flat = array("i")
        self.offsets = array("i", [0])

    def add(self, values) -> None:
        self.flat.extend(values)
        self.offsets.append(len(self.flat))

    def dump(self) -> tuple[bytes, bytes]:
        return self.offsets.tobytes(), self.flat.tobytes()


def load_lists(dumped: tuple[bytes, bytes]) -> tuple[array, array]:
    """(offsets, flat) as saved by `_Lists.dump`: list k is flat[offsets[k]:offsets[k + 1]]."""
    offsets, flat = array("i"), array("i")
    offsets.frombytes(dumped[0])
    flat.frombytes(dumped[1])
    return offsets, flat


def save(state_dir: str, captured: tuple[dict, list | None] | dict | None) -> None:
    """Write the snapshot (with its jobs file when given), or with None remove it; each file is
    written whole or not at all, and the jobs file first, so a snapshot never names missing jobs."""
    path = os.path.join(state_dir, SNAPSHOT_NAME)
    if captured is None:
        _remove(path)
        return
    snapshot, jobs = captured if isinstance(captured, tuple) else (captured, None)
    if jobs is not None:
        _write(os.path.join(state_dir, JOBS_NAME), jobs)
    _write(path, snapshot)


def _write(path: str, value) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        marshal.dump(value, handle)
    os.replace(temporary, path)


def _read(path: str):
    """What `_write` wrote there, or None (missing, truncated, or not ours)."""
    try:
        with open(path, "rb") as handle:
            return marshal.load(handle)
    except (OSError, EOFError, ValueError, TypeError):
        return None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def load(state_dir: str, key: tuple) -> dict | None:
    """The saved snapshot for `key`, or None."""
    snapshot = _read(os.path.join(state_dir, SNAPSHOT_NAME))
    if not isinstance(snapshot, dict) or snapshot.get("format") != FORMAT or snapshot.get("key") != key:
        return None
    return snapshot if _FIELDS <= snapshot.keys() else None


class PickledJobs:
    """The jobs saved with a snapshot, pickled one after another: loading the file copies one
    string, and only the jobs a build needs are cut out of it (`jobs[index]`)."""

    def __init__(self, offsets: bytes, data: bytes):
        self.offsets = array("q")
        self.offsets.frombytes(offsets)
        self.data = memoryview(data)

    def __getitem__(self, index: int) -> memoryview:
        return self.data[self.offsets[index]:self.offsets[index + 1]]


def load_jobs(state_dir: str, snapshot: dict) -> PickledJobs | None:
    """The pickled jobs saved with `snapshot` (None if the file is missing or belongs to another)."""
    saved = _read(os.path.join(state_dir, JOBS_NAME))
    if not isinstance(saved, list) or len(saved) != 3 or saved[0] != snapshot["token"]:
        return None
    return PickledJobs(saved[1], saved[2])


def structure_holds(snapshot: dict) -> bool:
    """Are the sources, listed folders and `env:` values still what the snapshot saw?"""
    for path, expected in snapshot["sources"]:
        if stat_tuple(path) != expected:
            return False
    for path, expected, signature in snapshot["folders"]:
        actual = stat_tuple(path)
        if (actual is None) != (expected is None):
            return False
        # A folder's stat also changes when a recipe rewrites an output in it (delete, create):
        # what globs see is only the names, so the same names still hold.
        if actual is not None and actual[1:] != expected and signature != _current_listing(path):
            return False
    return all(os.environ.get(variable, "") == value for variable, value in snapshot["env"])


def listing_signature(entries) -> str:
    """What globs and patterns see of a folder: its entries' names, and which are folders."""
    import blake3  # only when a folder's stat changed (or for the full path)

    names = sorted(f"{entry.name}\0{int(entry.is_dir(follow_symlinks=False))}" for entry in entries)
    return blake3.blake3("\n".join(names).encode(errors="surrogateescape")).hexdigest()


def _current_listing(path: str) -> str | None:
    try:
        return listing_signature(list(os.scandir(path)))
    except OSError:
        return None


def paths_of(snapshot: dict) -> list[str]:
    """The snapshot's files; the file indices of its other fields point into this list."""
    return snapshot["file_paths"].split("\n") if snapshot["file_paths"] else []


def changed_files(snapshot: dict, paths: list[str]) -> list[int] | None:
    """Indices of the files (`paths_of(snapshot)`) whose stat differs from the snapshot's, missing ones included."""
    stats = array("q")
    stats.frombytes(snapshot["file_stats"])
    if len(stats) != 4 * len(paths):
        return None
    parts = _stat_processes(len(paths))
    if parts == 1:
        return _changed_between(paths, stats, 0, len(paths)).tolist()
    bounds = [len(paths) * part // parts for part in range(parts + 1)]
    return _changed_in_parallel(paths, stats, bounds).tolist()


def _changed_between(paths: list[str], stats: array, start: int, stop: int) -> array:
    """The indices in [start, stop) of files whose stat differs from `stats` (4 values per file)."""
    changed = array("i")
    stat = os.stat
    for index in range(start, stop):
        try:
            st = stat(paths[index])
        except (FileNotFoundError, NotADirectoryError):
            changed.append(index)
            continue
        at = 4 * index
        if (st.st_size != stats[at] or st.st_mtime_ns != stats[at + 1] or st.st_ino != stats[at + 2]
                or st.st_ctime_ns != stats[at + 3]):
            changed.append(index)
    return changed


PARALLEL_STATS = 4096  # files per process below which forking costs more than it saves
_MAX_STAT_PROCESSES = 8


def _stat_processes(files: int) -> int:
    """How many processes share the stats. A stat costs ~2 us, mostly in the kernel's path lookup
    and in building the result object under the GIL, so threads do not help but processes do."""
    if not hasattr(os, "fork") or files < 2 * PARALLEL_STATS:
        return 1
    import threading  # forking a process that runs other threads could leave a child stuck on their locks

    if threading.active_count() > 1:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, files // PARALLEL_STATS, _MAX_STAT_PROCESSES))


def _changed_in_parallel(paths: list[str], stats: array, bounds: list[int]) -> array:
    """`_changed_between` over each [bounds[k], bounds[k + 1]): the first range here, every other
    one in a forked child that sends its indices back through a pipe. A range whose child failed
    (or could not be forked) is done here, so the answer never depends on the children."""
    children = []  # (pid, pipe, start, stop)
    left = []  # ranges no child took
    try:
        for start, stop in zip(bounds[1:-1], bounds[2:]):
            child = _fork_stats(paths, stats, start, stop)
            if child is None:
                left.append((start, stop))
            else:
                children.append((*child, start, stop))
        changed = _changed_between(paths, stats, bounds[0], bounds[1])
        for start, stop in left:
            changed.extend(_changed_between(paths, stats, start, stop))
        for pid, pipe, start, stop in children:
            data = pipe.read()
            if os.waitpid(pid, 0)[1] == 0 and len(data) % changed.itemsize == 0:
                changed.frombytes(data)
            else:
                changed.extend(_changed_between(paths, stats, start, stop))
        return changed
    finally:
        for pid, pipe, _, _ in children:
            pipe.close()  # if interrupted, a child still writing gets EPIPE and ends
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # reaped above
                pass


def _fork_stats(paths: list[str], stats: array, start: int, stop: int):
    """A child computing `_changed_between(paths, stats, start, stop)`: (pid, the pipe its answer
    comes through), or None when no process can be forked."""
    read, write = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read)
        os.close(write)
        return None
    if pid == 0:  # the child: write the answer and leave at once, cleaning up nothing of the parent's
        code = 1
        try:
            os.close(read)
            data = memoryview(_changed_between(paths, stats, start, stop).tobytes())
            while data:
                data = data[os.write(write, data):]
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    return pid, open(read, "rb")


def store_unchanged(state_dir: str, snapshot: dict, remember: bool = True) -> bool:
    """Does the state store still hold the snapshot's generation (no other process recorded a job
    since)? Asking SQLite costs a no-op build more than all its other imports, so once it answered
    yes about settled files, their stats are kept (`noop.store`, unless not to `remember`: -n) and
    vouch for the answer while they hold: the stat cache's rule, applied to the store's own files."""
    path, seen = os.path.join(state_dir, "state.db"), os.path.join(state_dir, STORE_SEEN_NAME)
    taken = time.time_ns()  # before the stats: a write after them changes their mtime
    files = [stat_tuple(path), stat_tuple(path + "-wal")]
    if _read(seen) == [snapshot["token"], files]:
        return True
    if store_generation(path) != snapshot["generation"]:
        return False
    if remember and all(stat is None or taken - stat[1] >= RACY_NS for stat in files):
        _write(seen, [snapshot["token"], files])
    return True


def store_generation(path: str) -> int | None:
    """The store's generation, read-only (another process may hold it open)."""
    import sqlite3  # only once every stat has matched

    if not os.path.exists(path):
        return None
    quiet = "" if os.path.exists(path + "-wal") else "&immutable=1"
    try:
        db = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro{quiet}", uri=True, timeout=30)
        try:
            row = db.execute("SELECT value FROM generation").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None
