"""End-to-end: the real `offbuild --watch` in a temp project, driven by edits as a user makes them."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

TWO_CHAINS = """
stage a:
    in:  data/a.txt
    out: work/a.up
    run: tr a-z A-Z < $in > $out

stage a2:
    in:  work/a.up
    out: out/a.twice
    run: cat $in $in > $out

stage b:
    in:  data/b.txt
    out: work/b.up
    run: tr a-z A-Z < $in > $out

stage b2:
    in:  work/b.up
    out: out/b.twice
    run: cat $in $in > $out
"""

SUMMARY = re.compile(r"^offbuild: (done|failed|interrupted): ")
RAN = re.compile(r"^\[\d+/\d+\] (ran|failed) (\S+)")


class Watcher:
    """`offbuild --watch` as a subprocess whose merged output is read line by line as it comes."""

    def __init__(self, project, *args: str):
        self.project = project
        self.process = subprocess.Popen([sys.executable, "-m", "offbuild", "--watch", "-j2", *args],
                                        cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []  # everything so far, for failure messages
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next(self, deadline: float) -> str | None:
        """The next line, or None at the deadline or when the process has closed its output."""
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is not None:
            self.output.append(line)
        return line

    def until(self, pattern: str, timeout: float = 5.0) -> list[str]:
        """Lines up to and including the first that matches `pattern` (a regex)."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            line = self._next(deadline)
            if line is None:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n"
                                     + "\n".join(self.output))
            got.append(line)
            if re.search(pattern, line):
                return got

    def next_pass(self, timeout: float = 5.0) -> tuple[list[str], set[str]]:
        """The lines of the next build pass, through its summary, and the jobs it ran or failed."""
        lines = self.until(SUMMARY.pattern, timeout)
        return lines, {match.group(2) for match in map(RAN.match, lines) if match}

    def silent_for(self, seconds: float) -> list[str]:
        """What it printed in the next `seconds` (a pass would print a header and a summary)."""
        deadline = time.monotonic() + seconds
        got = []
        while (line := self._next(deadline)) is not None:
            got.append(line)
        return got

    def started(self) -> tuple[list[str], set[str]]:
        """The first build's lines and jobs, once it watches."""
        lines = self.until(r"^offbuild: watching ")
        return lines, {match.group(2) for match in map(RAN.match, lines) if match}

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)


@pytest.fixture
def watcher(project):
    """Start `offbuild --watch ARGS` once the test has written its project; always killed."""
    started: list[Watcher] = []

    def start(*args: str) -> Watcher:
        started.append(Watcher(project, *args))
        return started[-1]

    yield start
    for each in started:
        each.kill()


def gone(pid: int, timeout: float = 2.0) -> bool:
    """The process has exited (a zombie waiting to be reaped counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def two_chains(project):
    project.pipefile(TWO_CHAINS)
    project.write("data/a.txt", "apple\n")
    project.write("data/b.txt", "banana\n")


def test_an_edit_rebuilds_only_its_chain(project, watcher):
    two_chains(project)
    watch = watcher()
    _, first = watch.started()
    assert first == {"a", "a2", "b", "b2"}
    project.write("data/a.txt", "apricot\n")
    lines, ran = watch.next_pass()
    assert re.match(r"^\[\d\d:\d\d:\d\d\] data/a\.txt changed$", lines[0]), lines
    assert ran == {"a", "a2"}
    assert project.read("out/a.twice") == "APRICOT\nAPRICOT\n"
    assert project.ran() == {"a", "a2"}  # each pass writes its run record, as any build does


def test_same_content_saves_outputs_and_noise_trigger_nothing(project, watcher):
    two_chains(project)
    watch = watcher()
    watch.started()
    project.write("data/a.txt", "apple\n")  # saved unchanged
    project.write("work/a.up", "hand edit\n")  # offbuild's own outputs
    project.write("out/b.twice", "x\n")
    project.write(".offbuild/notes", "x\n")
    for noise in ("data/.a.txt.swp", "data/a.txt~", "data/.#a.txt", "data/4913", ".git/index",
                  "data/__pycache__/m.pyc"):
        project.write(noise, "x\n")
    os.utime(project.root / "data/b.txt")  # touch
    assert watch.silent_for(0.6) == []
    project.write("data/b.txt", "blueberry\n")  # still watching
    _, ran = watch.next_pass()
    # This pass also repairs the hand-edited output, as any build would; `a2` then sees the
    # same `work/a.up` again and skips (early cutoff).
    assert ran == {"a", "b", "b2"}


def test_new_file_matching_a_pattern_adds_one_job_and_deleting_it_drops_it(project, watcher):
    project.pipefile("""
        stage shout:
            in:  notes/%.txt
            out: loud/%.txt
            run: tr a-z A-Z < $in > $out

        stage index:
            in:  loud/*.txt
            out: index.txt
            run: cat $in > $out
        """)
    project.write("notes/a.txt", "a\n")
    watch = watcher()
    _, first = watch.started()
    assert first == {"shout[a]", "index"}
    project.write("notes/b.txt", "b\n")
    lines, ran = watch.next_pass()
    assert "notes/b.txt added" in lines[0]
    assert ran == {"shout[b]", "index"}
    assert project.read("index.txt") == "A\nB\n"
    os.unlink(project.root / "notes/a.txt")
    lines, ran = watch.next_pass()
    assert "notes/a.txt deleted" in lines[0]
    assert ran == {"index"}
    assert not project.exists("loud/a.txt")  # the vanished job's output went with it
    assert project.read("index.txt") == "B\n"
    assert watch.silent_for(0.4) == []  # deleting that output started no pass of its own


def test_editor_style_saves(project, watcher):
    two_chains(project)
    watch = watcher()
    watch.started()
    # Write a temporary file, then rename it over the original (atomic replace).
    temporary = project.write("data/.a.txt.tmp-1234", "avocado\n")
    os.replace(temporary, project.root / "data/a.txt")
    lines, ran = watch.next_pass()
    assert lines[0].endswith("data/a.txt changed"), lines
    assert ran == {"a", "a2"}
    assert project.read("out/a.twice") == "AVOCADO\nAVOCADO\n"
    # vim's way: probe file, original renamed to a backup, new file written, backup removed.
    project.write("data/4913", "")
    os.unlink(project.root / "data/4913")
    os.rename(project.root / "data/b.txt", project.root / "data/b.txt~")
    project.write("data/b.txt", "bilberry\n")
    os.unlink(project.root / "data/b.txt~")
    lines, ran = watch.next_pass()
    assert lines[0].endswith("data/b.txt changed"), lines
    assert ran == {"b", "b2"}
    assert watch.silent_for(0.4) == []  # one save, one pass


def test_pipefile_edits_reload_and_errors_keep_watching(project, watcher):
    two_chains(project)
    watch = watcher()
    watch.started()
    project.pipefile(TWO_CHAINS.replace("cat $in $in > $out", "cat $in > $out", 1))  # a2's recipe
    lines, ran = watch.next_pass()
    assert "Pipefile changed" in lines[0]
    assert ran == {"a2"}
    project.pipefile(TWO_CHAINS.replace("out: out/b.twice", "ouput: out/b.twice"))
    lines = watch.until(r"watching for a fix")
    text = "\n".join(lines)
    assert re.search(r"^Pipefile:\d+:\d+: error: unknown field 'ouput' \(did you mean 'out'\?\)", text.replace(
        "offbuild: ", ""), re.M), text
    assert "^" in text  # the caret under the column
    project.write("data/a.txt", "acerola\n")  # the Pipefile is still broken: nothing builds
    assert "error: unknown field 'ouput'" in "\n".join(watch.until(r"watching for a fix"))
    project.pipefile(TWO_CHAINS)  # fixed: a2's recipe is back, a's input changed meanwhile
    lines, ran = watch.next_pass()
    assert ran == {"a", "a2"}
    assert project.read("out/a.twice") == "ACEROLA\nACEROLA\n"


def test_a_failing_job_is_reported_and_watching_continues(project, watcher):
    project.pipefile("""
        stage check:
            in:  data/a.txt
            out: out/a.ok
            run: grep -q good $in && cp $in $out
        """)
    project.write("data/a.txt", "good\n")
    watch = watcher()
    watch.started()
    project.write("data/a.txt", "bad\n")
    lines, ran = watch.next_pass()
    assert ran == {"check"}
    assert lines[-1].startswith("offbuild: failed: ")
    assert any("failed check" in line for line in lines)
    assert watch.process.poll() is None
    project.write("data/a.txt", "good again\n")
    lines, ran = watch.next_pass()
    assert lines[-1].startswith("offbuild: done: 1 ran")
    assert project.read("out/a.ok") == "good again\n"


def test_a_change_during_a_build_gets_one_more_pass(project, watcher):
    project.pipefile("""
        stage slow:
            in:  data/a.txt
            out: out/a.txt
            run: sleep 0.6; cp $in $out
        """)
    project.write("data/a.txt", "one\n")
    watch = watcher()
    watch.started()
    project.write("data/a.txt", "two\n")
    watch.until(r"data/a\.txt changed")
    time.sleep(0.3)  # the recipe is running
    project.write("data/a.txt", "three\n")
    _, ran = watch.next_pass()  # the build in progress finishes...
    assert ran == {"slow"}
    lines, ran = watch.next_pass()  # ...then one more pass covers the change
    assert "data/a.txt changed" in lines[0] and ran == {"slow"}
    assert project.read("out/a.txt") == "three\n"
    assert watch.silent_for(0.4) == []


def test_sigint_stops_the_running_recipe_and_exits_130(project, watcher):
    project.pipefile("""
        stage slow:
            in:  data/a.txt
            out: out/a.txt
            run: echo $$$$ > pid.txt; sleep 30; cp $in $out
        """)
    project.write("data/a.txt", "one\n")
    watch = watcher()
    deadline = time.monotonic() + 5
    while not (project.exists("pid.txt") and project.read("pid.txt").strip()):
        assert time.monotonic() < deadline, "the recipe never started"
        time.sleep(0.02)
    pid = int(project.read("pid.txt"))
    sent = time.monotonic()
    watch.process.send_signal(signal.SIGINT)
    assert watch.process.wait(timeout=5) == 130
    assert time.monotonic() - sent < 3
    assert "interrupted" in "\n".join(watch.silent_for(0.2) + watch.output)
    assert gone(pid)


def test_sigint_while_waiting_exits_130(project, watcher):
    two_chains(project)
    watch = watcher()
    watch.started()
    watch.process.send_signal(signal.SIGINT)
    assert watch.process.wait(timeout=3) == 130


def test_a_plain_build_never_imports_watchdog(project):
    two_chains(project)
    project.build()
    probe = ("import sys; from offbuild.cli import main; code = main(sys.argv[1:]);"
             " print('watchdog' in sys.modules, code)")
    for args in ([], ["-n"]):  # a no-op build (the fast path or not), and a dry run
        result = subprocess.run([sys.executable, "-c", probe, *args], cwd=project.root, capture_output=True,
                                text=True, timeout=60)
        assert result.stdout.split()[-2:] == ["False", "0"], result.stdout + result.stderr


def test_watch_refuses_dry_run(project):
    two_chains(project)
    result = project.run("--watch", "-n", check=2)
    assert "--watch and -n cannot be combined" in result.stderr


def test_observer_events_become_project_relative_fs_events(tmp_path):
    from watchdog import events
    from watchdog.events import (DirCreatedEvent, DirModifiedEvent, FileClosedEvent, FileCreatedEvent,
                                 FileModifiedEvent, FileMovedEvent)

    from offbuild.watch import _Inbox
    from offbuild.watchlogic import Debouncer, EventKind, FsEvent

    inbox = _Inbox(str(tmp_path), Debouncer())
    at = lambda path: str(tmp_path / path)  # noqa: E731
    assert inbox._translate(FileMovedEvent(at("d/.a.tmp"), at("d/a.txt"))) == [
        FsEvent("d/.a.tmp", EventKind.DELETED), FsEvent("d/a.txt", EventKind.CREATED)]
    assert inbox._translate(FileCreatedEvent(at("x"))) == [FsEvent("x", EventKind.CREATED)]
    assert inbox._translate(FileModifiedEvent(at("d/a.txt"))) == [FsEvent("d/a.txt", EventKind.MODIFIED)]
    assert inbox._translate(FileClosedEvent(at("d/a.txt"))) == [FsEvent("d/a.txt", EventKind.MODIFIED)]
    assert inbox._translate(DirCreatedEvent(at("d/sub"))) == [FsEvent("d/sub", EventKind.CREATED, True)]
    # Reading a file, listing a folder or touching a file changes no content (older watchdogs lack some).
    quiet = [getattr(events, name) for name in ("FileOpenedEvent", "FileClosedNoWriteEvent", "FileAttribEvent")
             if hasattr(events, name)]
    for event in [cls(at("d/a.txt")) for cls in quiet] + [DirModifiedEvent(at("d"))]:
        assert inbox._translate(event) == []
