"""Watch mode's decisions, apart from watchdog and the clock so they are tested with fake events:
which events are noise, what one build pass depends on (and so which folders to watch), when a
burst of events is over, and what a burst really changed since the last pass."""
from __future__ import annotations

import enum
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .graph import glob_regex

# Folders whose events never matter: version control, offbuild's own state, bytecode caches.
NOISE_DIRS = frozenset({".git", ".hg", ".svn", ".offbuild", "__pycache__"})
# What editors leave beside the file they save: backups (`a.txt~`), vim's swap files and its
# `4913` probe, emacs' locks and autosaves, and the temporary files of kate, gedit, JetBrains IDEs.
_NOISE_NAME = re.compile(r"""(?x)(
      .*~ | \.\#.* | \#.*\# | 4913 | \..*\.sw[a-p] | .*\.kate-swp | .*___jb_(?:tmp|old)___
    | \.goutputstream-.* | \.DS_Store
)\Z""", re.S)


class EventKind(enum.Enum):
    CREATED = "created"
    MODIFIED = "modified"
    DELETED = "deleted"
    LOST = "lost"  # the kernel dropped events: anything may have changed


@dataclass(frozen=True, slots=True)
class FsEvent:
    """One file system event, its path relative to the project root. A move arrives as the
    deletion of its source and the creation of its destination."""

    path: str
    kind: EventKind
    is_dir: bool = False


@dataclass(frozen=True, slots=True)
class Change:
    """What a burst of events did to one path since the last build pass."""

    path: str
    what: str  # changed | added | deleted | lost

    def describe(self) -> str:
        return "events were lost, looking at everything" if self.what == "lost" else f"{self.path} {self.what}"


def is_noise(path: str) -> bool:
    """Editor leftovers, version control, caches and offbuild's own state folder."""
    parts = path.split("/")
    return any(part in NOISE_DIRS for part in parts) or bool(_NOISE_NAME.match(parts[-1]))


def _parent(path: str) -> str:
    return os.path.dirname(path) or "."


def _ancestors(path: str) -> Iterable[str]:
    """`a/b/c` → `a/b`, `a`, `.`."""
    while path not in (".", "", "/"):
        path = _parent(path)
        yield path


def fixed_prefix_dir(pattern: str) -> str:
    """The deepest folder of a glob or pattern that holds no wildcard (`data/in/*.txt` → `data/in`)."""
    wildcard = min((i for i, c in enumerate(pattern) if c in "%*?["), default=len(pattern))
    return os.path.dirname(pattern[:wildcard]) or "."


class WatchSet:
    """What one build pass depends on, and what it writes.

    `files`: the Pipefile, its includes and every source input that is a file; `trees`: source
    inputs that are folders (their whole tree counts); `globs`: the globs and patterns whose
    matches decide inputs and jobs (a pattern's `%` read as `**`); `written`: every output
    offbuild declares or recorded, never a trigger. `digests` is each file's content as the last
    pass saw it (None: known to be missing), so a save that changes nothing is recognised.
    """

    def __init__(self, files: Iterable[str] = (), trees: Iterable[str] = (), globs: Iterable[str] = (),
                 written: Iterable[str] = (), digests: dict[str, str | None] | None = None):
        self.files = frozenset(files)
        self.trees = frozenset(trees)
        self.globs = tuple(sorted(set(globs)))
        self.written = frozenset(written)
        self.digests: dict[str, str | None] = dict(digests or {})
        self._matcher = re.compile("|".join(f"(?:{glob_regex(g).pattern})" for g in self.globs)) if self.globs else None
        # Folders on the way to the sources: deleting (or moving away) one deletes sources.
        self._source_folders = {a for path in (*self.files, *self.trees) for a in _ancestors(path)} | self.trees
        # Folders on the way to what globs read: creating one means new places to watch.
        self._glob_folders = {a for g in self.globs for a in (fixed_prefix_dir(g), *_ancestors(fixed_prefix_dir(g)))}

    def relevant(self, event: FsEvent) -> bool:
        """Could this event change what a build pass does? Outputs and noise never can."""
        if event.kind is EventKind.LOST:
            return True
        path = event.path
        if is_noise(path):
            return False
        if path in self.files or path in self.trees or any(a in self.trees for a in _ancestors(path)):
            return True  # a source, even inside a folder some stage declares as its output
        if self._is_written(path):
            return False
        if event.is_dir:
            return path in self._source_folders or (event.kind is EventKind.CREATED and path in self._glob_folders)
        return bool(self._matcher and self._matcher.match(path))

    def _is_written(self, path: str) -> bool:
        """A declared output, or a file inside a declared output folder."""
        return path in self.written or any(a in self.written for a in _ancestors(path))

    def roots(self, is_dir: Callable[[str], bool]) -> list[tuple[str, bool]]:
        """(folder, recursive) pairs to watch, none inside another recursive one. A folder that
        does not exist yet is watched through its nearest existing ancestor, so its creation is seen."""
        wanted: dict[str, bool] = {}

        def want(folder: str, recursive: bool) -> None:
            while folder not in (".", "") and not is_dir(folder):
                folder, recursive = _parent(folder), False
            folder = folder or "."
            wanted[folder] = wanted.get(folder, False) or recursive

        for path in self.files:
            want(_parent(path), False)
        for tree in self.trees:
            want(tree, True)
        for glob in self.globs:
            prefix = fixed_prefix_dir(glob)
            rest = glob[len(prefix):].lstrip("/") if prefix != "." else glob
            want(prefix, "/" in rest or "**" in rest)
        recursive = {folder for folder, deep in wanted.items() if deep}
        return sorted((folder, deep) for folder, deep in wanted.items()
                      if not any(a in recursive for a in _ancestors(folder)))

    def extended(self, files: Iterable[str]) -> "WatchSet":
        """The same set watching some more files (the file a load error points at, say)."""
        return WatchSet(self.files | set(files), self.trees, self.globs, self.written, self.digests)


def watch_set_for(graph, order: list[str], sources: Iterable[str], recorded_outputs: Iterable[str],
                  is_dir: Callable[[str], bool]) -> WatchSet:
    """What a pass building `order` of `graph` depends on: `sources` (the Pipefile and includes),
    the source inputs of the selected jobs, and the globs and patterns of their stages, plus the
    patterns of stages with no job yet (a first matching file may create one). `recorded_outputs`
    are outputs of earlier builds that are no longer declared: the pass may delete them."""
    files, trees, globs = set(sources), set(), set()
    stages = {}
    for name in order:
        job = graph.jobs[name]
        stages[job.stage.name] = job.stage
        for path in job.inputs:
            if path not in graph.producer:
                (trees if is_dir(path) else files).add(path)
    for stage in graph.pipeline.stages:
        if stage.pattern_input is not None and not graph.jobs_by_stage.get(stage.name):
            stages[stage.name] = stage
    for stage in stages.values():
        for spec in stage.inputs:
            if spec.is_glob or spec.is_pattern:
                globs.add(os.path.normpath(spec.text.replace("%", "**")))
    return WatchSet(files, trees, globs, set(graph.producer) | set(recorded_outputs))


class Debouncer:
    """Gathers events until none has come for `quiet` seconds (or `longest` seconds have passed
    since the first, so a file written without pause cannot hold builds off for ever)."""

    def __init__(self, quiet: float = 0.05, longest: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.quiet = quiet
        self.longest = longest
        self.clock = clock
        self._pending: dict[str, FsEvent] = {}  # the first event of each path, in arrival order
        self._first = self._last = 0.0

    def add(self, event: FsEvent) -> None:
        now = self.clock()
        if not self._pending:
            self._first = now
        self._last = now
        self._pending.setdefault(event.path if event.kind is not EventKind.LOST else "\0lost", event)

    def wait_time(self) -> float | None:
        """Seconds until the burst is over: None when nothing is pending, 0 when it is due."""
        if not self._pending:
            return None
        due = min(self._last + self.quiet, self._first + self.longest)
        return max(0.0, due - self.clock())

    def take(self) -> list[FsEvent]:
        """The burst's events (the first one per path), once it is over; else nothing."""
        if self.wait_time() != 0:
            return []
        events, self._pending = list(self._pending.values()), {}
        return events


FOLDER = "folder"  # what `probe` returns for a directory


def new_folders(events: Iterable[FsEvent], watch: WatchSet) -> list[str]:
    """Relevant folders created in a burst. A folder is no change by itself: it is a new place to
    watch, and the files already in it are to be looked at as if just created."""
    return [e.path for e in events if e.is_dir and e.kind is EventKind.CREATED and watch.relevant(e)]


def settle(events: Iterable[FsEvent], watch: WatchSet, probe: Callable[[str], str | None]) -> list[Change]:
    """What a burst of events amounts to: relevant paths whose content differs from what the last
    pass saw. `probe(path)` is the content hash now (FOLDER for a folder, None when missing).
    Remembers what it reports, so the same content is never reported twice."""
    changes = []
    for event in events:
        if event.kind is EventKind.LOST:
            return [Change("", "lost")]
        if (event.is_dir and event.kind is EventKind.CREATED) or not watch.relevant(event):
            continue
        path, now = event.path, probe(event.path)
        if path in watch.digests:
            before = watch.digests[path]
            if now == before:  # saved unchanged, or replaced by an identical copy
                continue
            what = "added" if before is None else "deleted" if now is None else "changed"
        elif now is None:
            if event.kind is EventKind.CREATED:  # a temporary file that came and went
                continue
            what = "deleted"
        else:
            what = "added" if event.kind is EventKind.CREATED else "changed"
        watch.digests[path] = now
        changes.append(Change(path, what))
    return changes


def header(changes: list[Change], at: float, limit: int = 3, shown: Callable[[str], str] = lambda path: path) -> str:
    """`[14:03:07] data/input/a.txt changed, notes.md added and 2 more`; `shown` names a path for the user."""
    parts = [Change(shown(change.path), change.what).describe() for change in changes[:limit]]
    text = ", ".join(parts)
    if len(changes) > limit:
        text += f" and {len(changes) - limit} more"
    return f"[{time.strftime('%H:%M:%S', time.localtime(at))}] {text}"
