"""Failing examples found by the property and fuzz tests (issue 6), shrunk to plain tests.

Each `xfail(strict=True)` one is an open bug: when the fix lands the test passes, strict xfail
turns that into a failure, and the marker comes off.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from offbuild.errors import LoadError
from offbuild.parser import load_pipefile


def offbuild(root: Path, *args: str, timeout: float = 60, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offbuild", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def assert_located_error(result: subprocess.CompletedProcess, prefix: str = "offbuild: Pipefile:") -> None:
    """Exit 2 with `FILE:LINE:COL: error:` first, and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stderr.startswith(prefix), result.stderr[:500]


def test_a_very_deep_include_chain_is_a_located_error_not_a_traceback(tmp_path):
    depth = 600
    (tmp_path / "Pipefile").write_text("include inc0.pipe\n")
    for level in range(depth):
        (tmp_path / f"inc{level}.pipe").write_text(f"include inc{level + 1}.pipe\n")
    (tmp_path / f"inc{depth}.pipe").write_text("stage a:\n    run: true\n")
    result = offbuild(tmp_path, "-n")
    # Today: exit 1 and "RecursionError: maximum recursion depth exceeded". Either loading it or a
    # located "includes nested too deeply" error would do; a traceback is a bug.
    assert "Traceback" not in result.stderr, result.stderr[-500:]
    assert result.returncode in (0, 2)
    if result.returncode == 2:
        assert result.stderr.startswith("offbuild: inc"), result.stderr[:300]


def _limit_memory():
    limit = 2 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_exponential_variable_expansion_is_a_located_error(tmp_path):
    lines = ["X0 = ab"] + [f"X{n} = $X{n - 1}$X{n - 1}" for n in range(1, 41)]
    (tmp_path / "Pipefile").write_text("\n".join(lines) + "\nstage a:\n    run: echo $X40\n")
    # Under a 2 GiB address-space limit, so the unfixed version fails with MemoryError instead of
    # taking the machine's memory.
    result = offbuild(tmp_path, "-n", preexec_fn=_limit_memory)
    assert_located_error(result)


@pytest.mark.parametrize("glob", ["a" * 300 + "/*.txt", "loop/*.txt"])
def test_a_glob_under_a_folder_that_cannot_be_listed_is_not_a_traceback(tmp_path, glob):
    os.symlink("loop", tmp_path / "loop")  # a symlink to itself: ELOOP; 300 characters: ENAMETOOLONG
    (tmp_path / "Pipefile").write_text(f"stage a:\n    in: {glob}\n    out: out.txt\n    run: cat $in > $out\n")
    result = offbuild(tmp_path, "-n")
    # A glob may match nothing (SPEC section 1), so "0 would run"... "1 would run" or a located
    # error are both fine; "OSError: [Errno 36] File name too long" with a traceback is not.
    assert "Traceback" not in result.stderr, result.stderr[-500:]
    assert result.returncode in (0, 2)


def test_a_line_with_120000_inputs_loads_without_hanging(tmp_path):
    words = " ".join(f"data/i{n}.txt" for n in range(120_000))
    (tmp_path / "Pipefile").write_text(f"stage a:\n    in: {words}\n    out: o\n    run: cat $in > $out\n")
    # Linear work takes about a second; today it takes ~15 s (and 1,000,000 words would take hours).
    try:
        result = offbuild(tmp_path, "-n", timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail("offbuild -n still loading a 1.7 MB `in:` line after 8 s")
    assert_located_error(result)  # the first input does not exist
    assert "input 'data/i0.txt'" in result.stderr


def test_bad_utf8_column_after_a_byte_order_mark(tmp_path):
    path = tmp_path / "Pipefile"
    path.write_bytes(b"\xef\xbb\xbfab\xffc = 1\n")
    with pytest.raises(LoadError) as caught:
        load_pipefile(str(path), "Pipefile", {})
    # Columns count what an editor shows; every other error on that line (lark's) skips the mark.
    assert (caught.value.location.line, caught.value.location.column) == (1, 3)
    assert caught.value.render().splitlines()[1:] == ["ab\ufffdc = 1", "  ^"]


def test_deeply_nested_json_is_a_located_error_not_a_traceback(tmp_path):
    depth = 100_000
    (tmp_path / "pipeline.json").write_text('{"stages": ' + "[" * depth + "]" * depth + "}")
    result = offbuild(tmp_path, "-f", "pipeline.json", "-n")
    assert_located_error(result, "offbuild: pipeline.json:1:")


def test_a_file_deleted_between_stat_and_read_counts_as_missing(tmp_path, monkeypatch):
    """Found by test_properties in mode "two": one offbuild deleted out/s3.txt to rerun its job while
    the other was comparing that output with its record; the second exited 1 with a traceback."""
    from offbuild import hashing

    path = tmp_path / "out.txt"
    path.write_text("built\n")
    real_stat = os.stat

    def stat_then_lose_the_file(name, *args, **kwargs):
        result = real_stat(name, *args, **kwargs)
        if str(name) == str(path):
            path.unlink()  # the other process, right after our stat
        return result

    monkeypatch.setattr(hashing.os, "stat", stat_then_lose_the_file)
    assert hashing.FileHasher({}).digest(str(path)) is None
