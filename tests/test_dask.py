"""`--executor dask` end to end: a real scheduler and two real workers on 127.0.0.1, the real
`offbuild` command. Worker "alpha" offers the resource `heavy=1`, worker "beta" none."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import alive

distributed = pytest.importorskip("distributed", reason="needs dask[distributed]: pip install -e '.[dask]'")

REPO = Path(__file__).resolve().parent.parent
WORKERS = {"alpha": "heavy=1", "beta": ""}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


class Cluster:
    """A `dask scheduler` and named `dask worker` processes (no nanny: the worker is the process)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        self.processes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.folder / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(argv, cwd=self.folder, env=self.env, stdout=log, stderr=log,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self) -> None:
        port = self.address.rsplit(":", 1)[1]
        # A task survives one dead worker; the second makes Dask give up on it (KilledWorker).
        self.env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "1"
        self._start("scheduler", ["dask", "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"])
        self.ensure_workers()

    def ensure_workers(self) -> None:
        """Every worker of WORKERS running and connected (a test may have killed one)."""
        for name, resources in WORKERS.items():
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                self._start(name, ["dask", "worker", self.address, "--name", name, "--nworkers", "1",
                                   "--nthreads", "2", "--no-nanny", "--no-dashboard",
                                   "--local-directory", str(self.folder / name)]
                            + (["--resources", resources] if resources else []))
        with distributed.Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(len(WORKERS), timeout=60)

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()

    def stop(self) -> None:
        """Workers first (a worker whose scheduler is gone lingers, retrying), then the scheduler."""
        workers = [process for name, process in self.processes.items() if name != "scheduler"]
        for group in (workers, [self.processes["scheduler"]]):
            for process in group:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
            for process in group:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("dask-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(dask_cluster) -> Cluster:
    dask_cluster.ensure_workers()
    return dask_cluster


def on(cluster: Cluster, *args: str) -> list[str]:
    return ["--executor", "dask", "--scheduler", cluster.address, *args]


def workers_of(record: dict) -> dict[str, str]:
    return {job["stage"]: job.get("worker") for job in record["jobs"]}


def test_pipeline_builds_through_the_cluster_and_the_next_build_is_a_noop(project, cluster):
    project.write("data/a.txt", "alpha\n")
    project.write("data/b.txt", "beta\n")
    project.pipefile("""
        stage shout:
            in:  data/%.txt
            out: work/%.up
            run: tr a-z A-Z < $in > $out
        stage join:
            in:  work/*.up
            out: all.txt
            run: cat $in > $out
        stage count:
            in:  all.txt
            out: count.txt
            run: wc -l < $in | tr -d ' ' > $out; echo "counted on $$OFFBUILD_WORKER"
        """)
    record = project.build(*on(cluster, "-j", "4"))
    assert project.read("all.txt") == "ALPHA\nBETA\n" and project.read("count.txt") == "2\n"
    assert project.ran(record) == {"shout[a]", "shout[b]", "join", "count"}
    assert set(workers_of(record).values()) <= set(WORKERS) and None not in workers_of(record).values()
    assert record["offline"]["executor"] == "dask"
    assert "counted on" in project.read(".offbuild/logs/count.log")

    assert project.ran(project.build(*on(cluster))) == set()
    project.write("data/b.txt", "gamma\n")
    assert project.ran(project.build(*on(cluster))) == {"shout[b]", "join", "count"}
    assert project.read("all.txt") == "ALPHA\nGAMMA\n"


def test_jobs_spread_over_both_workers(project, cluster):
    project.pipefile("".join(f"""
stage s{i}:
    out: out/{i}.txt
    run: sleep 0.3; echo "$$OFFBUILD_WORKER" > $out
""" for i in range(8)))
    record = project.build(*on(cluster, "-j", "8"))
    workers = workers_of(record)
    assert len(workers) == 8 and set(workers.values()) == set(WORKERS)
    for i in range(8):  # the record names the worker the recipe really ran on
        assert project.read(f"out/{i}.txt").strip() == workers[f"s{i}"]


def test_a_failing_job_fails_the_build_and_shows_its_output_as_locally(project, cluster):
    project.pipefile("""
        stage bad:
            out: bad.txt
            run: echo partial > $out; echo "oops from the recipe"; exit 3
        stage good:
            in:  bad.txt
            out: good.txt
            run: cp $in $out
        stage other:
            out: other.txt
            run: sleep 0.5; echo fine > $out
        """)
    result = project.run(*on(cluster, "-j", "1", "bad"), check=1)
    assert "oops from the recipe" in result.stdout and "exit code 3" in result.stdout
    assert "log: .offbuild/logs/bad.log" in result.stdout
    assert project.read(".offbuild/logs/bad.log") == "oops from the recipe\n"
    assert not project.exists("bad.txt")  # a failed job's outputs are deleted, as locally
    remote_log = project.read(".offbuild/logs/bad.log")

    project.run("--executor", "local", "bad", check=1)
    assert project.read(".offbuild/logs/bad.log") == remote_log

    project.run(*on(cluster, "-k"), check=1)
    record = project.last_record()
    actions = {job["stage"]: job["action"] for job in record["jobs"]}
    assert actions == {"bad": "failed", "good": "blocked", "other": "ran"} and project.read("other.txt") == "fine\n"
    assert record["counts"]["failed"] == 1


def test_a_timed_out_recipe_group_is_killed_on_the_worker(project, cluster):
    project.pipefile("""
        stage slow:
            out: slow.txt
            timeout: 1s
            run: sleep 30 & echo $$! > child.pid; echo $$$$ > shell.pid; sleep 30
        """)
    started = time.monotonic()
    result = project.run(*on(cluster), check=1, timeout=30)
    assert time.monotonic() - started < 15
    assert "timed out after 1s" in result.stdout
    job = project.last_record()["jobs"][0]
    assert job["attempts"][0]["timed_out"] is True and job["exit_code"] == 124
    for pid_file in ("shell.pid", "child.pid"):
        pid = int(project.read(pid_file))
        wait_for(lambda: not alive(pid), timeout=5)


def test_retries_and_retry_on_behave_as_locally(project, cluster):
    project.pipefile("""
        stage flaky:
            out: flaky.txt
            retries: 3
            backoff: 0.1s
            retry-on: 75
            run: echo "try $$OFFBUILD_ATTEMPT" >> tries; [ "$$OFFBUILD_ATTEMPT" -ge 2 ] || exit 75; echo ok > $out
        stage fatal:
            out: fatal.txt
            retries: 3
            backoff: 0.1s
            retry-on: 75
            run: exit 9
        """)
    project.run(*on(cluster, "-k"), check=1)
    jobs = {job["stage"]: job for job in project.last_record()["jobs"]}
    assert [a["exit_code"] for a in jobs["flaky"]["attempts"]] == [75, 0] and jobs["flaky"]["action"] == "ran"
    assert project.read("tries") == "try 1\ntry 2\n"
    assert "retrying in" in project.read(".offbuild/logs/flaky.log")
    assert [a["exit_code"] for a in jobs["fatal"]["attempts"]] == [9]  # 9 is not in retry-on


def test_a_checkpoint_stage_gets_its_checkpoint_and_resumes_from_it(project, cluster):
    project.pipefile("""
        stage resume:
            out: resumed.txt
            checkpoint: true
            retries: 1
            backoff: 0.1s
            run:
                echo "$$OFFBUILD_CHECKPOINT" > where.txt
                if [ -f "$$OFFBUILD_CHECKPOINT" ]; then cat "$$OFFBUILD_CHECKPOINT" > $out; exit 0; fi
                echo "saved by attempt $$OFFBUILD_ATTEMPT" > "$$OFFBUILD_CHECKPOINT"
                exit 3
        """)
    record = project.build(*on(cluster))
    assert [a["exit_code"] for a in record["jobs"][0]["attempts"]] == [3, 0]
    assert project.read("resumed.txt") == "saved by attempt 1\n"
    checkpoint = Path(project.read("where.txt").strip())
    assert checkpoint.parent == project.root / ".offbuild" / "checkpoints" and not checkpoint.exists()


def test_recipes_are_offline_on_the_workers(project, cluster):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    connect = f"{sys.executable} -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3)\""
    try:
        project.pipefile(f"""
stage closed:
    out: closed.txt
    run: {connect}; echo reached > $out
stage open:
    out: open.txt
    network: true
    run: {connect}; echo reached > $out
""")
        result = project.run(*on(cluster, "-k"))
    finally:
        server.close()
    record = project.last_record()
    offline = record["offline"]
    assert project.exists("open.txt")
    if offline["isolated"] is False:  # this machine's workers cannot isolate: the record must say so
        assert offline["reason"] and result.returncode == 0
        pytest.skip(f"workers cannot isolate here: {offline['reason']}")
    assert offline["isolated"] is True and result.returncode == 1
    assert not project.exists("closed.txt")
    assert "network: true" in result.stdout  # the hint, as locally
    assert set(offline["workers"].values()) == {True}


def test_offline_strict_runs_when_the_workers_can_isolate(project, cluster):
    project.pipefile("""
        stage a:
            out: a.txt
            run: echo a > $out
        """)
    result = project.run(*on(cluster, "--offline=strict"))
    if result.returncode == 2:  # cannot isolate here: strict must refuse before running anything
        assert "--offline=strict" in result.stderr and not project.exists("a.txt")
    else:
        assert result.returncode == 0 and project.last_record()["offline"]["isolated"] is True


def test_a_lost_worker_means_its_job_is_retried_on_the_other(project, cluster):
    project.pipefile("""
        stage long:
            out: long.txt
            run: echo "$$OFFBUILD_WORKER $$$$" >> ran.txt; echo "on $$OFFBUILD_WORKER"; sleep 3; echo "$$OFFBUILD_WORKER" > $out
        """)
    build = subprocess.Popen([sys.executable, "-m", "offbuild", *on(cluster), "--json"], cwd=project.root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: project.exists("ran.txt") and project.read("ran.txt").endswith("\n"))
        victim, pid = project.read("ran.txt").split()
        cluster.kill(victim)
        stdout, stderr = build.communicate(timeout=60)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 0, stderr
    assert "Traceback" not in stderr and "distributed" not in stderr  # no noise from Dask's logging
    survivor = next(name for name in WORKERS if name != victim)
    first, second = project.read("ran.txt").splitlines()
    assert second.split()[0] == survivor and project.read("long.txt") == f"{survivor}\n"
    assert json.loads(stdout)["jobs"][0]["worker"] == survivor
    assert project.read(".offbuild/logs/long.log") == f"on {survivor}\n"  # not the dead run's output too
    wait_for(lambda: not alive(int(pid)), timeout=5)  # the recipe died with its worker


def test_a_job_whose_workers_all_die_fails_with_dasks_reason(project, cluster):
    project.pipefile("""
        stage doomed:
            out: doomed.txt
            run: echo "$$OFFBUILD_WORKER" >> ran.txt; sleep 30
        """)
    build = subprocess.Popen([sys.executable, "-m", "offbuild", *on(cluster)],
                             cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for count in (1, 2):
            wait_for(lambda: project.exists("ran.txt") and len(project.read("ran.txt").splitlines()) == count)
            cluster.kill(project.read("ran.txt").splitlines()[-1])
        stdout, stderr = build.communicate(timeout=30)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 1, stdout + stderr
    assert "Dask gave up on it: 2 workers died while running it" in stdout
    assert project.last_record()["jobs"][0]["exit_code"] == 137


def test_a_pool_stage_runs_only_on_the_worker_with_the_resource(project, cluster):
    for stem in "abcd":
        project.write(f"in/{stem}.txt", stem)
    project.pipefile("""
        pool heavy = 2
        stage big:
            in:  in/%.txt
            out: out/%.txt
            pool: heavy
            run: sleep 0.2; echo "$$OFFBUILD_WORKER" > $out
        """)
    record = project.build(*on(cluster, "-j", "4"))
    assert set(workers_of(record).values()) == {"alpha"} and len(record["jobs"]) == 4


def test_a_pool_no_worker_offers_fails_clearly_instead_of_hanging(project, cluster):
    project.pipefile("""
        pool gpu = 1
        stage train:
            out: model.bin
            pool: gpu
            run: echo trained > $out
        """)
    result = project.run(*on(cluster), check=1, timeout=30)
    assert "no Dask worker offers the resource 'gpu'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_interrupting_offbuild_stops_the_remote_recipes(project, cluster):
    project.pipefile("""
        stage long:
            out: long.txt
            run: echo $$$$ > pid; sleep 30
        """)
    build = subprocess.Popen([sys.executable, "-m", "offbuild", *on(cluster)], cwd=project.root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: project.exists("pid") and project.read("pid").endswith("\n"))
        build.send_signal(signal.SIGTERM)
        stdout, stderr = build.communicate(timeout=20)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 130, stdout + stderr
    assert project.last_record()["status"] == "interrupted"
    wait_for(lambda: not alive(int(project.read("pid"))), timeout=5)


def test_the_scheduler_may_come_from_the_environment(project, cluster):
    project.pipefile("""
        stage a:
            out: a.txt
            run: echo "$$OFFBUILD_WORKER" > $out
        """)
    record = project.build("--executor", "dask", env={"OFFBUILD_SCHEDULER": cluster.address})
    assert record["jobs"][0]["worker"] in WORKERS


@pytest.mark.slow  # the client gives the scheduler 5 s to answer
def test_an_unreachable_scheduler_is_a_usage_error(project):
    project.pipefile("""
        stage a:
            out: a.txt
            run: echo a > $out
        """)
    result = project.run("--executor", "dask", "--scheduler", f"tcp://127.0.0.1:{free_port()}", check=2)
    assert "offbuild: error: cannot reach the Dask scheduler" in result.stderr
    assert "Traceback" not in result.stderr and not project.exists("a.txt")


def test_executor_dask_without_a_scheduler_is_a_usage_error(project):
    project.pipefile("""
        stage a:
            out: a.txt
            run: echo a > $out
        """)
    env = {"OFFBUILD_SCHEDULER": ""}
    result = project.run("--executor", "dask", check=2, env=env)
    assert "--executor dask needs --scheduler" in result.stderr
    result = project.run("--scheduler", "tcp://127.0.0.1:8786", check=2, env=env)
    assert "--scheduler is for --executor dask" in result.stderr


def test_without_the_dask_extra_executor_dask_is_a_usage_error(project):
    project.write("fake/distributed/__init__.py",
                  "raise ModuleNotFoundError(\"No module named 'distributed'\", name='distributed')\n")
    project.pipefile("""
        stage a:
            out: a.txt
            run: echo a > $out
        """)
    pythonpath = os.pathsep.join([str(project.root / "fake"), str(REPO)])
    result = project.run("--executor", "dask", "--scheduler", "tcp://127.0.0.1:8786", check=2,
                         env={"PYTHONPATH": pythonpath})
    assert "pip install 'offbuild[dask]'" in result.stderr and "Traceback" not in result.stderr


def test_version_and_builds_without_dask_never_import_it(project):
    project.pipefile("""
        stage a:
            out: a.txt
            run: echo a > $out
        """)
    project.build()
    for args in (["--version"], [], ["-v"]):  # the fast no-op, then the full path
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "offbuild", *args], cwd=project.root,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
        assert not imported & {"dask", "distributed"}, args


def test_a_killed_offbuild_leaves_no_recipe_running_on_the_workers(project, cluster):
    project.pipefile("""
        stage long:
            out: long.txt
            run: echo $$$$ > pid; sleep 30
        """)
    build = subprocess.Popen([sys.executable, "-m", "offbuild", *on(cluster)], cwd=project.root,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: project.exists("pid") and project.read("pid").endswith("\n"))
    finally:
        build.kill()  # SIGKILL: no chance to tell anyone; the scheduler releases its tasks
        build.wait()
    wait_for(lambda: not alive(int(project.read("pid"))), timeout=10)


def test_watch_mode_rebuilds_through_the_cluster(project, cluster):
    project.write("data/a.txt", "apple\n")
    project.pipefile("""
        stage up:
            in:  data/a.txt
            out: out/a.up
            run: tr a-z A-Z < $in > $out
        """)
    watch = subprocess.Popen([sys.executable, "-m", "offbuild", "--watch", *on(cluster)], cwd=project.root,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(watch.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(line.startswith("offbuild: watching") for line in lines))
        assert project.read("out/a.up") == "APPLE\n"
        project.write("data/a.txt", "apricot\n")
        wait_for(lambda: project.read("out/a.up") == "APRICOT\n")
        wait_for(lambda: sum(line.startswith("offbuild: done") for line in lines) == 2)
        assert project.last_record()["jobs"][0]["worker"] in WORKERS
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=20)
    finally:
        if watch.poll() is None:
            watch.kill()
    reader.join(timeout=5)
    assert watch.returncode == 130, "".join(lines)
