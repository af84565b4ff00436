"""`offbuild --watch`: build the targets, then rebuild what each change affects, until Ctrl-C.

The only module that imports watchdog. What an event means (noise, relevance, debouncing, what
changed) is decided in watchlogic.py; this module feeds it the observer's events and runs the
build passes. Each pass re-opens the project, so a Pipefile edit or a new file matching a
pattern is seen, and runs an ordinary build, which skips every job whose inputs are unchanged.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .errors import LoadError, OffbuildError, UsageError
from .executor import Executor
from .graph import normalize
from .hashing import hash_file_contents
from .model import Pipeline
from .records import new_run_id
from .session import Project, open_project
from .watchlogic import (FOLDER, Debouncer, EventKind, FsEvent, WatchSet, header, new_folders, settle,
                         watch_set_for)

# A save by rename or temporary file is a burst of events within a millisecond or two; 50 ms of
# quiet covers it (and `git checkout`), and keeps a save's rebuild well within a blink.
QUIET_SECONDS = 0.05
LONGEST_SECONDS = 1.0
EXIT_INTERRUPTED = 130

BuildPass = Callable[..., int]  # commands.build
MakeExecutor = Callable[..., Executor]  # commands.make_executor


def watch(args, targets: list[str], overrides: dict[str, str], build: BuildPass, make_executor: MakeExecutor) -> int:
    """Build, then build again after each settled burst of relevant changes. Runs until Ctrl-C
    (exit code 130); a failing job or a Pipefile error is reported and watching goes on."""
    if args.dry_run:
        raise UsageError("--watch and -n cannot be combined")
    session = _Session(args, targets, overrides, build, make_executor)
    try:
        return session.run()
    finally:
        session.close()


class _Inbox(FileSystemEventHandler):
    """Receives the observer's events on its thread; keeps the relevant ones for the debouncer."""

    def __init__(self, root: str, debouncer: Debouncer):
        self.root = root
        self.debouncer = debouncer
        self.watch_set = WatchSet()  # replaced at each pass; read on the observer's thread
        self.arrived = threading.Condition()

    def on_any_event(self, event: FileSystemEvent) -> None:
        for fs_event in self._translate(event):
            if fs_event.kind is EventKind.LOST or self.watch_set.relevant(fs_event):
                with self.arrived:
                    self.debouncer.add(fs_event)
                    self.arrived.notify()

    def _translate(self, event: FileSystemEvent) -> list[FsEvent]:
        kind, is_dir = event.event_type, event.is_directory
        if kind == "moved":
            return [FsEvent(self._relative(event.src_path), EventKind.DELETED, is_dir),
                    FsEvent(self._relative(event.dest_path), EventKind.CREATED, is_dir)]
        if kind == "created":
            return [FsEvent(self._relative(event.src_path), EventKind.CREATED, is_dir)]
        if kind == "deleted":
            return [FsEvent(self._relative(event.src_path), EventKind.DELETED, is_dir)]
        if kind in ("modified", "closed") and not is_dir:  # a folder's own "modified" says nothing new
            return [FsEvent(self._relative(event.src_path), EventKind.MODIFIED)]
        if kind == "events_lost":
            return [FsEvent("", EventKind.LOST)]
        return []  # opened, closed without writing, attributes (touch): content unchanged

    def _relative(self, path) -> str:
        return normalize(os.path.relpath(os.fsdecode(path), self.root))

    def next_burst(self) -> list[FsEvent]:
        """Wait until a burst of events has settled and return it; Ctrl-C interrupts the wait."""
        with self.arrived:
            while True:
                delay = self.debouncer.wait_time()
                if delay == 0:
                    return self.debouncer.take()
                self.arrived.wait(0.5 if delay is None else delay)


class _Session:
    """The state carried from one build pass to the next."""

    def __init__(self, args, targets: list[str], overrides: dict[str, str], build: BuildPass,
                 make_executor: MakeExecutor):
        self.args = args
        self.targets = targets
        self.overrides = overrides
        self.build = build
        self.make_executor = make_executor
        self.verbosity = args.verbose - args.quiet
        self.pipefile = os.path.abspath(args.file)
        self.root = os.path.dirname(self.pipefile)
        # Path targets are relative to where the user stood; every pass resolves them the same way.
        self.cwd_offset = os.path.relpath(os.getcwd(), self.root)
        self.shown_from = getattr(args, "invocation_dir", None) or os.getcwd()
        self.passes = 0
        self.executor: Executor | None = None  # kept across passes: its spawner (or Dask client) starts once
        self.last_pipeline: Pipeline | None = None  # reused while its files are unchanged
        self.sources = [self.pipefile]  # the Pipefile and includes of the last load that worked
        self.inbox = _Inbox(self.root, Debouncer(QUIET_SECONDS, LONGEST_SECONDS))
        self.observer = Observer()
        self.watches: dict[tuple[str, bool], object] = {}

    def run(self) -> int:
        if not os.path.isfile(self.args.file):
            open_project(self.args.file, self.overrides, self.shown_from)  # the usual "no pipeline file" error
        os.chdir(self.root)  # where every pass finds its paths, even when a load fails
        self.observer.start()
        if self._pass(first=True) == EXIT_INTERRUPTED:
            return EXIT_INTERRUPTED
        files, folders = len(self.inbox.watch_set.files), len(self.watches)
        self._say(f"offbuild: watching {files} file{'s' * (files != 1)} in {folders} folder{'s' * (folders != 1)}"
                  " for changes (Ctrl-C to stop)")
        while True:
            events = self.inbox.next_burst()
            folders = new_folders(events, self.inbox.watch_set)
            if folders:
                self._adopt(self.inbox.watch_set)  # watch inside them from now on, then look at what is there
                events += [event for folder in folders for event in _files_in(folder)]
            changes = settle(events, self.inbox.watch_set, _probe)
            if not changes:
                continue
            self._say(header(changes, time.time(), shown=self._shown))
            if self._pass() == EXIT_INTERRUPTED:
                return EXIT_INTERRUPTED

    def close(self) -> None:
        self.observer.stop()
        if self.observer.is_alive():
            self.observer.join(timeout=2)
        if self.executor is not None:
            self.executor.close()

    def _pass(self, first: bool = False) -> int | None:
        """Load the project afresh and build; None when it could not be loaded."""
        before = {self._relative(path): _probe(path) for path in self.sources}  # before reading them
        try:
            project = open_project(self._pipefile_argument(), self.overrides, self.shown_from,
                                   previous=self.last_pipeline)
            self.last_pipeline = project.pipeline
        except OffbuildError as error:
            if first and not isinstance(error, LoadError):
                raise  # no pipeline file, a bad command line: nothing to watch
            self._report(error)
            return None
        try:
            project.cwd_offset = self.cwd_offset
            order = project.graph.select(project.targets(self.targets))
            self.sources = list(project.pipeline.sources) or [self.pipefile]
            recorded = [path for record in project.records.values() for path in record.outputs]
            watch_set = watch_set_for(project.graph, order, map(self._relative, self.sources), recorded, os.path.isdir)
            self._adopt(watch_set)
            project.graph.check_inputs_exist(order)
            code = self._build(project, order)
            self._remember(project, watch_set, before)
            return code
        except OffbuildError as error:
            if first and not isinstance(error, LoadError):
                raise
            self._report(error)
            return None
        finally:
            project.store.close()

    def _build(self, project: Project, order: list[str]) -> int:
        self.passes += 1
        first, args = self.passes == 1, self.args
        if not first and args.force:  # -B forces the first build, not every one after it
            args = _with(args, force=False)
        run_id = args.run_id and (args.run_id if first else f"{args.run_id}.{self.passes}")
        run_id = run_id or new_run_id()
        if self.executor is None:
            self.executor = self.make_executor(args, run_id)
        return self.build(project, order, args, self.targets, self.verbosity, run_id=run_id, executor=self.executor)

    def _remember(self, project: Project, watch_set: WatchSet, before: dict[str, str | None]) -> None:
        """Each watched file's content as this pass's decisions saw it; a file the pass did not
        look at stays unknown, so any event on it leads to a pass."""
        seen = project.hasher.first_digest
        for path in watch_set.files:
            if path in seen:
                watch_set.digests[path] = seen[path]
        if watch_set.trees:
            for path, digest in seen.items():
                if watch_set.relevant(FsEvent(path, EventKind.MODIFIED)) and path not in watch_set.files:
                    watch_set.digests[path] = digest
        for path, digest in before.items():
            if path in watch_set.files:
                watch_set.digests[path] = digest

    def _adopt(self, watch_set: WatchSet) -> None:
        """Watch the folders `watch_set` needs (new ones first, so nothing falls between) and
        judge events by it from now on."""
        wanted = {(os.path.join(self.root, folder) if folder != "." else self.root, recursive)
                  for folder, recursive in watch_set.roots(os.path.isdir)}
        for key in wanted - self.watches.keys():
            try:
                self.watches[key] = self.observer.schedule(self.inbox, key[0], recursive=key[1])
            except OSError as error:  # vanished meanwhile, or the inotify limit reached
                self._say(f"offbuild: warning: cannot watch '{key[0]}': {error.strerror or error}", err=True)
        self.inbox.watch_set = watch_set
        for key in self.watches.keys() - wanted:
            try:
                self.observer.unschedule(self.watches.pop(key))
            except (KeyError, OSError):
                pass

    def _report(self, error: OffbuildError) -> None:
        """Print a load error and keep watching what the last good load named, plus the file at fault."""
        self._say(f"offbuild: {error.render()}", err=True)
        extra = [self._relative(error.location.path)] if error.location and error.location.path else []
        self._adopt(self.inbox.watch_set.extended([*map(self._relative, self.sources), *extra]))
        self._say("offbuild: nothing built; watching for a fix", err=True)

    def _pipefile_argument(self) -> str:
        """The Pipefile named as the user named it (absolute or not), from the project root."""
        return self.args.file if os.path.isabs(self.args.file) else os.path.relpath(self.pipefile)

    def _shown(self, path: str) -> str:
        """A project path as the user names it, from where offbuild was started."""
        return os.path.relpath(os.path.join(self.root, path), self.shown_from)

    def _relative(self, path: str) -> str:
        return normalize(os.path.relpath(path, self.root))

    def _say(self, text: str, err: bool = False) -> None:
        stream = sys.stderr if err else sys.stdout
        stream.write(text + "\n")
        stream.flush()


def _with(args, **changes):
    copy = type(args)(**vars(args))
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy


def _files_in(folder: str) -> list[FsEvent]:
    """Every file under a new folder, as creation events."""
    return [FsEvent(normalize(os.path.join(parent, name)), EventKind.CREATED)
            for parent, _, names in os.walk(folder) for name in names]


def _probe(path: str) -> str | None:
    """A file's content hash now, FOLDER for a folder, None when it does not exist."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if os.path.isdir(path):
        return FOLDER
    try:
        return hash_file_contents(path, st.st_size)
    except (FileNotFoundError, IsADirectoryError):
        return None
