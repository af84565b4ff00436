"""The fast path (snapshot.py, fastpath.py): it may only skip or run what a full build would."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Project
from offbuild.hashing import fine_timestamps_device

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


def build_settled(project):
    """Build, settle, build again: the saved snapshot trusts every stat."""
    project.build()
    settle(project)
    project.build()


def settled_project(project):
    project.pipefile(PIPEFILE)
    project.write("in/a.txt", "a\n")
    project.write("in/b.txt", "b\n")
    project.build()
    settle(project)
    record = project.build()  # re-learns the backdated stats, then saves the snapshot
    assert not record.get("fast_path") and project.ran(record) == set()
    record = project.build()
    assert record.get("fast_path") == "noop" and project.ran(record) == set()
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
    build_settled(project)
    assert project.build().get("fast_path")
    project.run("-B", "check", env={"MODE": "bad"}, check=1)  # other targets: the store now says "failed"
    record = project.build()
    assert not record.get("fast_path") and project.ran(record) == {"check"}


def test_deleted_output_defeats_the_fast_path(project):
    settled_project(project)
    (project.root / "all.txt").unlink()
    assert project.ran(project.build()) == {"all"}


# -- builds with changes: only the affected jobs are loaded and decided


def test_an_edited_input_reruns_only_its_jobs_on_the_fast_path(project):
    settled_project(project)
    project.write("in/a.txt", "aa\n")
    record = project.build()
    assert record.get("fast_path") == "changes"
    assert project.ran(record) == {"shout[a]", "all"}
    assert record["counts"]["total"] == 3 and record["counts"]["skipped"] == 1 and record["skipped"] == ["shout[b]"]
    assert sorted(project.read("all.txt").split()) == ["AA", "B"]


def test_early_cutoff_on_the_fast_path(project):
    project.pipefile("""
        stage first:
            in: src.txt
            out: first.txt
            run: head -c 1 $in > $out
        stage second:
            in: first.txt
            out: second.txt
            run: cat $in $in > $out
    """)
    project.write("src.txt", "abc\n")
    build_settled(project)
    project.write("src.txt", "axyz\n")  # same first byte: `first` rewrites the same output
    record = project.build()
    assert record.get("fast_path") == "changes"
    assert project.ran(record) == {"first"} and project.read("second.txt") == "aa"


def test_deleted_or_hand_edited_outputs_rerun_their_job_on_the_fast_path(project):
    settled_project(project)
    (project.root / "work/b.shout").write_text("tampered\n")
    record = project.build()
    assert record.get("fast_path") == "changes" and project.ran(record) == {"shout[b]"}
    assert project.read("work/b.shout") == "B\n"


def test_a_deleted_source_is_still_a_load_error(project):
    project.pipefile("""
        stage copy:
            in: keep/src.txt
            out: copy.txt
            run: cp $in $out
    """)
    project.write("keep/src.txt", "x\n")
    project.write("keep/other.txt", "so the folder is not empty\n")
    build_settled(project)
    (project.root / "keep/src.txt").unlink()
    result = project.run(check=2)
    assert "keep/src.txt" in result.stderr and "Pipefile:3" in result.stderr


def test_after_a_failure_the_fix_takes_the_fast_path_and_reruns_the_failed_job(project):
    project.pipefile("""
        stage check:
            in: code.txt
            out: checked.txt
            run: grep -q good $in && cp $in $out
        stage other:
            in: other.txt
            out: other.out
            run: cp $in $out
    """)
    project.write("code.txt", "good\n")
    project.write("other.txt", "x\n")
    build_settled(project)
    project.write("code.txt", "bad\n")
    project.run(check=1)
    assert not project.exists("checked.txt")
    record = project.last_record()
    assert record.get("fast_path") == "changes" and record["counts"]["failed"] == 1
    project.run(check=1)  # nothing changed: the failed job is decided (and fails) again, not skipped
    project.write("code.txt", "good again\n")
    record = project.build()
    assert record.get("fast_path") == "changes" and project.ran(record) == {"check"}
    assert project.read("checked.txt") == "good again\n"
    # Its fresh output is re-hashed once, unless the file system stamps finely (never racy).
    fine = fine_timestamps_device(str(project.root)) is not None
    assert project.build().get("fast_path") == ("noop" if fine else "changes")
    settle(project)
    project.build()
    assert project.build().get("fast_path") == "noop"


def test_a_failure_on_the_full_path_leaves_a_snapshot_that_retries_it(project):
    project.pipefile("""
        stage check:
            in: code.txt
            out: checked.txt
            run: grep -q good $in && cp $in $out
    """)
    project.write("code.txt", "bad\n")
    settle(project)
    project.run(check=1)  # full path (no snapshot yet), fails: the snapshot marks `check` unsettled
    record = project.build(check=1)
    assert record.get("fast_path") == "changes" and record["counts"]["failed"] == 1


def test_always_stages_run_on_every_fast_build(project):
    project.pipefile("""
        stage stamp:
            always: true
            out: stamp.txt
            run: echo once >> $out.log; cp $out.log $out
        stage copy:
            in: src.txt
            out: copy.txt
            run: cp $in $out
    """)
    project.write("src.txt", "x\n")
    build_settled(project)
    record = project.build()
    assert record.get("fast_path") == "changes" and project.ran(record) == {"stamp"}
    assert project.read("stamp.txt.log").count("once") == 3


def test_right_after_a_fast_build_its_fresh_outputs_are_checked_unless_stamped_finely(project):
    settled_project(project)
    project.write("in/a.txt", "aa\n")
    project.build()
    record = project.build()
    if fine_timestamps_device(str(project.root)) is not None:
        # A rewrite after the hash would have changed the mtime: the stats vouch at once.
        assert record.get("fast_path") == "noop" and record["hashed"]["files"] == 0
    else:
        # The outputs just written are too young to vouch for themselves: the next build re-hashes them.
        assert record.get("fast_path") == "changes" and project.ran(record) == set()
        assert record["hashed"]["files"] >= 2


# -- differential: on random pipelines and edits, the fast path does exactly what the full path does


def random_pipeline(rng: random.Random) -> tuple[str, dict[str, str]]:
    """A random DAG of small shell stages over a few sources; some transforms lose information."""
    sources = {f"src/s{index}.txt": f"{rng.choice('abc')}{index}\n" for index in range(rng.randint(1, 4))}
    available = list(sources)
    transforms = ["cat $in > $out", "cat $in | head -c 1 > $out", "cat $in | tr a-z A-Z > $out",
                  "sort -u $in > $out", "cat $in | wc -l | tr -d ' ' > $out",
                  "cat $in | grep -v q > $out"]  # fails when every line has a q: failures are compared too
    stages = []
    for index in range(rng.randint(2, 7)):
        inputs = rng.sample(available, rng.randint(1, min(3, len(available))))
        output = f"out/t{index}.txt"
        stages.append(f"stage t{index}:\n    in: {' '.join(inputs)}\n    out: {output}\n"
                      f"    run: {rng.choice(transforms)}\n")
        available.append(output)
    return "\n".join(stages), sources


def random_edit(rng: random.Random, root: Path, sources: dict[str, str]) -> str:
    outputs = sorted(str(path.relative_to(root)) for path in (root / "out").glob("*.txt"))
    kind = rng.choice(["content", "same", "first-byte", "poison", "delete-output", "edit-output"])
    if kind.endswith("output") and outputs:
        path = root / rng.choice(outputs)
        if kind == "delete-output":
            path.unlink()
        else:
            path.write_text("hand edit\n")
        return f"{kind} {path.name}"
    source = rng.choice(sorted(sources))
    text = (root / source).read_text()
    new = {"content": text + rng.choice("xyz") + "\n", "same": text, "poison": "q\n",  # fails `grep -v q`
           "first-byte": text[:1] + rng.choice("pq") + text[1:]}[kind]
    (root / source).write_text(new)
    return f"{kind} {source}"


def outputs_of(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): path.read_text() for path in sorted((root / "out").glob("*.txt"))}


def ran_in(root: Path) -> tuple[dict, dict[str, str]]:
    """The last run record, and what happened to each job that did not skip."""
    runs = sorted((root / ".offbuild" / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    record = json.loads(runs[-1].read_text())
    return record, {job["stage"]: job["action"] for job in record["jobs"]}


def both_at_once(project: Project, *args: str) -> list[tuple[int, dict]]:
    """Two offbuild processes started together on one project: exit codes and run records."""
    processes = [subprocess.Popen([sys.executable, "-m", "offbuild", "--json", *args], cwd=project.root,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [process.communicate(timeout=120) for process in processes]
    return [(process.returncode, json.loads(out[out.index("{"):])) for process, (out, _) in zip(processes, outcomes)]


@pytest.mark.parametrize("seed,two", [(seed, False) for seed in range(16)] + [(seed, True) for seed in range(100, 108)])
def test_the_fast_path_decides_like_the_full_path(tmp_path, seed, two):
    """On random pipelines and edits, the fast path does exactly what the full path does; with
    `two`, two fast-path builds at once do it between them, each successful job once."""
    rng = random.Random(seed)
    pipefile, sources = random_pipeline(rng)
    fast = Project(tmp_path / "fast")
    fast.pipefile(pipefile)
    for path, text in sources.items():
        fast.write(path, text)
    fast.run()
    settle(fast)
    fast.run()  # learns the settled stats and saves a snapshot that trusts them
    took_fast_path = 0
    for step in range(4):
        edits = [random_edit(rng, fast.root, sources) for _ in range(rng.randint(1, 2))]
        full = Project(tmp_path / f"full{step}")
        shutil.copytree(fast.root, full.root, symlinks=True)
        (full.root / ".offbuild" / "noop.snapshot").unlink(missing_ok=True)  # the full path decides alone
        dry_fast, dry_full = fast.run("-n", check=0).stdout, full.run("-n", check=0).stdout
        assert sorted(dry_fast.splitlines()) == sorted(dry_full.splitlines()), f"after {edits}"
        # -k: which independent jobs start before a failure stops a build is scheduling, not decision
        full_code = full.run("-k").returncode
        full_record, full_ran = ran_in(full.root)
        assert not full_record.get("fast_path")
        if two:
            results = both_at_once(fast, "-k")
            assert [code for code, _ in results] == [full_code] * 2, f"after {edits}"
            ran = [job["stage"] for _, record in results for job in record["jobs"] if job["action"] == "ran"]
            assert sorted(ran) == sorted(name for name, action in full_ran.items() if action == "ran"), \
                f"after {edits}: the two ran {sorted(ran)}, the full path {full_ran}"
            took_fast_path += any(record.get("fast_path") == "changes" for _, record in results)
        else:
            fast_code = fast.run("-k").returncode
            assert fast_code == full_code, f"after {edits}: exit {fast_code} on the fast path, {full_code} on the full"
            fast_record, fast_ran = ran_in(fast.root)
            took_fast_path += fast_record.get("fast_path") == "changes"
            assert fast_ran == full_ran, f"after {edits}: fast path ran {fast_ran}, full path ran {full_ran}"
        assert outputs_of(fast.root) == outputs_of(full.root), f"after {edits}"
    assert took_fast_path >= 1  # the test would prove nothing if the snapshot never applied


def test_the_fast_path_restores_from_the_shared_cache(project, tmp_path):
    cache = tmp_path / "cache"
    project.pipefile("""
        stage copy:
            in: src.txt
            out: copy.txt
            run: cp $in $out
        stage other:
            in: other.txt
            out: other.out
            run: cp $in $out
    """)
    project.write("src.txt", "one\n")
    project.write("other.txt", "x\n")
    project.build("--cache", str(cache))
    settle(project)
    project.build("--cache", str(cache))
    project.write("src.txt", "two\n")
    assert project.ran(project.build("--cache", str(cache))) == {"copy"}
    project.write("src.txt", "one\n")  # back to a version the cache holds
    record = project.build("--cache", str(cache))
    assert record.get("fast_path") == "changes" and record["counts"]["restored"] == 1
    assert [job["action"] for job in record["jobs"]] == ["restored"] and project.read("copy.txt") == "one\n"


# -- the parsed Pipefile is kept while its files are unchanged


def test_an_unchanged_pipefile_is_not_parsed_again(project):
    settled_project(project)
    assert (project.root / ".offbuild" / "pipeline.cache").exists()
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "offbuild", "--explain", "all"],
                            cwd=project.root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "all" in result.stdout
    assert " lark" not in result.stderr  # the model came from the cache: lark was never loaded
    project.pipefile(PIPEFILE.replace('echo "$$SEPARATOR"', 'echo "[$$SEPARATOR]"'))
    settle(project)
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "offbuild"], cwd=project.root,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and " lark" in result.stderr  # edited: parsed again
    assert project.ran(project.last_record()) == {"all"} and project.read("all.txt").endswith("[]\n")


def test_two_fast_path_builds_at_once_run_each_job_once(project):
    project.pipefile("""
        stage slow:
            in: src.txt
            out: slow.txt
            run: echo slow >> runs.log; sleep 0.5; cp $in $out
        stage after:
            in: slow.txt
            out: after.txt
            run: echo after >> runs.log; cp $in $out
    """)
    project.write("src.txt", "one\n")
    build_settled(project)
    (project.root / "runs.log").unlink()
    project.write("src.txt", "two\n")
    both = [subprocess.Popen([sys.executable, "-m", "offbuild", "--json"], cwd=project.root, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    records = [json.loads(process.communicate(timeout=60)[0]) for process in both]
    assert [process.returncode for process in both] == [0, 0]
    assert any(record.get("fast_path") == "changes" for record in records)
    assert sorted(project.read("runs.log").split()) == ["after", "slow"]  # each job ran exactly once
    assert project.read("after.txt") == "two\n"
    assert project.ran(project.build()) == set()


def test_a_flaky_failure_then_a_revert_rebuilds_from_the_right_input(project):
    """A failed job's record still holds its last success's digests: the fast path must not take
    them for the current ones, or a later revert of the input would wrongly skip."""
    project.pipefile("""
        stage copy:
            in: src.txt
            out: out.txt
            run: test ! -e fail.flag && cp $in $out
    """)
    project.write("src.txt", "one\n")
    build_settled(project)
    project.write("src.txt", "two\n")
    project.write("fail.flag", "")
    project.run(check=1)
    settle(project)
    project.run(check=1)  # fails again, and learns the settled stat of src.txt
    (project.root / "fail.flag").unlink()
    record = project.build()
    assert record.get("fast_path") == "changes" and project.ran(record) == {"copy"}
    assert project.read("out.txt") == "two\n"
    project.write("src.txt", "one\n")  # back to the first content
    assert project.ran(project.build()) == {"copy"} and project.read("out.txt") == "one\n"


# -- the snapshot's stat check, split over forked processes on big trees


def stat_snapshot(paths: list[str]) -> dict:
    from array import array

    from offbuild import snapshot

    stats = array("q")
    for path in paths:
        stats.extend(snapshot.stat_tuple(path))
    return {"file_stats": stats.tobytes()}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the stats are split over forked processes")
@pytest.mark.parametrize("trouble", [None, "child", "fork"])
def test_the_stat_check_split_over_processes_finds_what_one_process_finds(tmp_path, monkeypatch, trouble):
    from offbuild import snapshot

    paths = []
    for index in range(40):
        path = tmp_path / f"f{index}.txt"
        path.write_text(f"{index}\n")
        paths.append(str(path))
    saved = stat_snapshot(paths)
    (tmp_path / "f3.txt").write_text("changed size\n")
    (tmp_path / "f17.txt").unlink()
    (tmp_path / "f38.txt").unlink()
    (tmp_path / "f38.txt").write_text("38\n")  # same content and size, another inode
    monkeypatch.setattr(snapshot, "PARALLEL_STATS", 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert snapshot._stat_processes(len(paths)) == 3
    if trouble == "fork":  # no child at all: the parent does every share

        def no_fork():
            raise BlockingIOError("no more processes")

        monkeypatch.setattr(os, "fork", no_fork)
    if trouble == "child":  # a child that cannot answer has its share redone by the parent
        parent, serial = os.getpid(), snapshot._changed_between

        def only_in_the_parent(*args):
            if os.getpid() != parent:
                raise OSError("a child's trouble")
            return serial(*args)

        monkeypatch.setattr(snapshot, "_changed_between", only_in_the_parent)
    assert snapshot.changed_files(saved, paths) == [3, 17, 38]
    monkeypatch.setattr(snapshot, "PARALLEL_STATS", 1000)  # one process: the same answer
    assert snapshot._stat_processes(len(paths)) == 1 and snapshot.changed_files(saved, paths) == [3, 17, 38]


def test_settled_store_files_vouch_for_the_store_until_another_process_writes(project):
    """A no-op build asks SQLite whether another process recorded a job only until the store's files
    have settled; then their stats answer, and a write by another process still defeats the fast path."""
    settled_project(project)
    past = time.time() - 10
    for name in ("state.db", "state.db-wal"):
        if project.exists(f".offbuild/{name}"):
            os.utime(project.root / ".offbuild" / name, (past, past))
    project.run("-n", check=0)
    assert not project.exists(".offbuild/noop.store")  # -n changes nothing on disk
    assert project.build().get("fast_path") == "noop" and project.exists(".offbuild/noop.store")
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "offbuild", "--json"], cwd=project.root, capture_output=True,
        text=True, timeout=60)
    assert json.loads(result.stdout[result.stdout.index("{"):])["fast_path"] == "noop"
    assert " sqlite3" not in result.stderr
    from offbuild.state import StateStore

    store = StateStore(str(project.root / ".offbuild" / "state.db"))
    store.record_failure("all", "elsewhere")  # as another process would: the generation moves on
    store.close()
    record = project.build()
    assert record.get("fast_path") != "noop" and project.ran(record) == {"all"}
