"""The spawner's workers (spawner.py, sandbox.Spawner): one queue of requests shared by several
worker processes, each with its own control pipe, and what must hold across them."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from offbuild.sandbox import JobSlots, Spawner


@pytest.fixture
def slots():
    slots = JobSlots.open(2)
    yield slots
    slots.close()


UNTIL_B_STARTS = "while [ ! -e b.started ]; do sleep 0.01; done"


def start(spawner: Spawner, folder: Path, name: str, script: str, **options):
    return spawner.start(["sh", "-c", script], str(folder), dict(os.environ), str(folder / f"{name}.log"),
                         **options)


def workers_of(spawner: Spawner) -> list[int]:
    """The spawner's processes: its own and the workers it forked (not the recipes)."""
    pid = spawner.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    forked = [int(child) for child in children
              if b"offbuild.spawner" in Path(f"/proc/{child}/cmdline").read_bytes()]
    return [pid] + forked


def test_two_workers_run_two_recipes_at_once_and_no_more(tmp_path, slots):
    spawner = Spawner(isolate=False, slots=slots, workers=2)
    try:
        assert len(workers_of(spawner)) == 2
        processes = [start(spawner, tmp_path, f"r{k}", f"date +%s.%N > r{k}.start; sleep 0.3; date +%s.%N > r{k}.end")
                     for k in range(6)]
        assert [process.wait(timeout=20) for process in processes] == [0] * 6
    finally:
        spawner.close()
    events = sorted([(float((tmp_path / f"r{k}.start").read_text()), 1) for k in range(6)]
                    + [(float((tmp_path / f"r{k}.end").read_text()), -1) for k in range(6)])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2


def test_a_failure_holds_every_workers_next_recipe_until_withdrawn(tmp_path, slots):
    spawner = Spawner(isolate=False, slots=slots, workers=2)
    try:
        # It fails once the other worker runs the slow one: both workers are then busy.
        failing = start(spawner, tmp_path, "a", f"{UNTIL_B_STARTS}; exit 3")
        slow = start(spawner, tmp_path, "b", "touch b.started; sleep 0.5")
        queued = [start(spawner, tmp_path, name, f"touch {name}") for name in ("c", "d")]
        assert failing.wait(timeout=10) == 3
        assert slow.wait(timeout=10) == 0
        time.sleep(0.3)  # the slow recipe's worker is free: it must still not start one
        assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
        spawner.withdraw()
        assert [process.wait(timeout=10) for process in queued] == [-1, -1]
        assert all(process.dropped for process in queued)
        later = start(spawner, tmp_path, "e", "touch e")  # withdrawn: nothing is held any more
        assert later.wait(timeout=10) == 0 and (tmp_path / "e").exists()
    finally:
        spawner.close()
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_resume_lets_the_held_recipes_start(tmp_path, slots):
    spawner = Spawner(isolate=False, slots=slots, workers=2)
    try:
        failing = start(spawner, tmp_path, "a", f"{UNTIL_B_STARTS}; exit 1")
        slow = start(spawner, tmp_path, "b", "touch b.started; sleep 0.4")
        queued = [start(spawner, tmp_path, name, f"touch {name}") for name in ("c", "d", "e")]
        assert failing.wait(timeout=10) == 1
        assert slow.wait(timeout=10) == 0
        time.sleep(0.2)
        assert not any((tmp_path / name).exists() for name in ("c", "d", "e"))
        spawner.resume()
        assert [process.wait(timeout=10) for process in queued] == [0, 0, 0]
    finally:
        spawner.close()


def test_stopping_a_queued_request_drops_it_and_keeps_the_others_in_order(tmp_path, slots, kind):
    spawner = kind(isolate=False, slots=slots, workers=2)
    try:
        # One slot frees long before the other: the queued ones then run one after the other there.
        busy = [start(spawner, tmp_path, f"busy{k}", f"sleep {seconds}") for k, seconds in enumerate((0.3, 1.5))]
        queued = [start(spawner, tmp_path, name, f"date +%s.%N > {name}") for name in ("c", "d", "e")]
        queued[1].stop(5.0)
        assert queued[1].wait(timeout=5) == -1 and queued[1].dropped
        assert [process.wait(timeout=10) for process in busy + queued[::2]] == [0, 0, 0, 0]
    finally:
        spawner.close()
    assert not (tmp_path / "d").exists()
    assert float((tmp_path / "c").read_text()) <= float((tmp_path / "e").read_text())


def test_stopping_a_running_recipe_reaches_the_worker_that_runs_it(tmp_path, slots):
    spawner = Spawner(isolate=False, slots=slots, workers=2)
    try:
        processes = [start(spawner, tmp_path, f"s{k}", "sleep 30") for k in range(2)]
        time.sleep(0.3)
        for process in processes:
            process.stop(5.0)
        assert [process.wait(timeout=10) for process in processes] == [-signal.SIGTERM] * 2
    finally:
        spawner.close()


class DatagramSpawner(Spawner):
    """The queue as on systems without SOCK_SEQPACKET (macOS), where messages must be small."""

    QUEUE_KIND, LARGEST_MESSAGE = socket.SOCK_DGRAM, 1024


@pytest.fixture(params=["seqpacket", "datagram"])
def kind(request, monkeypatch):
    if request.param == "seqpacket":
        return Spawner
    monkeypatch.delattr(os, "memfd_create")  # big requests then go in a temporary file, as there
    return DatagramSpawner


def test_a_request_too_big_for_one_message_still_arrives_whole(tmp_path, slots, kind):
    spawner = kind(isolate=False, slots=slots, workers=2)
    argument = "x" * 98304  # three times the largest message (one argument may not pass 128 KiB)
    try:
        process = spawner.start(["sh", "-c", 'printf %s "$1" | wc -c', "sh", argument], str(tmp_path),
                                dict(os.environ), str(tmp_path / "big.log"))
        assert process.wait(timeout=10) == 0
    finally:
        spawner.close()
    assert int((tmp_path / "big.log").read_text()) == len(argument)


def test_every_worker_gets_each_new_environment(tmp_path, slots, kind):
    spawner = kind(isolate=False, slots=slots, workers=2)
    envs = [{"PATH": os.environ["PATH"], "A": str(k)} for k in range(12)]
    try:
        processes = [spawner.start(["sh", "-c", "echo $A"], str(tmp_path), env, str(tmp_path / f"{k}.log"))
                     for k, env in enumerate(envs)]
        assert [process.wait(timeout=10) for process in processes] == [0] * 12
    finally:
        spawner.close()
    assert [(tmp_path / f"{k}.log").read_text().strip() for k in range(12)] == [str(k) for k in range(12)]


def test_a_withdraw_drops_a_request_a_worker_holds_while_it_waits_for_a_slot(tmp_path, slots):
    # Both spawners of a run share the slots: the other one's recipes can keep this one's waiting.
    other = Spawner(isolate=False, slots=slots, workers=2)
    spawner = Spawner(isolate=False, slots=slots, workers=2)
    try:
        busy = [start(other, tmp_path, f"busy{k}", "sleep 0.8") for k in range(2)]
        time.sleep(0.3)
        waiting = start(spawner, tmp_path, "w", "touch w")
        time.sleep(0.2)  # a worker takes it from the queue and waits for a slot
        spawner.withdraw()
        assert waiting.wait(timeout=5) == -1 and waiting.dropped
        assert [process.wait(timeout=10) for process in busy] == [0, 0]
    finally:
        spawner.close()
        other.close()
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("victim", ["first", "forked"])
def test_when_a_worker_dies_the_spawner_ends_and_every_request_reports(tmp_path, slots, victim):
    spawner = Spawner(isolate=False, slots=slots, workers=2)
    try:
        processes = [start(spawner, tmp_path, f"s{k}", f"echo $$ > s{k}.pid; exec sleep 30") for k in range(2)]
        queued = start(spawner, tmp_path, "q", "touch q")
        deadline = time.monotonic() + 10
        while not all((tmp_path / f"s{k}.pid").exists() for k in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        first, forked = workers_of(spawner)
        os.kill(first if victim == "first" else forked, signal.SIGKILL)
        codes = [process.wait(timeout=10) for process in processes + [queued]]
        assert codes[2] == 255 or queued.dropped  # never started, and not left waiting for ever
        with pytest.raises(Exception):
            start(spawner, tmp_path, "late", "true").wait(timeout=5)
    finally:
        for k in range(2):  # a killed worker's recipe outlives it (as a killed spawner's always did)
            try:
                os.killpg(int((tmp_path / f"s{k}.pid").read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        spawner.close()
    assert not (tmp_path / "q").exists()


def test_a_full_queue_never_blocks_offbuild_while_a_failure_holds_the_workers(tmp_path, slots):
    # While a failure holds them, the workers take every request (to start or drop at offbuild's
    # word); else offbuild, blocked sending to a full queue, could never send that word.
    spawner = Spawner(isolate=False, slots=slots, workers=2)
    padding = "x" * (Spawner.LARGEST_MESSAGE - 1000)  # the biggest that still goes as a message
    sent = []
    try:
        assert start(spawner, tmp_path, "f", "exit 1").wait(timeout=10) == 1
        sender = threading.Thread(target=lambda: sent.extend(
            start(spawner, tmp_path, f"q{k}", f"touch q{k} # {padding}") for k in range(400)), daemon=True)
        sender.start()  # 400 x 31 KB: more than any socket buffer holds
        sender.join(timeout=30)
        blocked = sender.is_alive()
        if blocked:  # end the spawner, so the blocked send fails and the test can end
            os.killpg(spawner.process.pid, signal.SIGKILL)
            sender.join()
        assert not blocked
        spawner.withdraw()
        assert [process.wait(timeout=10) for process in sent] == [-1] * 400
    finally:
        spawner.close()
    assert not list(tmp_path.glob("q*"))


def test_one_worker_per_core_that_j_can_use_and_no_more_than_the_most(monkeypatch):
    from offbuild import sandbox

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    counts = {}
    for jobs in (1, 3, 100):
        slots = JobSlots.open(jobs)
        counts[jobs] = sandbox._worker_count(slots)
        slots.close()
    assert counts == {1: 1, 3: 3, 100: sandbox.MOST_WORKERS}
    assert sandbox._worker_count(None) == 1  # no slots: every recipe starts at once, in one worker
