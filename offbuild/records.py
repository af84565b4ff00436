"""Run records: `.offbuild/runs/<run-id>.json`, written atomically, newest 200 kept."""
from __future__ import annotations

import json
import os
import re
import time

KEEP_RECORDS = 200
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + os.urandom(3).hex()


def write_atomically(path: str, text: str) -> None:
    """Write to a temporary file and rename it over `path`: readers never see half a file."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_run_record(state_dir: str, record: dict) -> str:
    """Save one run's record and prune the oldest beyond `KEEP_RECORDS`."""
    runs = os.path.join(state_dir, "runs")
    os.makedirs(runs, exist_ok=True)
    path = os.path.join(runs, f"{record['run_id']}.json")
    # Compact: the C encoder is ~10x faster than the indenting one on a 100k-job record.
    write_atomically(path, json.dumps(record, separators=(",", ":")) + "\n")
    entries = [entry for entry in os.scandir(runs) if entry.name.endswith(".json")]
    if len(entries) > KEEP_RECORDS:
        entries.sort(key=lambda entry: entry.stat().st_mtime_ns)
        for entry in entries[:len(entries) - KEEP_RECORDS]:
            os.unlink(entry.path)
    return path


def iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}"
