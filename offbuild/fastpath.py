"""The fast path: a plain build that needs neither the Pipefile's parse nor the whole graph.

When the last build's snapshot (snapshot.py) still holds, offbuild stats the files it lists. No
change: the build is a no-op, recorded without importing lark or networkx. Some files changed:
only the jobs that read or make them, and the jobs downstream, are loaded (unpickled from the
snapshot) and handed to the ordinary scheduler (run.build); every other job is up to date by the
snapshot's proof. Anything structural, or anything the fast path cannot decide exactly like the
full path (a missing source, which is a load error there), falls back to the full path.
"""
from __future__ import annotations

import os
import time
from bisect import bisect_right

from . import snapshot, state_dir_for


def fast_build(args, targets: list[str], overrides: dict[str, str]) -> int | None:
    """The build's exit code if the snapshot let it take the fast path, else None (cwd unchanged)."""
    plain_build = not (args.explain or args.watch or args.list or args.graph or args.clean or args.lint
                       or args.force or args.cache_prune) and args.verbose <= args.quiet
    if not plain_build or not os.path.isfile(args.file):
        return None
    started_wall, started = time.time(), time.monotonic()
    here = os.getcwd()
    root = os.path.dirname(os.path.abspath(args.file))
    key = snapshot.snapshot_key(args.file, targets, overrides, os.path.relpath(here, root))
    os.chdir(root)
    exit_code = _fast_build(args, key, state_dir_for(args.file), started_wall, started)
    if exit_code is None:
        os.chdir(here)
    return exit_code


def _fast_build(args, key: tuple, state_dir: str, started_wall: float, started: float) -> int | None:
    saved = snapshot.load(state_dir, key)
    if saved is None or not snapshot.structure_holds(saved):
        return None
    paths = snapshot.paths_of(saved)
    changed = snapshot.changed_files(saved, paths)
    if changed is None:
        return None
    if not snapshot.store_unchanged(state_dir, saved, remember=not args.dry_run):
        return None
    if not changed and not saved["always"] and not saved["unsettled"]:
        if args.dry_run:
            print(f"offbuild: dry run: 0 would run, {len(saved['jobs'].splitlines())} up to date")
            return 0
        return _record_noop(args, saved, state_dir, started_wall, started)
    return _build_changes(args, saved, state_dir, paths, changed)


def _record_noop(args, saved: dict, state_dir: str, started_wall: float, started: float) -> int:
    from .records import iso, new_run_id, write_run_record
    from .reporter import summary_line

    jobs = saved["jobs"].split("\n")
    counts = {"total": len(jobs), "ran": 0, "skipped": len(jobs), "failed": 0, "resumed": 0, "restored": 0,
              "blocked": 0}
    record = {"run_id": args.run_id or new_run_id(), "started": iso(started_wall), "ended": iso(time.time()),
              "status": "ok", "targets": saved["targets"], "offline": {"mode": args.offline, "isolated": None},
              "counts": counts, "hashed": {"files": 0, "bytes": 0}, "jobs": [], "skipped": jobs,
              "fast_path": "noop"}
    write_run_record(state_dir, record)
    import json
    import sys

    print(summary_line(counts, time.monotonic() - started, "done"), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(record, indent=2))
    return 0


class _Links:
    """The snapshot's per-job lists: input files, output files, dependent jobs (by index)."""

    def __init__(self, saved: dict, paths: list[str]):
        self.order = saved["jobs"].split("\n")
        self.paths = paths
        self.in_offsets, self.in_flat = snapshot.load_lists(saved["inputs"])
        self.out_offsets, self.out_flat = snapshot.load_lists(saved["outputs"])
        self.next_offsets, self.next_flat = snapshot.load_lists(saved["successors"])

    def inputs(self, job: int):
        return self.in_flat[self.in_offsets[job]:self.in_offsets[job + 1]]

    def outputs(self, job: int):
        return self.out_flat[self.out_offsets[job]:self.out_offsets[job + 1]]

    def dependents(self, job: int):
        return self.next_flat[self.next_offsets[job]:self.next_offsets[job + 1]]

    def affected_by(self, changed: set[int], undecided: list[int]) -> set[int]:
        """Jobs reading or making a changed file, the `undecided` ones (`always`, or left failed or
        blocked), and everything downstream of them (decided again; early cutoff may still skip it)."""
        affected = set(undecided)
        for offsets, flat in ((self.in_offsets, self.in_flat), (self.out_offsets, self.out_flat)):
            # One pass over the flat list finds where the changed files are; the offsets say whose.
            for position in [position for position, file in enumerate(flat) if file in changed]:
                affected.add(bisect_right(offsets, position) - 1)
        pending = list(affected)
        while pending:
            for after in self.dependents(pending.pop()):
                if after not in affected:
                    affected.add(after)
                    pending.append(after)
        return affected


def _build_changes(args, saved: dict, state_dir: str, paths: list[str], changed: list[int]) -> int | None:
    """Decide (and unless -n, run) the jobs the changed files affect; None to fall back to the full path."""
    links = _Links(saved, paths)
    changed_set = set(changed)
    made = set(links.out_flat)
    if any(index not in made and snapshot.stat_tuple(links.paths[index]) is None for index in changed):
        return None  # a source is gone: the full path reports it as a load error, with its location
    affected = links.affected_by(changed_set, saved["always"] + saved["unsettled"])
    blobs = snapshot.load_jobs(state_dir, saved)
    if blobs is None:
        return None
    from . import run  # not yet the scheduler's modules (run.build loads them)
    from .executor import LocalExecutor

    executor = None
    if not args.dry_run:
        executor = run.make_executor(args, "")
        # A recipe will likely run: start the spawner (~40 ms) now, so it starts while the scheduler's
        # modules, the store and the jobs load, instead of holding up the first recipe.
        if isinstance(executor, LocalExecutor):
            executor.warm_up()
    store = None
    try:
        import pickle

        from .state import StateStore

        store = StateStore(os.path.join(state_dir, "state.db"), readonly=args.dry_run)
        start_generation = store.generation()
        if start_generation != saved["generation"]:  # another process wrote since the check
            return None
        changed_paths = {links.paths[index] for index in changed}
        try:
            project = _ChangedPart.load(saved, sorted(affected), links, blobs, store, changed_paths,
                                        state_dir, readonly=args.dry_run)
        except (pickle.UnpicklingError, AttributeError, ImportError, EOFError, IndexError):
            return None  # jobs pickled by another version of offbuild: the full path rebuilds them
        done = tuple(name for index, name in enumerate(links.order) if index not in affected)
        if args.dry_run:
            return run.show_dry_run(project, project.order, force=False, presumed_done=len(done))

        def capture(unsettled: set[str]):
            if store.generation() != start_generation + store.bumps or project.hasher.unstable:
                return None
            outputs = changed_set.union(*(links.outputs(job) for job in affected))
            verified = project.hasher.verified  # still verified: unchanged, not rewritten by a recipe
            looked_at = {index for index in outputs if links.paths[index] not in verified}
            left = sorted(index for index in affected if links.order[index] in unsettled)
            return snapshot.refresh(saved, paths, project.hasher.entries, looked_at, store.generation(), left)

        estimates = {name: record.duration for name, record in project.records.items()}
        return run.build(project, project.order, args, saved["targets"], args.verbose - args.quiet,
                         estimates=lambda: estimates, capture=capture, presumed_done=done,
                         executor=executor, fast_path=True,
                         cache_at=None if args.no_cache else args.user_cache or saved["cache"])
    finally:
        if store is not None:
            store.close()
        if executor is not None:
            executor.close()


class _ChangedPart:
    """What run.build needs of a project, for just the affected jobs: their jobs, edges among
    them, their records and stat cache entries. Acts as the graph too (Builder's interface)."""

    def __init__(self, order, jobs, dependents, dependencies, pools, holding_sources, store, records, hasher,
                 state_dir: str):
        self.state_dir = state_dir
        self.order = order
        self.jobs = jobs
        self._dependents = dependents
        self._dependencies = dependencies
        self.pools = pools
        self._holding_sources = holding_sources
        self.store = store
        self.records = records
        self.hasher = hasher
        self.graph = self

    @classmethod
    def load(cls, saved: dict, affected: list[int], links: _Links, blobs: snapshot.PickledJobs, store,
             changed_paths: set[str], state_dir: str, readonly: bool) -> _ChangedPart:
        import pickle

        from .hashing import FileHasher, fine_timestamps_device

        names = [links.order[index] for index in affected]
        jobs = {name: pickle.loads(blobs[index]) for name, index in zip(names, affected)}
        dependents = {name: [links.order[after] for after in links.dependents(index)]
                      for name, index in zip(names, affected)}
        dependencies: dict[str, list[str]] = {name: [] for name in names}
        for name, after in dependents.items():
            for dependent in after:
                dependencies[dependent].append(name)  # every dependent of an affected job is affected
        paths = {path for job in jobs.values() for path in job.inputs + job.outputs}
        hasher = FileHasher(store.load_stat_entries([path for path in paths if path in changed_paths]),
                            fine_device=None if readonly else fine_timestamps_device(state_dir))
        # Every other file's stat matched the snapshot's, which was its entry's: its digest holds.
        # A job that was up to date then recorded exactly those digests: take them from its record.
        records = store.load_jobs_named(names)
        unsettled = {links.order[index] for index in saved["unsettled"]}
        verified: dict[str, str] = {}
        for name, job in jobs.items():
            record = records.get(name)
            if record is not None and record.key is not None and not record.failed and name not in unsettled:
                verified.update(record.inputs)
                verified.update(record.outputs)
        for path in changed_paths:
            verified.pop(path, None)
        verified = {path: digest for path, digest in verified.items() if path in paths}
        verified.update(store.load_digests([path for path in paths if path not in changed_paths
                                            and path not in verified]))
        hasher.verified = verified
        return cls(names, jobs, dependents, dependencies, saved["pools"], set(saved["holds_source"]), store,
                   records, hasher, state_dir)

    def dependencies(self, name: str) -> list[str]:
        return self._dependencies[name]

    def dependents(self, name: str) -> list[str]:
        return self._dependents[name]

    def holds_source(self, path: str) -> bool:
        return path in self._holding_sources
