"""The no-op fast path (noop.py): it may only say "up to date" when a full build would."""
from __future__ import annotations

import os
import time

PIPEFILE = """
stage shout:
    in:  in/%.txt
    out: work/%.shout
    run: tr a-z A-Z < $in > $out
stage all:
    in:  work/*.shout
    out: all.txt
    env: SEPARATOR
    run: cat $in > $out; echo "$$SEPARATOR" >> $out
"""


def settle(project, seconds=10):
    """Backdate every file and folder so their stats are trusted (SPEC's racy-timestamp rule)."""
    past = time.time() - seconds
    for folder, dirs, files in os.walk(project.root):
        dirs[:] = [d for d in dirs if d != ".offbuild"]
        for name in files:
            os.utime(os.path.join(folder, name), (past, past))
        os.utime(folder, (past, past))


def settled_project(project):
    project.pipefile(PIPEFILE)
    project.write("in/a.txt", "a\n")
    project.write("in/b.txt", "b\n")
    project.build()
    settle(project)
    record = project.build()  # re-learns the backdated stats, then saves the snapshot
    assert not record.get("fast_path") and project.ran(record) == set()
    record = project.build()
    assert record.get("fast_path") is True and project.ran(record) == set()
    assert record["counts"]["skipped"] == 3 and sorted(record["skipped"]) == ["all", "shout[a]", "shout[b]"]


def test_settled_noop_takes_the_fast_path(project):
    settled_project(project)


def test_same_size_same_mtime_edit_defeats_the_fast_path(project):
    settled_project(project)
    path = project.root / "in/a.txt"
    st = os.stat(path)
    path.write_text("z\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    record = project.build()
    assert project.ran(record) == {"shout[a]", "all"}
    assert project.read("all.txt").startswith("B\nZ\n") or project.read("all.txt").startswith("Z\nB\n")


def test_new_file_in_a_pattern_folder_defeats_the_fast_path(project):
    settled_project(project)
    project.write("in/c.txt", "c\n")
    assert project.ran(project.build()) == {"shout[c]", "all"}


def test_pipefile_edit_env_change_and_other_targets_defeat_the_fast_path(project):
    settled_project(project)
    assert project.ran(project.build(env={"SEPARATOR": "--"})) == {"all"}
    settle(project)
    project.build(env={"SEPARATOR": "--"})
    assert project.build(env={"SEPARATOR": "--"}).get("fast_path")
    assert not project.build("shout[a]", env={"SEPARATOR": "--"}).get("fast_path")
    project.pipefile(PIPEFILE.replace("tr a-z A-Z", "tr a-z A-Z "))
    assert project.ran(project.build(env={"SEPARATOR": "--"})) == {"shout[a]", "shout[b]"}


def test_a_failure_recorded_elsewhere_defeats_the_fast_path(project):
    project.pipefile("""
        stage check:
            in: code.txt
            run: test "$$MODE" != bad
    """)
    project.write("code.txt", "x\n")
    project.build()
    settle(project)
    project.build()
    assert project.build().get("fast_path")
    project.run("-B", env={"MODE": "bad"}, check=1)  # same files, but the store now says "failed"
    record = project.build()
    assert not record.get("fast_path") and project.ran(record) == {"check"}


def test_deleted_output_defeats_the_fast_path(project):
    settled_project(project)
    (project.root / "all.txt").unlink()
    assert project.ran(project.build()) == {"all"}
