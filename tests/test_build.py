"""End-to-end: the real `offbuild` command deciding by content (SPEC sections 2, 3 and 6)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


CHAIN = """
stage first:
    in:  src.txt
    out: work/first.txt
    run: tr a-z A-Z < $in > $out

stage second:
    in:  work/first.txt
    out: out/second.txt
    run: cat $in $in > $out
"""


def age(project, *paths, seconds=10):
    """Backdate files so the stat cache may trust them (entries within 2 s of mtime are racy)."""
    past = time.time() - seconds
    for path in paths:
        os.utime(project.root / path, (past, past))


def test_first_build_then_noop(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    record = project.build()
    assert project.ran(record) == {"first", "second"}
    assert project.read("out/second.txt") == "HELLO\nHELLO\n"
    record = project.build()
    assert project.ran(record) == set()
    assert sorted(record["skipped"]) == ["first", "second"]
    assert record["counts"] == {"total": 2, "ran": 0, "skipped": 2, "failed": 0, "resumed": 0, "restored": 0,
                                "blocked": 0}


def test_touch_and_same_content_save_rebuild_nothing(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    os.utime(project.root / "src.txt")
    assert project.ran(project.build()) == set()
    project.write("src.txt", "hello\n")  # saved again, same bytes
    assert project.ran(project.build()) == set()


def test_content_change_reruns_the_chain(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    project.write("src.txt", "bye\n")
    assert project.ran(project.build()) == {"first", "second"}
    assert project.read("out/second.txt") == "BYE\nBYE\n"


def test_early_cutoff_skips_downstream_when_output_is_identical(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    project.write("src.txt", "HELLO\n")  # different input, same upper-cased output
    record = project.build()
    assert project.ran(record) == {"first"}
    assert "second" in record["skipped"]


def test_recipe_edit_reruns_only_that_stage(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    project.pipefile(CHAIN.replace("cat $in $in > $out", "cat $in $in $in > $out"))
    record = project.build()
    assert project.ran(record) == {"second"}
    reasons = [job["reasons"] for job in record["jobs"] if job["stage"] == "second"][0]
    assert any(reason["reason"] == "recipe_changed" for reason in reasons)


def test_deleted_output_rebuilds_its_stage(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    (project.root / "out/second.txt").unlink()
    record = project.build()
    assert project.ran(record) == {"second"}
    assert project.read("out/second.txt") == "HELLO\nHELLO\n"


def test_hand_edited_output_rebuilds_and_early_cutoff_stops_the_rest(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    project.write("work/first.txt", "tampered\n")
    record = project.build()
    # first is rebuilt, and since it writes the same bytes as before, second stays skipped
    assert project.ran(record) == {"first"}
    assert project.read("work/first.txt") == "HELLO\n"
    reasons = {r["reason"] for job in record["jobs"] for r in job["reasons"]}
    assert "output_changed" in reasons


def test_failure_exit_code_deletes_outputs_and_blocks_downstream(project):
    project.pipefile("""
        stage bad:
            in:  src.txt
            out: work/bad.txt
            run: echo partial > $out; echo boom >&2; exit 3
        stage after:
            in:  work/bad.txt
            out: after.txt
            run: cp $in $out
    """)
    project.write("src.txt", "x\n")
    result = project.run(check=1)
    assert "boom" in result.stdout + result.stderr
    assert not project.exists("work/bad.txt"), "a failed stage's partial output must be deleted"
    assert not project.exists("after.txt")
    record = project.last_record()
    assert record["status"] == "failed"
    bad = [job for job in record["jobs"] if job["stage"] == "bad"][0]
    assert bad["action"] == "failed" and bad["exit_code"] == 3
    assert record["counts"]["failed"] == 1
    # A failure never counts as done: the next build tries again.
    project.run(check=1)
    assert "bad" in {job["stage"] for job in project.last_record()["jobs"]}


def test_missing_declared_output_is_a_failure_naming_the_file(project):
    project.pipefile("""
        stage lazy:
            out: made.txt forgot.txt
            run: echo hi > made.txt
    """)
    result = project.run(check=1)
    assert "forgot.txt" in result.stdout + result.stderr
    assert not project.exists("made.txt")


def test_keep_going_runs_independent_stages(project):
    project.pipefile("""
        stage a_bad:
            out: a.txt
            run: exit 1
        stage b_good:
            out: b.txt
            run: echo ok > b.txt
    """)
    project.run("-j", "1", check=1)
    assert not project.exists("b.txt"), "without -k nothing new starts after a failure"
    project.run("-j", "1", "-k", check=1)
    assert project.read("b.txt") == "ok\n"


def test_parallel_jobs_really_overlap(project):
    wait_for = "for i in $(seq 100); do [ -e {other} ] && break; sleep 0.05; done; [ -e {other} ]"
    project.pipefile(f"""
        stage a:
            out: a.txt
            run: touch a.started; {wait_for.format(other="b.started")}; echo a > a.txt
        stage b:
            out: b.txt
            run: touch b.started; {wait_for.format(other="a.started")}; echo b > b.txt
    """)
    project.run("-j", "2", check=0)
    assert project.exists("a.txt") and project.exists("b.txt")


def test_patterns_make_one_job_per_file_and_a_new_file_adds_one_job(project):
    project.pipefile("""
        stage shout:
            in:  data/input/%.txt
            out: data/work/%.shout
            run: tr a-z A-Z < $in > $out; echo $stem > $out.stem
        stage report:
            in:  data/work/*.shout
            out: report.txt
            run: cat $in > $out
    """)
    project.write("data/input/a.txt", "a\n")
    project.write("data/input/sub/b.txt", "b\n")
    assert project.ran(project.build()) == {"shout[a]", "shout[sub/b]", "report"}
    assert project.read("report.txt") == "A\n"  # the glob is one level deep; sub/b.shout is not matched
    assert project.read("data/work/sub/b.shout.stem") == "sub/b\n"
    project.write("data/input/c.txt", "c\n")
    assert project.ran(project.build()) == {"shout[c]", "report"}
    assert project.read("report.txt") == "A\nC\n"


def test_patterns_chain_on_a_clean_tree(project):
    project.pipefile("""
        stage up:
            in:  in/%.txt
            out: mid/%.up
            run: tr a-z A-Z < $in > $out
        stage twice:
            in:  mid/%.up
            out: out/%.twice
            run: cat $in $in > $out
    """)
    project.write("in/x.txt", "x\n")
    assert project.ran(project.build()) == {"up[x]", "twice[x]"}
    assert project.read("out/x.twice") == "X\nX\n"


def test_vanished_job_outputs_are_removed_but_hand_edited_ones_kept(project):
    project.pipefile("""
        stage shout:
            in:  in/%.txt
            out: work/%.shout
            run: tr a-z A-Z < $in > $out
        stage all:
            in:  work/*.shout
            out: all.txt
            run: cat $in > $out
    """)
    project.write("in/a.txt", "a\n")
    project.write("in/b.txt", "b\n")
    project.write("in/c.txt", "c\n")
    project.build()
    (project.root / "in/b.txt").unlink()
    (project.root / "in/c.txt").unlink()
    project.write("work/c.shout", "mine now\n")
    project.build()
    assert not project.exists("work/b.shout"), "a stale output must not linger (or feed the glob)"
    assert project.read("work/c.shout") == "mine now\n", "a hand-edited output is kept"
    assert "B" not in project.read("all.txt")


def test_targets_by_stage_job_and_output_path(project):
    project.pipefile("""
        stage shout:
            in:  in/%.txt
            out: work/%.shout
            run: tr a-z A-Z < $in > $out
        stage other:
            out: other.txt
            run: echo other > $out
    """)
    project.write("in/a.txt", "a\n")
    project.write("in/b.txt", "b\n")
    assert project.ran(project.build("shout[a]")) == {"shout[a]"}
    assert project.ran(project.build("work/b.shout")) == {"shout[b]"}
    assert project.ran(project.build("other")) == {"other"}
    (project.root / "work").mkdir(exist_ok=True)
    assert project.ran(project.build("-f", "../Pipefile", "a.shout", cwd=project.root / "work")) == set()


def test_default_names_what_a_bare_build_builds(project):
    project.pipefile("""
        stage one:
            out: one.txt
            run: echo 1 > $out
        stage two:
            out: two.txt
            run: echo 2 > $out
        default: two
    """)
    assert project.ran(project.build()) == {"two"}
    assert not project.exists("one.txt")


def test_dry_run_prints_reasons_and_changes_nothing(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    result = project.run("-n", check=0)
    assert "would run first: never built" in result.stdout
    assert "would run second" in result.stdout
    assert not project.exists("work/first.txt")
    assert not (project.root / ".offbuild" / "runs").exists()
    project.build()
    project.write("src.txt", "changed\n")
    result = project.run("-n", check=0)
    assert "input changed: src.txt" in result.stdout
    assert "upstream" in result.stdout


def test_force_reruns_everything_selected(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    assert project.ran(project.build("-B")) == {"first", "second"}


def test_run_record_fields_and_json_flag(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    result = project.run("--json", "--run-id", "first-run", check=0)
    printed = json.loads(result.stdout)
    saved = json.loads((project.root / ".offbuild/runs/first-run.json").read_text())
    assert printed == saved
    for field in ("run_id", "started", "ended", "status", "targets", "offline", "counts", "jobs", "skipped"):
        assert field in saved
    assert saved["run_id"] == "first-run" and saved["status"] == "ok"
    assert saved["counts"]["ran"] == 2 and saved["counts"]["total"] == 2
    job = saved["jobs"][0]
    for field in ("stage", "action", "reasons", "attempts", "duration", "exit_code", "key"):
        assert field in job
    assert "log" not in job and not (project.root / ".offbuild/logs/first.log").exists(), "it printed nothing"


def test_a_log_holds_the_last_runs_output_and_exists_only_when_there_was_some(project):
    project.pipefile("""
        stage talk:
            in:  src.txt
            out: out.txt
            run:
                echo "said $$(cat $in)"
                echo "warned" >&2
                cp $in $out
    """)
    project.write("src.txt", "hello\n")
    first = project.build()
    log = project.root / ".offbuild/logs/talk.log"
    assert first["jobs"][0]["log"] == ".offbuild/logs/talk.log"
    assert log.read_text() == "said hello\nwarned\n"
    project.pipefile("""
        stage talk:
            in:  src.txt
            out: out.txt
            run: cp $in $out
    """)
    second = project.build()
    assert project.ran(second) == {"talk"} and "log" not in second["jobs"][0]
    assert not log.exists(), "an old log must not pass for this run's output"


def test_noop_reads_no_file_contents(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    age(project, "src.txt", "work/first.txt", "out/second.txt")
    project.build()  # backdating changed ctime: the cache re-learns each file once
    record = project.build()
    assert record["hashed"] == {"files": 0, "bytes": 0}
    assert project.ran(record) == set()


def test_same_size_same_mtime_edit_is_still_seen(project):
    """A rewrite that keeps size and mtime is caught (inode/ctime and the racy rule)."""
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    stat = os.stat(project.root / "src.txt")
    project.write("src.txt", "jello\n")
    os.utime(project.root / "src.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert project.ran(project.build()) == {"first", "second"}


def test_checks_rerun_on_change_and_after_failure(project):
    project.pipefile("""
        stage lint:
            in:  code.txt
            run: grep -q good code.txt
    """)
    project.write("code.txt", "good\n")
    assert project.ran(project.build()) == {"lint"}
    assert project.ran(project.build()) == set()
    project.write("code.txt", "bad\n")
    project.run(check=1)
    project.run(check=1)  # still failing: a failed check reruns
    project.write("code.txt", "good\n")
    assert project.ran(project.build()) == {"lint"}


def test_always_stage_runs_every_time(project):
    project.pipefile("""
        stage stamp:
            always: true
            out: stamp.txt
            run: echo same > $out
        stage use:
            in: stamp.txt
            out: use.txt
            run: cp $in $out
    """)
    project.build()
    record = project.build()
    assert project.ran(record) == {"stamp"}, "early cutoff keeps 'use' skipped"


def test_job_variables_parent_folders_and_shell_syntax(project):
    project.pipefile("""
        stage vars:
            in:  b.txt a.txt
            out: deep/dir/one.txt deep/other/two.txt
            run:
                echo "$in0|$in1|$stage|$(echo sub)|$$HOME" > $out0
                echo "$in" > $out1
    """)
    project.write("a.txt", "a")
    project.write("b.txt", "b")
    project.build()
    assert project.read("deep/dir/one.txt") == f"b.txt|a.txt|vars|sub|{os.environ['HOME']}\n"
    assert project.read("deep/other/two.txt") == "b.txt a.txt\n"


def test_block_recipe_is_one_sh_e_script(project):
    project.pipefile("""
        stage block:
            out: out.txt
            run:
                x=1
                if [ "$$x" = 1 ]; then
                    echo one > $out
                fi
                false
                echo never >> $out
    """)
    project.run(check=1)
    assert not project.exists("out.txt")


def test_variable_override_and_env_are_part_of_the_key(project):
    project.pipefile("""
        greeting = hello
        stage greet:
            env: WHO
            out: greet.txt
            run: echo $greeting $$WHO > $out
    """)
    project.build(env={"WHO": "ann"})
    assert project.read("greet.txt") == "hello ann\n"
    assert project.ran(project.build(env={"WHO": "ann"})) == set()
    assert project.ran(project.build(env={"WHO": "bob"})) == {"greet"}
    assert project.ran(project.build("greeting=hi", env={"WHO": "bob"})) == {"greet"}
    assert project.read("greet.txt") == "hi bob\n"


def test_after_orders_without_being_an_input(project):
    project.pipefile("""
        stage second:
            after: first
            out: second.txt
            run: cat first.txt > second.txt
        stage first:
            out: first.txt
            run: echo 1 > first.txt
    """)
    project.build("-j", "2")
    assert project.read("second.txt") == "1\n"


def test_json_form_builds_like_a_pipefile(project):
    project.write("pipeline.json", json.dumps({
        "vars": {"tool": "tr a-z A-Z"},
        "stages": [{"name": "up", "in": ["src.txt"], "out": ["up.txt"], "run": "$tool < $in > $out"}],
        "default": ["up"],
    }))
    project.write("src.txt", "json\n")
    assert project.ran(project.build("-f", "pipeline.json")) == {"up"}
    assert project.read("up.txt") == "JSON\n"
    assert project.ran(project.build("-f", "pipeline.json")) == set()


def test_directory_flag_and_file_flag(project, tmp_path):
    project.write("sub/Pipefile", "stage s:\n    out: s.txt\n    run: echo s > $out\n")
    project.run("-C", "sub", check=0)
    assert project.read("sub/s.txt") == "s\n"
    project.run("-f", "sub/Pipefile", check=0)
    assert project.exists("sub/.offbuild/state.db")


def test_no_pipefile_is_a_usage_error(project):
    result = project.run(check=2)
    assert "no pipeline file" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_recipes_and_exits_130(project):
    project.pipefile("""
        stage slow:
            out: slow.txt
            run: echo started > started.txt; echo partial > $out; sleep 30; echo done >> $out
    """)
    process = subprocess.Popen([sys.executable, "-m", "offbuild"], cwd=project.root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not project.exists("started.txt") and time.time() < deadline:
        time.sleep(0.05)
    started = time.time()
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=20)
    assert process.returncode == 130
    assert time.time() - started < 8
    assert not project.exists("slow.txt"), "an interrupted job's output never counts as built"
    assert project.last_record()["status"] == "interrupted"
    result = subprocess.run(["pgrep", "-f", "sleep 30"], capture_output=True, text=True)
    assert result.stdout.strip() == "", "the recipe's processes must be gone"


def test_a_source_inside_a_declared_output_folder_is_never_deleted(project):
    project.pipefile("""
        stage fill:
            in:  seed.txt
            out: data
            run: mkdir -p data && cp seed.txt data/copy.txt
        stage read:
            in:  data/raw.txt
            out: read.txt
            run: cp $in $out
    """)
    project.write("seed.txt", "1\n")
    project.write("data/raw.txt", "precious\n")
    project.build()
    project.write("seed.txt", "2\n")
    project.build()
    assert project.read("data/raw.txt") == "precious\n"
    assert project.read("data/copy.txt") == "2\n"


def test_list_graph_and_clean_work_with_a_source_missing(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    (project.root / "src.txt").unlink()
    assert "first" in project.run("--list", check=0).stdout
    assert "first" in project.run("--graph", check=0).stdout
    project.run("--clean", check=0)
    assert not project.exists("out/second.txt")
    project.run(check=2)  # a build does need it


def test_dry_run_and_explain_create_nothing(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.run("-n", check=0)
    project.run("--explain", "second", check=0)
    assert not project.exists(".offbuild")


PARENT_PROBE = """
import os, sys
parent = open(f"/proc/{os.getppid()}/comm").read().strip()
open(sys.argv[1], "w").write(f"{parent} {os.environ['PWD']} {os.environ['OFFBUILD_STAGE']} {os.getcwd()}\\n")
"""


def test_a_plain_recipe_runs_without_a_shell_and_sees_what_a_shell_would_give_it(project):
    project.write("probe.py", PARENT_PROBE)
    project.pipefile(f"""
        stage plain:
            out: plain.txt
            run: {sys.executable} probe.py $out
        stage shell:
            out: shell.txt
            run: {sys.executable} probe.py $out; true
    """)
    project.build("-j", "1", "--offline=off", cwd=project.root, env={"PWD": "/somewhere/else"})
    root = str(project.root)
    parent, pwd, stage, cwd = project.read("plain.txt").split()
    assert parent != "sh" and (pwd, stage, cwd) == (root, "plain", root)
    parent, pwd, stage, cwd = project.read("shell.txt").split()
    assert parent == "sh" and (pwd, stage, cwd) == (root, "shell", root)


def test_a_missing_or_unrunnable_command_fails_as_in_a_shell(project):
    project.write("not-executable", "#!/bin/sh\n")
    project.pipefile("""
        stage missing:
            out: a.txt
            run: no-such-program-here a.txt
        stage unrunnable:
            out: b.txt
            run: ./not-executable b.txt
    """)
    result = project.run("-k", check=1)
    jobs = {job["stage"]: job for job in project.last_record()["jobs"]}
    assert jobs["missing"]["exit_code"] == 127 and jobs["unrunnable"]["exit_code"] == 126
    assert "no-such-program-here: command not found" in result.stdout
    assert "./not-executable: permission denied" in result.stdout
    assert "command not found" in project.read(".offbuild/logs/missing.log")


def test_remove_path_deletes_files_trees_and_links_but_never_a_links_target(tmp_path):
    from offbuild.build import remove_path

    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "tree" / "deep").mkdir(parents=True)
    (tmp_path / "tree" / "deep" / "leaf.txt").write_text("x")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "inside.txt").write_text("x")
    os.symlink(tmp_path / "kept", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for name in ("file.txt", "tree", "link", "dangling", "never-there"):
        remove_path(str(tmp_path / name))
    assert sorted(os.listdir(tmp_path)) == ["kept"]
    assert (tmp_path / "kept" / "inside.txt").read_text() == "x"


def test_look_up_sets_aside_the_outputs_of_folders_not_made_yet(tmp_path):
    from offbuild.build import look_up

    (tmp_path / "made").mkdir()
    (tmp_path / "made" / "there.txt").write_text("x")
    paths = [str(tmp_path / relative) for relative in
             ("made/there.txt", "made/missing.txt", "new/a.txt", "new/b.txt", "new/deeper/c.txt")]
    assert look_up(paths) == {str(tmp_path / "new"): paths[2:4], str(tmp_path / "new" / "deeper"): paths[4:]}


def test_outputs_in_folders_the_build_makes_are_still_checked_and_replaced(project):
    # Their look-up waits until the build makes the folder: a recipe must still write its output,
    # and a stale file there (made by another recipe) is removed before the recipe runs.
    project.pipefile("""
        stage first:
            out: new/first.txt
            run: echo first > new/first.txt && echo stray > new/second.txt
        stage second:
            after: first
            out: new/second.txt
            run: test ! -e new/second.txt && echo second > new/second.txt
        stage lazy:
            after: second
            out: new/deeper/lazy.txt
            run: true
    """)
    result = project.run(check=1)
    assert "new/deeper/lazy.txt" in result.stdout
    assert project.read("new/second.txt") == "second\n"


def _spans(project, names):
    """(start, end) of each stage's recipe, as it wrote them."""
    spans = []
    for name in names:
        start, end = project.read(f"{name}.span").split()
        spans.append((float(start), float(end)))
    return spans


def _most_at_once(spans) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def test_j_caps_running_recipes_across_isolated_and_networked_stages(project):
    # offbuild hands the spawners more recipes than -j; the shared job slots must still hold -j,
    # across both spawners (network: true stages run through the second one).
    names = [f"s{k}" for k in range(8)]
    stages = "".join(f"""
        stage {name}:
            out: {name}.span
            network: {"true" if k % 2 else "false"}
            run: start=$$(date +%s.%N); sleep 0.3; echo "$$start $$(date +%s.%N)" > {name}.span
    """ for k, name in enumerate(names))
    project.pipefile(stages)
    project.run("-j", "2", check=0)
    assert _most_at_once(_spans(project, names)) == 2


def test_a_j_beyond_what_the_slot_pipe_holds_still_builds(project):
    # One byte per job slot in a pipe: -j 100000 once blocked filling it, and 65536 hung a spawner.
    project.pipefile("".join(f"""
        stage s{k}:
            out: s{k}.txt
            run: echo {k} > s{k}.txt
    """ for k in range(6)))
    for jobs in ("65536", "1000000"):
        record = project.build("-B", "-j", jobs, timeout=30)
        assert project.ran(record) == {f"s{k}" for k in range(6)}


def test_two_pipeline_files_in_one_folder_keep_their_own_state(project):
    # They once shared .offbuild/: each build took the other file's jobs for removed stages and
    # deleted their outputs, and same-named stages overwrote each other's records.
    project.write("a.pipe", "stage build:\n    out: a.txt\n    run: echo a > a.txt\n")
    project.write("b.pipe", "stage build:\n    out: b.txt\n    run: echo b > b.txt\n")
    project.pipefile("stage main:\n    out: main.txt\n    run: echo main > main.txt\n")
    assert project.ran(project.build("-f", "a.pipe")) == {"build"}
    assert project.ran(project.build("-f", "b.pipe")) == {"build"}
    assert project.ran(project.build()) == {"main"}
    assert project.exists("a.txt") and project.exists("b.txt")
    for args in (("-f", "a.pipe"), ("-f", "b.pipe"), ()):
        assert project.ran(project.build(*args)) == set()
    assert project.exists("a.txt") and project.exists("b.txt") and project.exists("main.txt")
    assert (project.root / ".offbuild" / "pipefiles" / "a.pipe" / "state.db").exists()
    assert (project.root / ".offbuild" / "state.db").exists()  # Pipefile's: where it always was


def test_a_timeout_counts_from_the_recipes_real_start_not_from_its_wait_for_a_slot(project):
    project.pipefile("""
        stage slow:
            out: slow.txt
            run: sleep 1.5; echo done > slow.txt
        stage quick:
            out: quick.txt
            timeout: 1s
            run: sleep 0.3; echo done > quick.txt
    """)
    record = project.build("-j", "1")
    assert project.ran(record) == {"slow", "quick"}
    quick = next(job for job in record["jobs"] if job["stage"] == "quick")
    assert quick["duration"] < 1.0, "its duration is its own run, not its wait behind 'slow'"


def test_a_retried_failure_does_not_hold_back_the_waiting_recipes(project):
    project.pipefile("""
        stage flaky:
            out: flaky.txt
            retries: 2
            backoff: 0.1s
            run: if [ -e tried ]; then echo ok > flaky.txt; else touch tried; exit 3; fi
        stage after1:
            out: a1.txt
            run: echo 1 > a1.txt
        stage after2:
            out: a2.txt
            run: echo 2 > a2.txt
    """)
    record = project.build("-j", "1", timeout=30)
    assert project.ran(record) == {"flaky", "after1", "after2"}


def test_recipes_withdrawn_before_they_start_stay_blocked_not_failed(tmp_path):
    from offbuild.executor import LocalExecutor
    from offbuild.model import Job, Location, Stage

    def job(name: str, recipe: str) -> Job:
        stage = Stage(name=name, location=Location("Pipefile", 1, 1), recipe=(recipe,))
        return Job(name=name, stage=stage, inputs=(), outputs=(), recipe=recipe)

    runner = LocalExecutor(str(tmp_path), str(tmp_path / ".offbuild"), "run-1", offline="off", slots=1)
    try:
        running = runner.submit(job("first", "sleep 5"))
        waiting = runner.submit(job("second", "touch second.txt"))
        time.sleep(0.5)
        runner.interrupt()
        first, second = running.result(timeout=10), waiting.result(timeout=10)
    finally:
        runner.close()
    assert first.started and first.interrupted and first.exit_code != 0
    assert not second.started and second.attempts == []
    assert not (tmp_path / "second.txt").exists()


def test_stat_entries_lost_to_a_crash_cost_a_rehash_never_a_rerun(project):
    # Successes save their stat entries in batches (they are only a cache): a build killed before
    # a batch is saved leaves job records without them. The next build hashes again and reruns nothing.
    import sqlite3

    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()
    age(project, "src.txt", "work/first.txt", "out/second.txt")
    with sqlite3.connect(project.root / ".offbuild" / "state.db") as db:
        db.execute("DELETE FROM files")
    (project.root / ".offbuild" / "noop.snapshot").unlink(missing_ok=True)  # decide from the store
    record = project.build()
    assert project.ran(record) == set()
    assert record["hashed"]["files"] >= 3
