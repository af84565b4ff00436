"""The demo pipeline in the repository root, exactly as a new user runs it."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

from conftest import REPO


def copy_demo(project):
    shutil.copy(REPO / "Pipefile", project.root / "Pipefile")
    shutil.copytree(REPO / "rules", project.root / "rules", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data" / "input", project.root / "data" / "input")


def test_demo_builds_then_skips_everything(project):
    copy_demo(project)
    record = project.build()
    assert record["counts"]["failed"] == 0 and record["counts"]["ran"] == record["counts"]["total"] >= 4
    assert project.read("data/output/result.txt") == project.read("data/input/sample.txt").upper()
    report = project.read("data/output/report.txt")
    assert "chapters/one.txt" in report and "THE PIPELINE" in report
    assert project.ran(project.build()) == set()


def test_demo_edit_reruns_only_the_affected_chain(project):
    copy_demo(project)
    project.build()
    with open(project.root / "data/input/chapters/one.txt", "a") as handle:
        handle.write("One more line.\n")
    assert project.ran(project.build()) == {"count[one]", "report"}


def test_demo_upper_resumes_after_sigkill_byte_identical(project):
    copy_demo(project)
    process = subprocess.Popen([sys.executable, "-m", "offbuild", "upper"], cwd=project.root,
                               env={**__import__("os").environ, "UPPER_DELAY": "0.15"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = project.root / ".offbuild/checkpoints/upper.ckpt"
    deadline = time.time() + 20
    while time.time() < deadline and not (checkpoint.exists() and '"lines": 2' in checkpoint.read_text()):
        time.sleep(0.02)
    process.kill()
    process.communicate(timeout=10)
    partial = project.read("data/output/result.txt")
    expected = project.read("data/input/sample.txt").upper()
    assert 0 < len(partial) < len(expected), "killed half way"
    record = project.build("upper")
    assert record["counts"]["resumed"] == 1
    assert "resuming at line" in project.read(".offbuild/logs/upper.log")
    assert project.read("data/output/result.txt") == expected
