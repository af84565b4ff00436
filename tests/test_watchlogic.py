"""Unit tests of watch mode's decisions, with fake events and a fake clock (no watchdog, no threads)."""
from __future__ import annotations

import textwrap
import time

import pytest

from offbuild.graph import build_graph
from offbuild.model import Location, PathSpec
from offbuild.parser import load_pipefile
from offbuild.watchlogic import (FOLDER, Change, Debouncer, EventKind, FsEvent, WatchSet, header, is_noise,
                                 new_folders, settle, watch_set_for)

CREATED, MODIFIED, DELETED, LOST = EventKind.CREATED, EventKind.MODIFIED, EventKind.DELETED, EventKind.LOST


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ev(path: str, kind: EventKind = MODIFIED, is_dir: bool = False) -> FsEvent:
    return FsEvent(path, kind, is_dir)


@pytest.mark.parametrize("path", [
    ".git/index", "sub/.git/HEAD", ".offbuild/state.db", ".offbuild/logs/a.log", "rules/__pycache__/x.pyc",
    "data/.a.txt.swp", "data/.a.txt.swo", "data/a.txt~", "data/.#a.txt", "data/#a.txt#", "data/4913",
    "data/a.txt___jb_tmp___", "data/.goutputstream-ABC123", "data/a.txt.kate-swp",
])
def test_noise(path):
    assert is_noise(path)


@pytest.mark.parametrize("path", ["data/a.txt", "Pipefile", "data/swp", "data/4913.txt", "git/index",
                                  "data/a.swp", "offbuild/x"])
def test_not_noise(path):
    assert not is_noise(path)


def test_debouncer_waits_for_quiet_then_gives_first_event_per_path():
    clock = FakeClock()
    debouncer = Debouncer(quiet=0.05, longest=1.0, clock=clock)
    assert debouncer.wait_time() is None and debouncer.take() == []
    debouncer.add(ev("a.tmp", CREATED))
    clock.now += 0.01
    debouncer.add(ev("a.tmp", MODIFIED))
    debouncer.add(ev("a.txt", CREATED))
    assert debouncer.wait_time() == pytest.approx(0.05)
    clock.now += 0.049
    assert debouncer.take() == []  # not quiet long enough yet
    clock.now += 0.001
    assert debouncer.wait_time() == 0
    assert debouncer.take() == [ev("a.tmp", CREATED), ev("a.txt", CREATED)]
    assert debouncer.wait_time() is None


def test_debouncer_gives_up_waiting_for_quiet_after_longest():
    clock = FakeClock()
    debouncer = Debouncer(quiet=0.05, longest=1.0, clock=clock)
    for _ in range(40):  # a file appended to every 30 ms, without pause
        debouncer.add(ev("log.txt"))
        clock.now += 0.03
        if debouncer.wait_time() == 0:
            break
    assert clock.now == pytest.approx(101.02)  # due one second after the first event
    assert debouncer.take() == [ev("log.txt")]


def test_debouncer_keeps_lost_events():
    debouncer = Debouncer(clock=FakeClock())
    debouncer.add(ev("a.txt"))
    debouncer.add(FsEvent("", LOST))
    debouncer.clock.now += 1
    assert [e.kind for e in debouncer.take()] == [MODIFIED, LOST]


WATCH = dict(files={"Pipefile", "data/a.txt", "data/b.txt"}, trees={"assets"},
             globs={"notes/*.md", "chapters/**.txt"}, written={"out", "work/a.up", "notes/index.md"})


def test_relevance_of_file_events():
    watch = WatchSet(**WATCH)
    relevant = [path for path in ("Pipefile", "data/a.txt", "assets/logo.png", "assets/deep/x.css", "notes/new.md",
                                  "chapters/one.txt", "chapters/part/two.txt")
                if watch.relevant(ev(path))]
    assert len(relevant) == 7
    irrelevant = ["data/c.txt", "notes/sub/x.md", "notes/index.md", "work/a.up", "out/report.txt",
                  "out/deep/file.md", "data/.a.txt.swp", ".offbuild/state.db", "chapters/x.doc", "README.md"]
    assert [path for path in irrelevant if watch.relevant(ev(path))] == []


def test_a_source_inside_an_output_folder_stays_relevant():
    watch = WatchSet(files={"site/config.toml"}, written={"site"})
    assert watch.relevant(ev("site/config.toml"))
    assert not watch.relevant(ev("site/index.html"))


def test_relevance_of_folder_events():
    watch = WatchSet(**WATCH)
    # Deleting a folder holding sources deletes them; creating one a glob reads is a new place to look.
    assert watch.relevant(ev("data", DELETED, is_dir=True))
    assert watch.relevant(ev("assets/sub", DELETED, is_dir=True))
    assert watch.relevant(ev("notes", CREATED, is_dir=True))
    assert watch.relevant(ev("chapters", CREATED, is_dir=True))
    assert not watch.relevant(ev("notes", DELETED, is_dir=True))  # its files report their own deletion
    assert not watch.relevant(ev("out", CREATED, is_dir=True))  # offbuild makes output folders
    assert not watch.relevant(ev("other", CREATED, is_dir=True))
    assert watch.relevant(ev("", LOST))


def test_roots_watch_parents_trees_and_glob_folders():
    watch = WatchSet(files={"Pipefile", "data/a.txt", "data/b.txt", "assets/inner/x.txt", "missing/deep/c.txt"},
                     trees={"assets"}, globs={"notes/*.md", "chapters/**.txt", "*.cfg", "lib/**/x.py"})
    existing = {".", "data", "assets", "assets/inner", "notes", "chapters", "lib", "missing"}
    assert watch.roots(lambda path: path in existing) == [
        (".", False),  # the Pipefile and *.cfg
        ("assets", True),  # a folder input: its whole tree (assets/inner is inside it)
        ("chapters", True),  # `**` reaches into subfolders
        ("data", False),
        ("lib", True),
        ("missing", False),  # missing/deep does not exist yet: watch where it will appear
        ("notes", False),  # `*` stays in one folder
    ]


def test_settle_drops_same_content_and_reports_real_changes():
    watch = WatchSet(**WATCH, digests={"data/a.txt": "A1", "data/b.txt": "B1", "Pipefile": "P1"})
    disk = {"data/a.txt": "A1", "data/b.txt": "B2", "notes/new.md": "N"}
    changes = settle([ev("data/a.txt"), ev("data/b.txt"), ev("notes/new.md", CREATED), ev("Pipefile", DELETED)],
                     watch, disk.get)
    assert changes == [Change("data/b.txt", "changed"), Change("notes/new.md", "added"),
                       Change("Pipefile", "deleted")]
    # What was reported is remembered: the same events again amount to nothing.
    assert settle([ev("data/b.txt"), ev("notes/new.md")], watch, disk.get) == []


def test_settle_sees_an_atomic_replace_as_one_change():
    watch = WatchSet(**WATCH, digests={"data/a.txt": "A1"})
    disk = {"data/a.txt": "A2"}  # the temporary file is gone by the time the burst settles
    burst = [ev("data/.a.txt.tmp", CREATED), ev("data/.a.txt.tmp"), ev("data/.a.txt.tmp", DELETED),
             ev("data/a.txt", CREATED)]
    assert settle(burst, watch, disk.get) == [Change("data/a.txt", "changed")]


def test_settle_ignores_files_that_came_and_went_and_irrelevant_ones():
    watch = WatchSet(**WATCH)
    assert settle([ev("notes/draft.md", CREATED), ev("out/x.md", CREATED), ev("data/a.txt~", CREATED)],
                  watch, {}.get) == []


def test_settle_of_unknown_sources_and_folders():
    watch = WatchSet(**WATCH)  # nothing remembered: any event on a source means a pass
    disk = {"data/a.txt": "A", "assets/new": FOLDER}
    assert settle([ev("data/a.txt"), ev("data/b.txt", DELETED)], watch, disk.get) == [
        Change("data/a.txt", "changed"), Change("data/b.txt", "deleted")]
    assert settle([ev("assets/new", CREATED, is_dir=True)], watch, disk.get) == []  # a place, not a change
    assert new_folders([ev("assets/new", CREATED, is_dir=True), ev("other", CREATED, is_dir=True)], watch) == [
        "assets/new"]


def test_settle_lost_events_mean_everything():
    assert settle([ev("README.md"), FsEvent("", LOST)], WatchSet(), {}.get) == [Change("", "lost")]


def test_header():
    at = time.mktime((2026, 1, 2, 14, 3, 7, 0, 0, -1))
    assert header([Change("data/a.txt", "changed")], at) == "[14:03:07] data/a.txt changed"
    many = [Change(f"n/{i}.md", "added") for i in range(5)]
    assert header(many, at) == "[14:03:07] n/0.md added, n/1.md added, n/2.md added and 2 more"
    assert header([Change("", "lost")], at) == "[14:03:07] events were lost, looking at everything"


def test_watch_set_for_a_loaded_graph(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Pipefile").write_text(textwrap.dedent("""
        stage copy:
            in:  data/a.txt assets
            out: work/a.txt
            run: cp $in0 $out

        stage shout:
            in:  notes/%.md
            out: loud/%.md
            run: tr a-z A-Z < $in > $out

        stage report:
            in:  work/a.txt loud/*.md
            out: report.txt
            run: cat $in > $out

        stage other:
            in:  data/other.txt
            out: other.txt
            run: cp $in $out
        """))
    for path in ("data/a.txt", "data/other.txt", "assets/logo.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    graph = build_graph(load_pipefile(str(tmp_path / "Pipefile"), "Pipefile", {}))
    order = graph.select([PathSpec("report", Location("<test>", 0, 0))])
    assert set(order) == {"copy", "report"}  # no notes yet: `shout` has no job
    watch = watch_set_for(graph, order, ["Pipefile"], ["old/output.txt"], lambda path: (tmp_path / path).is_dir())
    assert watch.files == {"Pipefile", "data/a.txt"}  # data/other.txt: not selected
    assert watch.trees == {"assets"}
    assert set(watch.globs) == {"loud/*.md", "notes/**.md"}  # `shout`'s pattern: a first note makes a job
    assert watch.written == {"work/a.txt", "report.txt", "other.txt", "old/output.txt"}
    assert watch.relevant(ev("notes/first.md", CREATED))
    assert not watch.relevant(ev("data/other.txt"))
