"""Long recipes and safety (SPEC sections 4 and 5): real processes, real signals, real sockets."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import alive

RESUMABLE = '''
import os, sys, time
from offbuild.checkpoint import Checkpoint
source, destination = sys.argv[1], sys.argv[2]
state = Checkpoint.load(default={"lines": 0, "offset": 0})
done = state.value["lines"]
print(f"starting at line {done + 1}", flush=True)
with open(source) as reader, open(destination, "r+b" if done else "wb") as writer:
    writer.seek(state.value["offset"])
    writer.truncate()
    for number, line in enumerate(reader, start=1):
        if number <= done:
            continue
        writer.write(line.upper().encode())
        writer.flush()
        state.save({"lines": number, "offset": writer.tell()})
        open("progress", "w").write(str(number))
        time.sleep(float(os.environ.get("DELAY", "0")))
'''

RESUMABLE_PIPEFILE = """
stage upper:
    in:  src.txt
    out: out.txt
    checkpoint: true
    run: {python} upper.py $in $out
"""


def resumable_project(project, lines=40):
    project.write("upper.py", RESUMABLE)
    project.pipefile(RESUMABLE_PIPEFILE.format(python=sys.executable))
    project.write("src.txt", "".join(f"line {i}\n" for i in range(lines)))


def wait_for(predicate, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def progress(project) -> int:
    try:
        return int(project.read("progress") or 0)
    except (FileNotFoundError, ValueError):
        return 0


def start(project, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "offbuild", *args], cwd=project.root,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)



@pytest.mark.parametrize("victim", ["offbuild", "recipe"])
def test_checkpoint_resumes_after_sigkill(project, victim):
    resumable_project(project)
    process = start(project, env={"DELAY": "0.05"})
    wait_for(lambda: progress(project) >= 5)
    if victim == "offbuild":
        process.kill()
    else:
        subprocess.run(["pkill", "-KILL", "-f", "upper.py"], check=False)
    process.communicate(timeout=20)
    stopped_at = progress(project)
    time.sleep(0.3)
    assert progress(project) == stopped_at, "the recipe must not keep running after a kill"
    assert project.exists(".offbuild/checkpoints/upper.ckpt"), "the checkpoint survives the kill"
    record = project.build()
    assert record["counts"]["resumed"] == 1
    log = project.read(".offbuild/logs/upper.log")
    assert f"starting at line {stopped_at + 1}" in log
    assert project.read("out.txt") == project.read("src.txt").upper()
    assert not project.exists(".offbuild/checkpoints/upper.ckpt"), "success deletes the checkpoint"
    assert project.ran(project.build()) == set()


def test_checkpoint_is_discarded_when_the_key_changes(project):
    resumable_project(project)
    process = start(project, env={"DELAY": "0.05"})
    wait_for(lambda: progress(project) >= 3)
    process.kill()
    process.communicate(timeout=20)
    project.write("src.txt", "".join(f"other {i}\n" for i in range(10)))
    record = project.build()
    assert record["counts"]["resumed"] == 0 and project.ran(record) == {"upper"}
    assert "starting at line 1\n" in project.read(".offbuild/logs/upper.log")
    assert project.read("out.txt") == project.read("src.txt").upper()


def test_retries_are_counted_and_spaced_with_backoff(project):
    project.pipefile("""
        stage flaky:
            out: out.txt
            retries: 3
            backoff: 0.3s
            run:
                date +%s.%N >> attempts.log
                [ "$$(wc -l < attempts.log)" -ge 3 ] || exit 75
                echo ok > $out
    """)
    record = project.build()
    job = record["jobs"][0]
    assert [a["exit_code"] for a in job["attempts"]] == [75, 75, 0]
    times = [float(t) for t in project.read("attempts.log").split()]
    first_gap, second_gap = times[1] - times[0], times[2] - times[1]
    assert 0.25 <= first_gap < 2.0, first_gap
    assert 0.5 <= second_gap < 3.0 and second_gap > first_gap, (first_gap, second_gap)


def test_retry_on_stops_unlisted_exit_codes(project):
    project.pipefile("""
        stage picky:
            out: out.txt
            retries: 3
            backoff: 0.05s
            retry-on: 75 137
            run: echo x >> attempts.log; exit 3
    """)
    project.run(check=1)
    assert project.read("attempts.log") == "x\n"
    job = project.last_record()["jobs"][0]
    assert len(job["attempts"]) == 1 and job["exit_code"] == 3


def test_recipe_sees_its_environment(project):
    project.pipefile("""
        stage env:
            out: env.txt
            checkpoint: true
            run: echo "$$OFFBUILD_STAGE $$OFFBUILD_RUN_ID $$OFFBUILD_ATTEMPT $${OFFBUILD_CHECKPOINT##*/}" > $out
    """)
    project.run("--run-id", "r1", check=0)
    assert project.read("env.txt") == "env r1 1 env.ckpt\n"


def test_timeout_kills_the_whole_process_group(project):
    project.pipefile("""
        stage hang:
            out: out.txt
            timeout: 1s
            run:
                sleep 60 &
                echo $$! > child.pid
                sleep 60
    """)
    started = time.time()
    result = project.run(check=1)
    assert time.time() - started < 15
    assert "timed out" in result.stdout + result.stderr
    assert project.last_record()["jobs"][0]["exit_code"] == 124
    child = int(project.read("child.pid"))
    wait_for(lambda: not alive(child), timeout=5)


def test_pool_caps_concurrency(project):
    stages = "".join(f"""
stage s{i}:
    pool: heavy
    out: s{i}.txt
    run: echo start $$(date +%s.%N) >> spans.log; sleep 0.2; echo end $$(date +%s.%N) >> spans.log; touch $out
""" for i in range(4))
    project.pipefile("pool heavy = 1\n" + stages)
    project.run("-j", "4", check=0)
    events = [line.split() for line in project.read("spans.log").splitlines()]
    depth = peak = 0
    for kind, _ in sorted(events, key=lambda e: float(e[1])):
        depth += 1 if kind == "start" else -1
        peak = max(peak, depth)
    assert peak == 1 and len(events) == 8


def test_three_processes_at_once_run_each_job_exactly_once(project):
    stages = "".join(f"""
stage s{i}:
    in:  src.txt
    out: out/s{i}.txt
    run: echo {i} >> ran.log; sleep 0.{i % 3 + 1}; cp $in $out
""" for i in range(6))
    project.pipefile(stages + """
stage final:
    in: out/s0.txt out/s1.txt out/s2.txt out/s3.txt out/s4.txt out/s5.txt
    out: final.txt
    run: echo final >> ran.log; cat $in > $out
""")
    project.write("src.txt", "x\n")
    processes = [start(project, "-j", "2") for _ in range(3)]
    for process in processes:
        process.communicate(timeout=60)
        assert process.returncode == 0
    ran = project.read("ran.log").split()
    assert sorted(ran) == sorted([str(i) for i in range(6)] + ["final"]), ran
    assert project.ran(project.build()) == set()


def test_a_lock_left_by_a_killed_offbuild_does_not_block(project):
    project.pipefile("""
        stage slow:
            out: out.txt
            run: touch started; sleep 30; echo done > $out
    """)
    process = start(project)
    wait_for(lambda: project.exists("started"))
    process.kill()
    process.communicate(timeout=10)
    (project.root / "started").unlink()
    project.pipefile("""
        stage slow:
            out: out.txt
            run: echo quick > $out
    """)
    started = time.time()
    project.build()
    assert time.time() - started < 10
    assert project.read("out.txt") == "quick\n"


def test_sigkill_of_offbuild_loses_only_running_jobs(project):
    stages = "".join(f"""
stage quick{i}:
    out: q{i}.txt
    run: echo {i} >> ran.log; echo {i} > $out
""" for i in range(4))
    project.pipefile(stages + """
stage slow:
    in: q0.txt q1.txt q2.txt q3.txt
    out: slow.txt
    run: echo slow >> ran.log; touch started; while [ -e hold ]; do sleep 0.05; done; cat $in > $out
""")
    project.write("hold", "")
    process = start(project, "-j", "1")
    wait_for(lambda: project.exists("started"))
    process.kill()
    process.communicate(timeout=10)
    (project.root / "hold").unlink()
    assert project.read("ran.log").split().count("0") == 1
    record = project.build()
    assert project.ran(record) == {"slow"}, "finished jobs were saved as they finished"
    assert project.ran(project.build()) == set()


NETWORK_PIPEFILE = """
stage call:
    out: reply.txt
    {network}
    run: {python} -c "import socket,sys; s=socket.create_connection(('127.0.0.1', {port}), timeout=3); open('reply.txt','wb').write(s.recv(16))"
"""


@pytest.fixture
def tcp_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except socket.timeout:
                continue
            connection.sendall(b"hello")
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def _can_isolate() -> bool:
    probe = subprocess.run([sys.executable, "-c", "from offbuild.spawner import isolate_network as i; print(i())"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == ""


needs_isolation = pytest.mark.skipif(not _can_isolate(), reason="this system cannot create network namespaces")


@needs_isolation
def test_recipes_cannot_reach_the_network_unless_allowed(project, tcp_server):
    project.pipefile(NETWORK_PIPEFILE.format(network="", python=sys.executable, port=tcp_server))
    result = project.run(check=1)
    assert "network: true" in result.stdout + result.stderr, "the failure hints at network: true"
    assert project.last_record()["offline"] == {"mode": "auto", "isolated": True}
    project.pipefile(NETWORK_PIPEFILE.format(network="network: true", python=sys.executable, port=tcp_server))
    project.build()
    assert project.read("reply.txt") == "hello"


@needs_isolation
def test_offline_off_lets_every_recipe_out(project, tcp_server):
    project.pipefile(NETWORK_PIPEFILE.format(network="", python=sys.executable, port=tcp_server))
    project.build("--offline=off")
    assert project.read("reply.txt") == "hello"


@needs_isolation
def test_loopback_works_inside_the_sandbox(project):
    project.pipefile(f"""
        stage local:
            out: reply.txt
            run: {sys.executable} -c "import socket; a=socket.socket(); a.bind(('127.0.0.1',0)); a.listen(); b=socket.create_connection(a.getsockname()); c,_=a.accept(); c.sendall(b'lo'); open('reply.txt','wb').write(b.recv(2))"
    """)
    project.build()
    assert project.read("reply.txt") == "lo"


def test_lint_lists_python_scripts_importing_network_modules(project):
    project.write("fetch.py", "import json\nfrom urllib.request import urlopen\n")
    project.write("calm.py", "import json\n")
    project.pipefile(f"""
        stage fetch:
            out: a.txt
            run: {sys.executable} fetch.py
        stage allowed:
            network: true
            out: b.txt
            run: {sys.executable} fetch.py
        stage calm:
            out: c.txt
            run: {sys.executable} calm.py
    """)
    result = project.run("--lint", check=1)
    assert "fetch.py:2: imports 'urllib.request' but stage 'fetch'" in result.stdout
    assert "allowed" not in result.stdout and "calm" not in result.stdout


def test_a_checkpoint_stage_retry_resumes_from_its_checkpoint(project):
    project.write("upper.py", RESUMABLE.replace(
        'time.sleep(float(os.environ.get("DELAY", "0")))',
        'time.sleep(0)\n        if number == 5 and os.environ["OFFBUILD_ATTEMPT"] == "1": sys.exit(75)'))
    project.pipefile(RESUMABLE_PIPEFILE.format(python=sys.executable).replace(
        "checkpoint: true", "checkpoint: true\n    retries: 2\n    backoff: 0.05s"))
    project.write("src.txt", "".join(f"line {i}\n" for i in range(12)))
    record = project.build()
    assert [a["exit_code"] for a in record["jobs"][0]["attempts"]] == [75, 0]
    log = project.read(".offbuild/logs/upper.log")
    assert "starting at line 1\n" in log and "starting at line 6\n" in log
    assert project.read("out.txt") == project.read("src.txt").upper()


def test_recipes_inherit_no_descriptor_and_no_ignored_signal(project):
    """The spawner starts recipes with posix_spawn: only stdin, stdout and stderr are passed on, and
    SIGPIPE is back to its default (so `yes | head` ends) though Python and the spawner ignore it."""
    project.pipefile("""
        stage probe:
            out: fds.txt first.txt
            run: |
                python3 -c "import os; print(sorted(map(int, os.listdir('/proc/self/fd'))))" > $out0
                yes | head -1 > $out1
    """.replace("run: |\n", "run:\n"))
    project.run(check=0, timeout=30)
    assert project.read("fds.txt").strip() == "[0, 1, 2, 3]"  # 3: the listing's own
    assert project.read("first.txt") == "y\n"
