"""Progress and output: live rich display under a pseudo-terminal, one line per job without one,
-q / -v, the summary line, and rich staying off the path of builds without a terminal."""
from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import subprocess
import sys
import termios

import pytest

from offbuild.live import LiveReporter
from offbuild.reporter import PlainReporter, make_reporter

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SUMMARY = re.compile(r"offbuild: (\w+): (\d+) ran, (\d+) skipped, (\d+) failed(?:, \d+ \w+)* in \d+\.\d\ds$", re.M)

PIPELINE = """
stage first:
    in:  src.txt
    out: work/first.txt
    run: sleep 0.3; tr a-z A-Z < $in > $out; echo first says hi

stage second:
    in:  work/first.txt
    out: out/second.txt
    run: cat $in $in > $out
"""

BROKEN = """
stage bad:
    out: bad.txt
    run: echo something went wrong; exit 4
"""


def run_in_terminal(project, *args: str) -> tuple[int, str]:
    """Run offbuild with a pseudo-terminal as stdin, stdout and stderr; return exit code and output."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "offbuild", *args], cwd=project.root, env=env,
                               stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return process.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


# -- under a terminal


def test_live_progress_on_a_terminal(project):
    project.pipefile(PIPELINE)
    project.write("src.txt", "hello\n")
    code, raw = run_in_terminal(project)
    assert code == 0
    assert "\x1b[" in raw, "a terminal gets colours and cursor movement"
    text = ANSI.sub("", raw)
    assert "0/2 done" in text and "1 running" in text and "▸ first" in text
    assert "ETA ?" in text, "nothing was ever timed"
    assert "✓ ran first in" in text and "first says hi" in text
    assert "2/2 done" in text
    assert SUMMARY.search(text.replace("\r", "")).groups() == ("done", "2", "0", "0")
    # The second time, recorded durations give an ETA and each running job's usual time.
    code, raw = run_in_terminal(project, "-B")
    text = ANSI.sub("", raw)
    assert re.search(r"ETA \d+:\d\d", text) and re.search(r"▸ first +\d+:\d\d / ~\d+:\d\d", text)


def test_terminal_failure_shows_the_log_in_one_block(project):
    project.pipefile(BROKEN)
    code, raw = run_in_terminal(project)
    assert code == 1
    text = ANSI.sub("", raw).replace("\r", "")
    assert re.search(r"✗ failed bad in \d+\.\d\ds \(exit code 4; .*log: \.offbuild/logs/bad\.log\)\n"
                     r"something went wrong\n", text)
    assert SUMMARY.search(text).groups() == ("failed", "0", "0", "1")


def test_quiet_on_a_terminal_prints_only_the_summary(project):
    project.pipefile(PIPELINE)
    project.write("src.txt", "hello\n")
    code, raw = run_in_terminal(project, "-q")
    assert code == 0
    assert raw.replace("\r", "").splitlines() == [SUMMARY.search(raw.replace("\r", "")).group(0)]


# -- without a terminal


def test_plain_lines_without_a_terminal(project):
    project.pipefile(PIPELINE)
    project.write("src.txt", "hello\n")
    result = project.run(check=0)
    assert not ANSI.search(result.stdout)
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"\[1/2\] ran first in \d+\.\d\ds", lines[0])
    assert lines[1] == "first says hi"
    assert re.fullmatch(r"\[2/2\] ran second in \d+\.\d\ds", lines[2])
    assert SUMMARY.fullmatch(lines[3]).groups() == ("done", "2", "0", "0")
    assert len(lines) == 4


def test_quiet_prints_failures_and_summary_and_verbose_each_command(project):
    project.pipefile(PIPELINE + BROKEN)
    project.write("src.txt", "hello\n")
    result = project.run("-q", "-k", check=1)
    lines = result.stdout.splitlines()
    assert "first says hi" not in result.stdout and "ran first" not in result.stdout
    assert re.fullmatch(r"\[\d/3\] failed bad in \d+\.\d\ds \(exit code 4; .*log: \.offbuild/logs/bad\.log\)",
                        lines[0])
    assert lines[1:] == ["something went wrong", SUMMARY.search(result.stdout).group(0)]
    result = project.run("-v", "-k", check=1)
    assert "[start] bad: echo something went wrong; exit 4" in result.stdout
    assert re.search(r"\[\d/3\] skipped first", result.stdout)


def test_rich_is_not_imported_without_a_terminal(project):
    project.pipefile(PIPELINE)
    project.write("src.txt", "hello\n")
    project.build()
    script = ("import sys\nfrom offbuild.cli import main\ncode = main([])\n"
              "sys.stderr.write(f'{code} ' + str(any(name.split('.')[0] == 'rich' for name in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], cwd=project.root, capture_output=True, text=True,
                            timeout=60)
    assert result.stderr.strip() == "0 False"
    assert SUMMARY.search(result.stdout).groups() == ("done", "0", "2", "0")


# -- units


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def live():
    clock = Clock()
    stream = io.StringIO()
    reporter = LiveReporter(5, 0, stream, parallel=2, estimates={"a": 10.0, "b": 20.0, "c": None}, clock=clock)
    yield reporter, clock, stream
    reporter._stop()


def test_eta_spreads_recorded_durations_over_parallel_slots(live):
    reporter, clock, _ = live
    assert reporter.eta(clock()) == pytest.approx((10 + 20 + 15) / 2)  # c, never timed, counts as average
    reporter.job_started("a", "true")
    clock.now += 4
    assert reporter.eta(clock()) == pytest.approx((6 + 20 + 15) / 2)
    reporter.job_finished("a", "ran", 4.0, "")
    reporter.job_finished("c", "skipped", 0.0, "")  # early cutoff: no longer expected
    assert reporter.eta(clock()) == pytest.approx(20.0)
    reporter.job_finished("b", "ran", 1.0, "")
    assert reporter.eta(clock()) == 0.0


def test_live_reporter_prints_blocks_and_the_plain_summary(live):
    reporter, clock, stream = live
    reporter.job_started("a", "echo hi")
    clock.now += 2
    reporter.job_finished("a", "ran", 2.0, "hi\n")
    reporter.job_finished("c", "failed", 0.5, "boom\n", "exit code 1; log: .offbuild/logs/c.log")
    reporter.summary({"ran": 1, "skipped": 0, "failed": 1}, 2.5, "failed")
    text = ANSI.sub("", stream.getvalue()).replace("\r", "")
    assert "✓ ran a in 2.00s\nhi\n" in text
    assert "✗ failed c in 0.50s (exit code 1; log: .offbuild/logs/c.log)\nboom\n" in text
    assert text.endswith("offbuild: failed: 1 ran, 0 skipped, 1 failed in 2.50s\n")


def test_make_reporter_picks_plain_for_pipes_and_quiet(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    assert isinstance(make_reporter(3, 0, io.StringIO()), PlainReporter)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(make_reporter(3, -1, Terminal()), PlainReporter)
    reporter = make_reporter(3, 0, Terminal(), estimates=lambda: {"x": 1.0})
    try:
        assert isinstance(reporter, LiveReporter) and reporter.expected == {"x": 1.0}
    finally:
        reporter._stop()
