"""LocalExecutor unit tests: offline modes with a spawner that cannot isolate, retries, env."""
from __future__ import annotations

import pytest

from offbuild.errors import OffbuildError
from offbuild.executor import LocalExecutor, recipe_command
from offbuild.model import Job, Location, Stage
from offbuild.sandbox import Spawner


class NoNamespaceSpawner(Spawner):
    """A real spawner that reports what a system without network namespaces reports."""

    def __init__(self, isolate: bool, slots=None):
        super().__init__(False, slots)
        if isolate:
            self.isolated, self.reason = False, "unshare failed: Operation not permitted"


def job(recipe: str, **stage_fields) -> Job:
    stage = Stage(name="j", location=Location("Pipefile", 1, 1), recipe=(recipe,), **stage_fields)
    return Job(name="j", stage=stage, inputs=(), outputs=(), recipe=recipe)


def executor(tmp_path, offline, warnings):
    return LocalExecutor(str(tmp_path), str(tmp_path / ".offbuild"), "run-1", offline=offline,
                         warn=warnings.append, spawner_factory=NoNamespaceSpawner)


def test_auto_warns_once_and_records_that_isolation_was_missing(tmp_path):
    warnings: list[str] = []
    runner = executor(tmp_path, "auto", warnings)
    try:
        assert runner.run(job("true")).ok and runner.run(job("true")).ok
    finally:
        runner.close()
    assert len(warnings) == 1 and "NOT network-isolated" in warnings[0]
    assert runner.offline_status() == {"mode": "auto", "isolated": False,
                                       "reason": "unshare failed: Operation not permitted"}


def test_strict_refuses_to_run_without_isolation(tmp_path):
    runner = executor(tmp_path, "strict", [])
    try:
        with pytest.raises(OffbuildError, match="--offline=strict"):
            runner.spawner(isolate=True)
    finally:
        runner.close()


def test_off_never_asks_for_isolation(tmp_path):
    warnings: list[str] = []
    runner = executor(tmp_path, "off", warnings)
    try:
        assert runner.run(job("true")).ok
    finally:
        runner.close()
    assert warnings == [] and runner.offline_status() == {"mode": "off"}


def test_retry_attempts_and_exit_codes(tmp_path):
    runner = executor(tmp_path, "off", [])
    try:
        result = runner.run(job("echo x >> n; [ $(wc -l < n) -ge 2 ] || exit 9", retries=2, backoff=0.01))
    finally:
        runner.close()
    assert result.ok and [a.exit_code for a in result.attempts] == [9, 0]
    assert "retrying" in result.output()


def test_death_by_signal_is_128_plus_n(tmp_path):
    runner = executor(tmp_path, "off", [])
    try:
        result = runner.run(job("kill -TERM $$"))
    finally:
        runner.close()
    assert result.exit_code == 143


def test_the_spawner_gives_each_recipe_exactly_its_environment(tmp_path):
    """The spawner is sent the whole environment once, then only changes: each recipe must still
    see exactly its own (values changed, added and removed between requests)."""
    spawner = Spawner(isolate=False)
    envs = [{"PATH": "/usr/bin:/bin", "A": "1", "B": "2"}, {"PATH": "/usr/bin:/bin", "A": "one", "C": "3"},
            {"PATH": "/usr/bin:/bin"}, {"PATH": "/usr/bin:/bin", "B": "2"}]
    try:
        for number, env in enumerate(envs):
            log = tmp_path / f"{number}.log"
            process = spawner.start(["sh", "-c", "env | grep -E '^(A|B|C)=' | sort"], str(tmp_path), env, str(log))
            assert process.wait(timeout=10) == 0
            expected = sorted(f"{name}={value}" for name, value in env.items() if name in "ABC")
            assert (log.read_text() if log.exists() else "").split() == expected  # no output: no log
    finally:
        spawner.close()


@pytest.mark.parametrize("recipe, direct", [
    ("cp src/a.txt out/a.txt", ["cp", "src/a.txt", "out/a.txt"]),
    ("  python3 rules/x.py --size=3 a,b:c@d%e+f  ", ["python3", "rules/x.py", "--size=3", "a,b:c@d%e+f"]),
    ("dd if=a of=b", ["dd", "if=a", "of=b"]),
    ("cp 'a b' c", None), ('cp "a" b', None), ("cp $HOME b", None), ("cp a* b", None), ("cp a?.txt b", None),
    ("cat a > b", None), ("cat < a", None), ("a | b", None), ("a; b", None), ("a && b", None), ("a &", None),
    ("cp ~/a b", None), ("cp a b # note", None), ("cp a\\ b c", None), ("cp [ab] c", None), ("cp {a,b} c", None),
    ("cp a b\ncp c d", None), ("FOO=1 make", None), ("cd sub", None), ("echo -e x", None), ("test -f a", None),
    ("exit 3", None), ("true", None), ("export A", None), ("", None),
])
def test_plain_recipes_run_without_a_shell_and_the_rest_with_one(recipe, direct):
    argv, variables = recipe_command(recipe, "/project")
    if direct is None:
        assert argv == ["sh", "-e", "-c", recipe] and variables == {}
    else:
        assert argv == direct and variables == {"PWD": "/project"}


def test_job_slots_can_always_be_given_back_however_the_pipe_pages_fragment():
    """Taking a byte frees no pipe page until its page is empty: with the pipe full, giving a slot
    back would block the spawner for ever (it did, at -j 65536). The most slots never come close."""
    import os

    from offbuild.sandbox import JobSlots

    slots = JobSlots.open(JobSlots.MOST)
    try:
        os.set_blocking(slots.write_fd, False)  # a give-back that would block raises instead
        for _ in range(3 * JobSlots.MOST):  # every byte through the head page, many times over
            assert os.read(slots.read_fd, 1) == b"+"
            os.write(slots.write_fd, b"+")
    finally:
        slots.close()


def test_a_j_too_large_for_the_slot_pipe_runs_without_slots(tmp_path):
    runner = LocalExecutor(str(tmp_path), str(tmp_path / ".offbuild"), "run-1", offline="off", slots=1_000_000)
    try:
        assert runner.ahead == 0  # offbuild's own cap keeps -j
        assert runner.run(job("true")).exit_code == 0
    finally:
        runner.close()
