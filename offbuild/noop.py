"""The no-op fast path: prove "nothing to do" without parsing the Pipefile or building the graph.

After a build that found everything up to date, offbuild saves a snapshot of everything that
decision rested on: the stat of each Pipefile source, of each folder globs and patterns listed,
of each input and output (the very stats its content hashes were vouched by), the `env:` values,
and the state store's generation. The next build with the same targets and overrides stats
those paths; if all match, nothing can have changed, so it writes the run record and stops:
one `stat` per file, as SPEC section 2 promises. Any difference falls back to the full path.

Every stat in a snapshot must be "settled" (taken at least RACY_NS after the path's mtime), so a
same-tick rewrite can never hide behind an identical stat. This module imports nothing heavy.
"""
from __future__ import annotations

import marshal
import os
import time
from array import array

SNAPSHOT_FORMAT = 2
SNAPSHOT_NAME = "noop.snapshot"
RACY_NS = 2_000_000_000  # the same rule as hashing.RACY_NS; kept here so this module stays light


def snapshot_key(pipefile: str, targets: list[str], overrides: dict[str, str], cwd_offset: str) -> tuple:
    return (os.path.abspath(pipefile), tuple(targets), tuple(sorted(overrides.items())), cwd_offset)


def _stat_tuple(path: str):
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def build_snapshot(key: tuple, project, order: list[str], shown_targets: list[str]) -> dict | None:
    """The snapshot after an all-up-to-date build, or None when its proof would not be sound."""
    graph, hasher = project.graph, project.hasher
    start_generation = project.start_generation
    if hasher.unstable or hasher.saw_directory or project.store.generation() != start_generation:
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
        folders.append((path, None if info is None else info[:3]))
    files, env, seen = [], {}, set()
    for name in order:
        job = graph.jobs[name]
        if job.stage.always:
            return None
        for variable in job.stage.env:
            env[variable] = os.environ.get(variable, "")
        for path in job.inputs + job.outputs:
            if path in seen:
                continue
            seen.add(path)
            entry = hasher.entries.get(path)
            if entry is None or entry.recorded_ns - entry.mtime_ns < RACY_NS:
                return None
            files.append((path, (entry.size, entry.mtime_ns, entry.ino, entry.ctime_ns)))
    # Paths as one string and stats as one int array: a 100k-file snapshot loads in milliseconds.
    return {"format": SNAPSHOT_FORMAT, "key": key, "sources": sources, "folders": folders,
            "file_paths": "\n".join(path for path, _ in files),
            "file_stats": array("q", [number for _, stat in files for number in stat]).tobytes(),
            "env": sorted(env.items()), "generation": start_generation, "jobs": "\n".join(order),
            "targets": list(shown_targets)}


def save_snapshot(state_dir: str, snapshot: dict | None) -> None:
    """Write (or, with None, remove) the snapshot; written whole or not at all."""
    path = os.path.join(state_dir, SNAPSHOT_NAME)
    if snapshot is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        marshal.dump(snapshot, handle)
    os.replace(temporary, path)


def still_up_to_date(state_dir: str, key: tuple) -> list[str] | None:
    """The snapshot, if it still holds for `key` (cwd = project root), else None."""
    try:
        with open(os.path.join(state_dir, SNAPSHOT_NAME), "rb") as handle:
            snapshot = marshal.load(handle)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if not isinstance(snapshot, dict) or snapshot.get("format") != SNAPSHOT_FORMAT or snapshot["key"] != key:
        return None
    for path, expected in snapshot["sources"]:
        if _stat_tuple(path) != expected:
            return None
    stats = array("q")
    stats.frombytes(snapshot["file_stats"])
    paths = snapshot["file_paths"].split("\n") if snapshot["file_paths"] else []
    if len(stats) != 4 * len(paths):
        return None
    stat = os.stat
    for index, path in enumerate(paths):
        try:
            st = stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        at = 4 * index
        if (st.st_size != stats[at] or st.st_mtime_ns != stats[at + 1] or st.st_ino != stats[at + 2]
                or st.st_ctime_ns != stats[at + 3]):
            return None
    for path, expected in snapshot["folders"]:
        actual = _stat_tuple(path)
        if (actual is None) != (expected is None) or (actual is not None and actual[1:] != expected):
            return None
    for variable, value in snapshot["env"]:
        if os.environ.get(variable, "") != value:
            return None
    if _store_generation(os.path.join(state_dir, "state.db")) != snapshot["generation"]:
        return None
    return snapshot


def _store_generation(path: str) -> int | None:
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


def fast_noop(args, targets: list[str], overrides: dict[str, str]) -> int | None:
    """Exit code 0 after recording an all-skipped run, if the snapshot proves it; else None."""
    plain_build = not (args.explain or args.watch or args.list or args.graph or args.clean or args.lint
                       or args.dry_run or args.force or args.cache_prune) and args.verbose <= args.quiet
    if not plain_build or not os.path.isfile(args.file):
        return None
    started_wall, started = time.time(), time.monotonic()
    root = os.path.dirname(os.path.abspath(args.file))
    key = snapshot_key(args.file, targets, overrides, os.path.relpath(os.getcwd(), root))
    here = os.getcwd()
    os.chdir(root)
    snapshot = still_up_to_date(".offbuild", key)
    if snapshot is None:
        os.chdir(here)
        return None
    from .records import iso, new_run_id, write_run_record
    from .reporter import summary_line

    jobs = snapshot["jobs"].split("\n") if snapshot["jobs"] else []
    counts = {"total": len(jobs), "ran": 0, "skipped": len(jobs), "failed": 0, "resumed": 0, "restored": 0,
              "blocked": 0}
    record = {"run_id": args.run_id or new_run_id(), "started": iso(started_wall), "ended": iso(time.time()),
              "status": "ok", "targets": snapshot["targets"], "offline": {"mode": args.offline, "isolated": None},
              "counts": counts, "hashed": {"files": 0, "bytes": 0}, "jobs": [], "skipped": jobs,
              "fast_path": True}
    write_run_record(".offbuild", record)
    import json
    import sys

    print(summary_line(counts, time.monotonic() - started, "done"), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(record, indent=2))
    return 0
