"""Shared fixtures: a temp project in which the real `offbuild` command runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


class Project:
    """A temporary project folder with helpers to write files and run offbuild in it."""

    def __init__(self, root: Path):
        self.root = root

    def write(self, relative: str, text: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text) if "\n" in text else text)
        return path

    def read(self, relative: str) -> str:
        return (self.root / relative).read_text()

    def exists(self, relative: str) -> bool:
        return (self.root / relative).exists()

    def pipefile(self, text: str) -> Path:
        return self.write("Pipefile", text)

    def run(self, *args: str, check: int | None = None, env: dict | None = None, timeout: float = 60,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run `offbuild ARGS` here; `check` asserts the exit code."""
        full_env = {**os.environ, **(env or {})}
        result = subprocess.run([sys.executable, "-m", "offbuild", *args], cwd=cwd or self.root, env=full_env,
                                capture_output=True, text=True, timeout=timeout)
        if check is not None:
            assert result.returncode == check, (
                f"exit {result.returncode} != {check}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def build(self, *args: str, **kwargs) -> dict:
        """Run a build that must succeed; return its run record."""
        self.run(*args, check=kwargs.pop("check", 0), **kwargs)
        return self.last_record()

    def last_record(self) -> dict:
        # Any pipeline file's: `-f other` keeps its state in .offbuild/pipefiles/other/.
        runs = sorted((self.root / ".offbuild").glob("**/runs/*.json"), key=lambda p: p.stat().st_mtime_ns)
        return json.loads(runs[-1].read_text())

    def ran(self, record: dict | None = None) -> set[str]:
        """Jobs that ran (or resumed) in a run record."""
        record = record or self.last_record()
        return {job["stage"] for job in record["jobs"] if job["action"] in ("ran", "resumed")}


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie is dead for our purposes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)
