"""The SQLite store under `.offbuild/`: stat cache, last success per job, last decision per job.

Each finished job is saved in its own short transaction, so killing offbuild loses at most the
jobs that were running. WAL mode and a busy timeout let concurrent offbuild processes share it.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field

from .errors import OffbuildError
from .hashing import StatEntry

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ino INTEGER, ctime_ns INTEGER,
    digest TEXT, recorded_ns INTEGER);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    key TEXT,             -- stage key of the last success, NULL if it never succeeded
    recipe TEXT,          -- the expanded recipe of the last success
    inputs TEXT,          -- JSON {path: digest} at the last success
    outputs TEXT,         -- JSON {path: digest} written by the last success
    env TEXT,             -- JSON {name: value} of its env: variables
    options TEXT,         -- JSON of the other key parts (network, checkpoint)
    built_at REAL, duration REAL, run_id TEXT,
    failed INTEGER NOT NULL DEFAULT 0, failed_run TEXT, failed_at REAL);
CREATE TABLE IF NOT EXISTS generation (value INTEGER NOT NULL);  -- bumped by every change to jobs
CREATE TABLE IF NOT EXISTS decisions (
    name TEXT PRIMARY KEY, run_id TEXT, at REAL, action TEXT, reasons TEXT);
"""


@dataclass(slots=True)
class JobRecord:
    """What the store knows about one job. JSON columns are parsed only when asked for."""

    name: str
    key: str | None
    recipe: str | None = None
    inputs_json: str | None = None
    outputs_json: str | None = None
    env_json: str | None = None
    options_json: str | None = None
    built_at: float | None = None
    duration: float | None = None
    run_id: str | None = None
    failed: bool = False
    failed_run: str | None = None
    failed_at: float | None = None
    _outputs: dict | None = field(default=None, repr=False)
    _inputs: dict | None = field(default=None, repr=False)

    @property
    def outputs(self) -> dict[str, str]:
        if self._outputs is None:
            self._outputs = json.loads(self.outputs_json) if self.outputs_json else {}
        return self._outputs

    @property
    def inputs(self) -> dict[str, str]:
        if self._inputs is None:
            self._inputs = json.loads(self.inputs_json) if self.inputs_json else {}
        return self._inputs

    @property
    def env(self) -> dict[str, str]:
        return json.loads(self.env_json) if self.env_json else {}

    @property
    def options(self) -> dict:
        return json.loads(self.options_json) if self.options_json else {}


@dataclass(frozen=True, slots=True)
class Success:
    """Everything saved when a job succeeds."""

    key: str
    recipe: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    env: dict[str, str]
    options: dict
    duration: float
    run_id: str


class StateStore:
    """One SQLite database; `path=":memory:"` gives a throwaway store for tests.

    `readonly` is for commands that must change nothing on disk (`-n`, `--explain`, `--list`...):
    the file is opened read-only, and a project without a store gets an empty one in memory.
    """

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        self.bumps = 0  # generations this connection added: any others were another process's
        try:
            if readonly:
                self.db = self._connect_readonly(path)
            else:
                if path != ":memory:":
                    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
                self._set_up()
        except sqlite3.DatabaseError as error:
            raise OffbuildError(f"cannot open the state database {path}: {error}"
                                " (delete .offbuild/state.db to start afresh)") from None

    def _connect_readonly(self, path: str) -> sqlite3.Connection:
        if os.path.exists(path):
            # Without a live writer (no -wal file) `immutable` keeps SQLite from creating -shm/-wal.
            quiet = "" if os.path.exists(path + "-wal") else "&immutable=1"
            db = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro{quiet}", uri=True, timeout=30,
                                 isolation_level=None, check_same_thread=False)
            row = db.execute("SELECT version FROM schema").fetchone() if _has_schema(db) else None
            if row and row[0] == SCHEMA_VERSION:
                return db
            db.close()
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        return db

    def _set_up(self) -> None:
        """WAL mode and the schema. Switching to WAL can report "locked" at once, without waiting,
        while another process creates the same database: retry for a while before giving up."""
        deadline = time.monotonic() + 30
        delay = 0.01
        while True:
            try:
                if self.db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) and "busy" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _migrate(self) -> None:
        if _has_schema(self.db) and self.db.execute("SELECT version FROM schema").fetchone() == (SCHEMA_VERSION,):
            return  # current: the tables were made with the version row, in one transaction
        with self.transaction():
            self.db.execute("CREATE TABLE IF NOT EXISTS schema (version INTEGER NOT NULL)")
            row = self.db.execute("SELECT version FROM schema").fetchone()
            if row and row[0] > SCHEMA_VERSION:
                raise OffbuildError(f"{self.path} was written by a newer offbuild (schema {row[0]})")
            if row and row[0] < SCHEMA_VERSION:  # older layouts hold only caches: start afresh
                for table in ("files", "jobs", "decisions", "generation"):
                    self.db.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in _SCHEMA.split(";"):  # executescript would commit mid-transaction
                if statement.strip():
                    self.db.execute(statement)
            if not row or row[0] != SCHEMA_VERSION:
                self.db.execute("DELETE FROM schema")
                self.db.execute("INSERT INTO schema VALUES (?)", (SCHEMA_VERSION,))
                self.db.execute("DELETE FROM generation")
                self.db.execute("INSERT INTO generation VALUES (0)")

    def transaction(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    # -- reads: whole tables at once, a no-op build does one query per table

    def load_stat_cache(self) -> dict[str, StatEntry]:
        rows = self.db.execute("SELECT path, size, mtime_ns, ino, ctime_ns, digest, recorded_ns FROM files")
        return {row[0]: StatEntry(*row[1:]) for row in rows}

    def load_jobs(self) -> dict[str, JobRecord]:
        return {row[0]: _job_record(row) for row in self.db.execute(_SELECT_JOBS)}

    def generation(self) -> int:
        """A counter bumped by every change to the jobs table: equal counters, same job records."""
        row = self.db.execute("SELECT value FROM generation").fetchone()
        return row[0] if row else 0

    def _bump_generation(self) -> None:
        self.db.execute("UPDATE generation SET value = value + 1")
        self.bumps += 1

    def load_stat_entries(self, paths: list[str]) -> dict[str, StatEntry]:
        """The stat cache entries of just these paths (a fast-path build needs few of them)."""
        rows = self._rows_where_in("SELECT path, size, mtime_ns, ino, ctime_ns, digest, recorded_ns FROM files"
                                   " WHERE path", paths)
        return {row[0]: StatEntry(*row[1:]) for row in rows}

    def load_digests(self, paths: list[str]) -> dict[str, str]:
        """Just the recorded digests of these paths (cheaper than whole entries)."""
        return dict(self._rows_where_in("SELECT path, digest FROM files WHERE path", paths))

    def load_jobs_named(self, names: list[str]) -> dict[str, JobRecord]:
        """The records of just these jobs."""
        return {row[0]: _job_record(row) for row in self._rows_where_in(f"{_SELECT_JOBS} WHERE name", names)}

    def _rows_where_in(self, query: str, values: list[str]):
        """The rows of `query IN (values)`, asked in batches SQLite's parameter limit allows."""
        for start in range(0, len(values), _BATCH):
            batch = values[start:start + _BATCH]
            yield from self.db.execute(f"{query} IN ({','.join('?' * len(batch))})", batch)

    def load_job(self, name: str) -> JobRecord | None:
        """One job's record as it is now (another offbuild process may just have written it)."""
        row = self.db.execute(f"{_SELECT_JOBS} WHERE name = ?", (name,)).fetchone()
        return _job_record(row) if row else None

    def load_decisions(self) -> dict[str, dict]:
        rows = self.db.execute("SELECT name, run_id, at, action, reasons FROM decisions")
        return {row[0]: {"run_id": row[1], "at": row[2], "action": row[3], "reasons": json.loads(row[4])}
                for row in rows}

    # -- writes

    def record_success(self, name: str, success: Success, stat_entries: dict[str, StatEntry]) -> None:
        """Save one finished job, and with it the stat entries taken since the last save, atomically."""
        with self.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO jobs (name, key, recipe, inputs, outputs, env, options, built_at,"
                " duration, run_id, failed) VALUES (?,?,?,?,?,?,?,?,?,?,0)",
                (name, success.key, success.recipe, json.dumps(success.inputs), json.dumps(success.outputs),
                 json.dumps(success.env), json.dumps(success.options, sort_keys=True), time.time(),
                 success.duration, success.run_id))
            if stat_entries:
                self._save_stat_entries(stat_entries)
            self._bump_generation()

    def record_failure(self, name: str, run_id: str) -> None:
        """Mark a job failed; its last success stays for explanations but no longer counts."""
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO jobs (name, key) VALUES (?, NULL)", (name,))
            self.db.execute("UPDATE jobs SET failed = 1, failed_run = ?, failed_at = ? WHERE name = ?",
                            (run_id, time.time(), name))
            self._bump_generation()

    def record_decisions(self, run_id: str, decisions: list[tuple[str, str, list]]) -> None:
        """The last decision (action and reasons) per job, for `--explain`."""
        now = time.time()
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO decisions VALUES (?,?,?,?,?)",
                                [(name, run_id, now, action, json.dumps(reasons)) for name, action, reasons in decisions])

    def save_stat_entries(self, entries: dict[str, StatEntry]) -> None:
        if entries:
            with self.transaction():
                self._save_stat_entries(entries)

    def _save_stat_entries(self, entries: dict[str, StatEntry]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?)",
                            [(path, e.size, e.mtime_ns, e.ino, e.ctime_ns, e.digest, e.recorded_ns)
                             for path, e in entries.items()])

    def forget_jobs(self, names: list[str]) -> None:
        with self.transaction():
            self.db.executemany("DELETE FROM jobs WHERE name = ?", [(name,) for name in names])
            self.db.executemany("DELETE FROM decisions WHERE name = ?", [(name,) for name in names])
            self._bump_generation()


_BATCH = 500  # bound parameters per query, well under SQLite's limit
_SELECT_JOBS = ("SELECT name, key, recipe, inputs, outputs, env, options, built_at, duration, run_id, failed,"
                " failed_run, failed_at FROM jobs")


def _job_record(row) -> JobRecord:
    return JobRecord(*row[:10], bool(row[10]), row[11], row[12])


def _has_schema(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema'").fetchone() is not None


class _Transaction:
    """`BEGIN IMMEDIATE` … `COMMIT`, rolled back on error: writers queue instead of deadlocking."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
