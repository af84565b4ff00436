"""`--explain`: every reason the planner records, root-cause chains, recipe diffs, the last run,
JSON, colour, and that explaining runs nothing and writes nothing (SPEC section 3)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from offbuild.explain import Chain, Paint, chain_sentence, explain_jobs, recipe_diff, render_text, root_causes, \
    upstream_jobs
from offbuild.hashing import hash_bytes
from offbuild.planner import Action, Decision, Reason, Why

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

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def short(text: str) -> str:
    return hash_bytes(text.encode())[:12]


def built_chain(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    project.build()


def explain(project, *args: str) -> str:
    return project.run("--explain", *args, check=0).stdout


def block(output: str, job: str) -> str:
    """The lines of one job's block in the text form."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{job}: "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


# -- unit: linking the planner's records


def decision(job: str, *reasons: Why) -> Decision:
    action = Action.SKIP if reasons and reasons[0].reason is Reason.UP_TO_DATE else Action.RUN
    return Decision(job, action, list(reasons), key="k-" + job)


def test_root_cause_follows_upstream_records_to_the_job_with_its_own_reason():
    changed = Why(Reason.INPUT_CHANGED, "data/input/sample.txt", "abc123" + "0" * 58, "def456" + "0" * 58)
    decisions = {d.job: d for d in [
        decision("copy", changed),
        decision("upper", Why(Reason.UPSTREAM_WILL_RUN, "copy")),
        decision("report", Why(Reason.UPSTREAM_WILL_RUN, "upper")),
    ]}
    chains = root_causes("report", decisions)
    assert chains == [Chain(("report", "upper", "copy"), (changed,))]
    assert chain_sentence(root_causes("upper", decisions)[0]) == (
        "upper will rerun because copy will, because data/input/sample.txt changed (abc123000000 → def456000000)")
    assert root_causes("copy", decisions) == []


def test_root_cause_reports_a_diamond_once_and_every_root():
    decisions = {d.job: d for d in [
        decision("a", Why(Reason.RECIPE_CHANGED, None, "x", "y")),
        decision("b", Why(Reason.UPSTREAM_WILL_RUN, "a")),
        decision("c", Why(Reason.UPSTREAM_WILL_RUN, "a"), Why(Reason.NEVER_BUILT)),
        decision("d", Why(Reason.UPSTREAM_WILL_RUN, "b, c")),
    ]}
    chains = root_causes("d", decisions)
    assert [chain.jobs for chain in chains] == [("d", "c"), ("d", "b", "a")]
    assert chain_sentence(chains[0]) == "d will rerun because c will, because it was never built"
    assert chain_sentence(chains[1]) == "d will rerun because b will, because a will, because its recipe changed"


def test_upstream_names_may_contain_the_separator():
    known = {name: decision(name, Why(Reason.NEVER_BUILT)) for name in ("shout[a, b]", "copy")}
    why = Why(Reason.UPSTREAM_WILL_RUN, "copy, shout[a, b]")
    assert upstream_jobs(why, known) == ["copy", "shout[a, b]"]


def test_recipe_diff_is_unified_and_colour_only_when_asked():
    why = Why(Reason.RECIPE_CHANGED, None, "echo one\necho two", "echo one\necho 2")
    assert recipe_diff(why) == ["--- recipe at last success", "+++ recipe now", "@@ -1,2 +1,2 @@",
                                " echo one", "-echo two", "+echo 2"]
    explanations = explain_jobs([decision("job", why)], {}, {})
    plain = render_text(explanations, "job", Paint(False))
    assert "\x1b[" not in plain and "    -echo two" in plain and "    +echo 2" in plain
    coloured = render_text(explanations, "job", Paint(True))
    assert "\x1b[31m-echo two\x1b[0m" in coloured and "\x1b[32m+echo 2\x1b[0m" in coloured


# -- end to end: each reason


def test_never_built_and_never_ran(project):
    project.pipefile(CHAIN)
    project.write("src.txt", "hello\n")
    output = explain(project, "second")
    assert "first: will run\n  because never built" in output
    assert "last run: never ran" in block(output, "first")
    assert "offbuild: explain second: 2 of 2 job(s) would run" in output
    assert not project.exists("work/first.txt")


def test_up_to_date_names_the_last_run_and_when(project):
    built_chain(project)
    record = project.last_record()
    output = explain(project, "second")
    assert "second: up to date, will skip" in output
    assert f"last run: ran in run {record['run_id']}, " in block(output, "second")
    assert re.search(r"took \d+\.\d\ds, because never built", block(output, "second"))
    project.build()
    assert "last run: skipped in run" in block(explain(project, "second"), "second")
    assert "last success: run " + record["run_id"] in block(explain(project, "second"), "second")


def test_input_changed_is_traced_from_downstream_to_the_file(project):
    built_chain(project)
    project.write("src.txt", "bye\n")
    output = explain(project, "second")
    old, new = short("hello\n"), short("bye\n")
    assert f"because input changed: src.txt ({old} → {new})" in block(output, "first")
    second = block(output, "second")
    assert "because an upstream stage will rerun: first (early cutoff may still skip this one" in second
    assert f"root cause: second will rerun because first will, because src.txt changed ({old} → {new})" in second


def test_recipe_change_shows_a_diff(project):
    built_chain(project)
    project.pipefile(CHAIN.replace("cat $in $in > $out", "cat $in $in $in > $out"))
    second = block(explain(project, "second"), "second")
    assert "because recipe changed" in second
    assert "    -cat work/first.txt work/first.txt > out/second.txt" in second
    assert "    +cat work/first.txt work/first.txt work/first.txt > out/second.txt" in second
    assert "first: up to date" in explain(project, "second")


def test_input_added_and_removed(project):
    project.pipefile("""
        stage join:
            in:  parts/*.txt
            out: all.txt
            run: cat $in > $out
    """)
    project.write("parts/a.txt", "a\n")
    project.write("parts/b.txt", "b\n")
    project.build()
    project.write("parts/c.txt", "c\n")
    (project.root / "parts/a.txt").unlink()
    output = explain(project, "join")
    assert f"because input added: parts/c.txt ({short('c' + chr(10))})" in output
    assert f"because input removed: parts/a.txt (was {short('a' + chr(10))})" in output


def test_output_missing_and_changed(project):
    built_chain(project)
    (project.root / "out/second.txt").unlink()
    assert "because output missing: out/second.txt" in explain(project, "second")
    project.build()
    project.write("work/first.txt", "edited\n")
    output = explain(project, "second")
    assert (f"because output changed since built: work/first.txt ({short('HELLO' + chr(10))} → "
            f"{short('edited' + chr(10))})") in block(output, "first")
    assert "root cause: second will rerun because first will, because its output work/first.txt was changed" \
        in block(output, "second")


def test_last_attempt_failed(project):
    project.pipefile("""
        stage flaky:
            out: flaky.txt
            run: echo oops; exit 3
    """)
    failed_run = project.build(check=1)["run_id"]
    flaky = block(explain(project, "flaky"), "flaky")
    assert "because the last attempt failed or was interrupted" in flaky
    assert f"it failed in run {failed_run}" in flaky
    assert f"last run: failed in run {failed_run}" in flaky


def test_interrupted_attempt_is_named(project):
    project.pipefile("""
        stage slow:
            out: slow.txt
            run: echo started > started.txt; sleep 30; echo done > $out
    """)
    process = subprocess.Popen([sys.executable, "-m", "offbuild"], cwd=project.root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not project.exists("started.txt") and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=20)
    slow = block(explain(project, "slow"), "slow")
    assert "it was interrupted in run" in slow
    assert "last run: interrupted in run" in slow


CHECKPOINTED = """
stage long:
    in:  src.txt
    out: long.txt
    checkpoint: true
    run: echo 2 > "$$OFFBUILD_CHECKPOINT"; echo part > $out; exit 1
"""


def test_failed_checkpoint_stage_names_the_checkpoint_it_resumes_from(project):
    project.pipefile(CHECKPOINTED)
    project.write("src.txt", "x\n")
    project.build(check=1)
    assert project.exists(".offbuild/checkpoints/long.ckpt")
    long = block(explain(project, "long"), "long")
    assert re.search(r"will resume from checkpoint \.offbuild/checkpoints/long\.ckpt \(2 bytes, saved ", long)
    project.write("src.txt", "y\n")
    long = block(explain(project, "long"), "long")
    assert "checkpoint .offbuild/checkpoints/long.ckpt (2 bytes" in long
    assert "was written under another stage key and will be discarded" in long


def test_forced_always_and_env(project):
    project.pipefile("""
        stage stamp:
            out: stamp.txt
            always: true
            run: date > $out

        stage greet:
            out: greet.txt
            env: GREETING
            run: echo "$$GREETING" > $out
    """)
    project.build(env={"GREETING": "hi"})
    assert "because always: true" in block(explain(project, "stamp"), "stamp")
    output = project.run("--explain", "greet", "-B", check=0, env={"GREETING": "hi"}).stdout
    assert "because forced (-B)" in output
    output = project.run("--explain", "greet", check=0, env={"GREETING": "hello"}).stdout
    assert "because environment variable changed: GREETING ('hi' → 'hello')" in output


def test_json_form_has_reasons_chains_diff_and_history(project):
    built_chain(project)
    project.write("src.txt", "bye\n")
    project.pipefile(CHAIN.replace("cat $in $in > $out", "cat $in > $out"))
    data = json.loads(project.run("--explain", "second", "--json", check=0).stdout)
    assert data["target"] == "second" and data["would_run"] == 2
    first, second = data["jobs"]
    assert first["job"] == "first" and first["action"] == "run"
    assert first["reasons"][0] == {"reason": "input_changed", "path": "src.txt", "old": hash_bytes(b"hello\n"),
                                   "new": hash_bytes(b"bye\n"), "text": first["reasons"][0]["text"]}
    assert [why["reason"] for why in second["reasons"]] == ["upstream_will_run", "recipe_changed"]
    assert second["root_causes"][0]["chain"] == ["second", "first"]
    assert second["root_causes"][0]["causes"][0]["reason"] == "input_changed"
    assert "-cat work/first.txt work/first.txt > out/second.txt\n+cat work/first.txt > out/second.txt\n" \
        in second["recipe_diff"]
    assert second["last_run"]["action"] == "ran" and second["last_success"]["duration"] >= 0
    assert second["last_failure"] is None


def snapshot(root) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` with its bytes and mtime."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = (handle.read(), os.stat(path).st_mtime_ns)
    return found


def test_explain_runs_nothing_and_writes_nothing(project):
    project.pipefile(CHAIN.replace("tr a-z A-Z < $in > $out", "echo ran >> marker.txt; tr a-z A-Z < $in > $out"))
    project.write("src.txt", "hello\n")
    project.build()
    project.write("src.txt", "bye\n")
    (project.root / "out/second.txt").unlink()
    before = snapshot(project.root)
    assert "state.db" in str(sorted(before))
    for args in (("second",), ("second", "--json"), ("second", "-B")):
        output = project.run("--explain", *args, check=0).stdout
        assert "will run" in output or '"run"' in output
    assert snapshot(project.root) == before
    assert project.read("marker.txt") == "ran\n"


def test_colour_only_on_a_terminal(project):
    built_chain(project)
    project.write("src.txt", "bye\n")
    assert not ANSI.search(explain(project, "second"))
    script = ("import os, pty, sys; "
              "os.environ['TERM'] = 'xterm'; os.environ.pop('NO_COLOR', None); "
              "pty.spawn([sys.executable, '-m', 'offbuild', '--explain', 'second'])")
    result = subprocess.run([sys.executable, "-c", script], cwd=project.root, capture_output=True, timeout=60)
    assert b"\x1b[1msecond\x1b[0m" in result.stdout
    assert b"root cause" in result.stdout


def test_an_attempt_cut_short_by_killing_offbuild_is_told_from_its_checkpoint(project):
    project.pipefile("""
        stage long:
            out: long.txt
            checkpoint: true
            run: echo 1 > "$$OFFBUILD_CHECKPOINT"; echo part > $out; echo $$$$ > pid.txt; exec sleep 30
    """)
    process = subprocess.Popen([sys.executable, "-m", "offbuild"], cwd=project.root,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while not (project.exists("pid.txt") and project.read("pid.txt").strip()) and time.time() < deadline:
        time.sleep(0.05)
    process.kill()  # offbuild dies without recording anything
    process.wait(timeout=20)
    os.kill(int(project.read("pid.txt")), signal.SIGKILL)
    long = block(explain(project, "long"), "long")
    assert "will resume from checkpoint .offbuild/checkpoints/long.ckpt (2 bytes" in long
    assert re.search(r"last attempt: started .* and never finished", long)
    assert "last run: never ran" not in long
