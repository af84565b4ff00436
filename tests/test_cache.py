"""The shared output cache (SPEC section 7): end-to-end with the real command, plus unit tests of
offbuild/cache.py. Recipes append their job's name to a marker file outside every checkout, so a
test can tell which recipes really ran."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time

import blake3
import pytest

from offbuild.cache import REFRESH_SECONDS, OutputCache, parse_size, why_not_cached
from offbuild.cachesetting import cache_location
from offbuild.errors import UsageError
from offbuild.model import Job, Location, Stage

PIPELINE = """
stage first:
    in:  src.txt
    out: work/first.txt
    run: echo $stage >> "$$MARK"; tr a-z A-Z < $in > $out

stage second:
    in:  work/first.txt
    out: out/second.txt
    run: echo $stage >> "$$MARK"; cat $in $in > $out

stage tool:
    in:  src.txt
    out: bin/tool.sh
    run: echo $stage >> "$$MARK"; printf '#!/bin/sh\\necho hi\\n' > $out; chmod +x $out

stage tree:
    in:  src.txt
    out: tree
    run: echo $stage >> "$$MARK"; mkdir -p $out/sub $out/empty; cp $in $out/a.txt; echo b > $out/sub/b.txt
"""
OUTPUTS = ("work/first.txt", "out/second.txt", "bin/tool.sh", "tree/a.txt", "tree/sub/b.txt")


class Checkouts:
    """Several checkouts of one project sharing one cache, and the marker file their recipes append to."""

    def __init__(self, project, tmp_path):
        self.project_type = type(project)
        self.tmp = tmp_path
        self.cache = tmp_path / "cache"
        self.marker = tmp_path / "ran.txt"
        self.marker.write_text("")

    def checkout(self, name: str, pipeline: str = PIPELINE, source: str = "hello\n"):
        checkout = self.project_type(self.tmp / name)
        checkout.pipefile(pipeline)
        checkout.write("src.txt", source)
        return checkout

    def build(self, checkout, *args, check=0, **kwargs) -> dict:
        kwargs.setdefault("env", {})["MARK"] = str(self.marker)
        return checkout.build("--cache", str(self.cache), *args, check=check, **kwargs)

    def ran(self) -> list[str]:
        """The jobs whose recipes ran since the last call."""
        names = self.marker.read_text().split()
        self.marker.write_text("")
        return sorted(names)

    def blob(self, content: bytes):
        digest = blake3.blake3(content).hexdigest()
        return self.cache / "blobs" / digest[:2] / digest


@pytest.fixture
def shared(project, tmp_path):
    return Checkouts(project, tmp_path)


def by_action(record: dict, action: str) -> set[str]:
    return {job["stage"] for job in record["jobs"] if job["action"] == action}


def test_second_checkout_restores_everything_and_runs_no_recipe(shared):
    a, b = shared.checkout("a"), shared.checkout("b")
    record = shared.build(a)
    assert shared.ran() == ["first", "second", "tool", "tree"]
    assert record["counts"]["restored"] == 0
    result = b.run("--cache", str(shared.cache), env={"MARK": str(shared.marker)}, check=0)
    assert shared.ran() == []
    record = b.last_record()
    assert record["counts"]["restored"] == 4 and record["counts"]["ran"] == 0
    assert by_action(record, "restored") == {"first", "second", "tool", "tree"}
    assert "restored first from cache in" in result.stdout
    for path in OUTPUTS:
        assert (b.root / path).read_bytes() == (a.root / path).read_bytes(), path
    assert os.access(b.root / "bin/tool.sh", os.X_OK)
    assert not os.access(b.root / "work/first.txt", os.X_OK)
    assert (b.root / "tree/empty").is_dir()
    record = shared.build(b)  # recorded exactly like a success: the next build skips everything
    assert b.ran(record) == set() and record["counts"]["skipped"] == 4 and shared.ran() == []


def test_corrupt_and_truncated_blobs_are_ignored_and_the_job_runs(shared):
    a, b, c = shared.checkout("a"), shared.checkout("b"), shared.checkout("c")
    shared.build(a)
    shared.ran()
    corrupt = shared.blob(b"HELLO\n")  # work/first.txt
    corrupt.write_bytes(b"EVIL!\n")  # same size, other bytes
    truncated = shared.blob(b"HELLO\nHELLO\n")  # out/second.txt
    truncated.write_bytes(b"HELLO\n")
    result = b.run("--cache", str(shared.cache), env={"MARK": str(shared.marker)}, check=0)
    assert "corrupt" in result.stdout
    assert shared.ran() == ["first", "second"]
    assert b.read("work/first.txt") == "HELLO\n" and b.read("out/second.txt") == "HELLO\nHELLO\n"
    record = b.last_record()
    assert by_action(record, "ran") == {"first", "second"} and by_action(record, "restored") == {"tool", "tree"}
    shared.build(c)  # b stored the good bytes again
    assert shared.ran() == [] and c.read("out/second.txt") == "HELLO\nHELLO\n"


def test_concurrent_writers_then_a_third_checkout_restores_everything(shared):
    stages = "".join(f"""
stage s{i}:
    in:  src.txt
    out: out/{i}.txt
    run: echo $stage >> "$$MARK"; sleep 0.05; (cat $in; echo {i}) > $out
""" for i in range(12))
    a, b, c = (shared.checkout(name, stages) for name in "abc")
    env = {**os.environ, "MARK": str(shared.marker), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "offbuild", "--cache", str(shared.cache), "-j", "3"]
    writers = [subprocess.Popen(command, cwd=checkout.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for checkout in (a, b)]
    for writer in writers:
        output, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0, output
        assert "warning" not in output, output
    shared.ran()
    record = shared.build(c)
    assert shared.ran() == [] and record["counts"]["restored"] == 12
    for i in range(12):
        assert c.read(f"out/{i}.txt") == f"hello\n{i}\n"
    leftovers = [path for path in shared.cache.rglob("*") if ".tmp-" in path.name]
    assert leftovers == []


def test_explain_shows_a_cache_hit_in_text_and_json(shared):
    a, b = shared.checkout("a"), shared.checkout("b")
    shared.build(a)
    text = b.run("--cache", str(shared.cache), "--explain", "second", check=0).stdout
    first_block, second_block = text.split("\nsecond:", 1)
    assert "would be restored from cache" in first_block
    assert "would be restored from cache" in second_block  # under the key first's restored output gives it
    data = json.loads(b.run("--cache", str(shared.cache), "--explain", "second", "--json", check=0).stdout)
    states = {job["job"]: job.get("cache") for job in data["jobs"]}
    assert states == {"first": "hit", "second": "hit"} and data["would_restore"] == 2
    assert "2 of 2 job(s) would run (2 restored from cache)" in text
    assert not (b.root / ".offbuild").exists()  # explain wrote nothing
    plain = json.loads(b.run("--explain", "second", "--json", check=0).stdout)  # no cache configured
    assert all("cache" not in job for job in plain["jobs"])
    shared.build(b)
    text = b.run("--cache", str(shared.cache), "--explain", "second", check=0).stdout
    assert "last run: restored from cache in run" in text


def test_explain_says_miss_for_a_job_the_cache_lacks(shared):
    b = shared.checkout("b")
    data = json.loads(b.run("--cache", str(shared.cache), "--explain", "second", "--json", check=0).stdout)
    assert {job["job"]: job["cache"] for job in data["jobs"]} == {"first": "miss", "second": "unknown"}
    assert not shared.cache.exists()  # explain does not even create the cache


NEVER_CACHED = """
stage resumable:
    in:  src.txt
    out: r.txt
    checkpoint: true
    run: echo $stage >> "$$MARK"; cp $in $out

stage every:
    in:  src.txt
    out: e.txt
    always: true
    run: echo $stage >> "$$MARK"; cp $in $out

stage opted:
    in:  src.txt
    out: o.txt
    cache: false
    run: echo $stage >> "$$MARK"; cp $in $out

stage test:
    in:  src.txt
    run: echo $stage >> "$$MARK"; test -s $in

stage normal:
    in:  src.txt
    out: n.txt
    run: echo $stage >> "$$MARK"; cp $in $out
"""


def test_checkpoint_always_cache_false_and_checks_are_never_restored(shared):
    a, b = shared.checkout("a", NEVER_CACHED), shared.checkout("b", NEVER_CACHED)
    shared.build(a)
    assert shared.ran() == ["every", "normal", "opted", "resumable", "test"]
    entries = list((shared.cache / "entries").rglob("*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["job"] == "normal"
    data = json.loads(b.run("--cache", str(shared.cache), "--explain", "test", "--json", check=0).stdout)
    assert data["jobs"][0]["cache"] == "never: it is a check (no outputs)"
    record = shared.build(b)
    assert shared.ran() == ["every", "opted", "resumable", "test"]
    assert by_action(record, "restored") == {"normal"}


def test_cache_false_in_the_json_form(shared):
    document = {"stages": [{"name": "opted", "in": ["src.txt"], "out": ["o.txt"], "cache": False,
                            "run": 'echo $stage >> "$$MARK"; cp $in $out'}]}
    a, b = shared.checkout("a"), shared.checkout("b")
    for checkout in (a, b):
        checkout.write("pipeline.json", json.dumps(document))
        shared.build(checkout, "-f", "pipeline.json")
    assert shared.ran() == ["opted", "opted"]


def test_a_misspelt_cache_field_is_suggested(project):
    project.pipefile("stage s:\n    out: x\n    cahce: false\n    run: touch x\n")
    result = project.run(check=2)
    assert "unknown field 'cahce' (did you mean 'cache'?)" in result.stderr


def test_precedence_flag_then_environment_then_pipefile(shared, tmp_path):
    a = shared.checkout("a", "cache = pipefile-cache\n" + PIPELINE)
    flag, environment = tmp_path / "flag-cache", tmp_path / "env-cache"
    pipefile_cache = a.root / "pipefile-cache"
    env = {"MARK": str(shared.marker), "OFFBUILD_CACHE": str(environment)}

    def holders():
        return {path.name for path in (flag, environment, pipefile_cache) if (path / "entries").exists()}

    a.run("--cache", str(flag), "-B", env=env, check=0)
    assert holders() == {"flag-cache"}
    a.run("-B", env=env, check=0)
    assert holders() == {"flag-cache", "env-cache"}
    a.run("-B", "-f", "a/Pipefile", env={"MARK": str(shared.marker)}, cwd=tmp_path, check=0)  # relative to Pipefile
    assert holders() == {"flag-cache", "env-cache", "pipefile-cache"}
    shutil.rmtree(flag)
    a.run("--no-cache", "--cache", str(flag), "-B", env=env, check=0)
    assert not flag.exists()


def test_prune_shrinks_the_cache_and_later_builds_still_work(shared):
    a = shared.checkout("a", source="x" * 3000 + "\n")
    shared.build(a)
    shared.ran()

    def size() -> int:
        return sum(path.stat().st_size for path in shared.cache.rglob("*") if path.is_file())

    full = size()
    limit = full // 2
    result = a.run("--cache", str(shared.cache), "--cache-prune", str(limit), "-n", check=0)
    assert "would remove" in result.stdout and size() == full
    result = a.run("--cache", str(shared.cache), "--cache-prune", str(limit), check=0)
    assert "removed" in result.stdout
    assert 0 < size() <= limit
    b = shared.checkout("b", source="x" * 3000 + "\n")
    record = shared.build(b)
    assert record["counts"]["restored"] >= 1 and record["counts"]["ran"] >= 1
    for path in OUTPUTS:
        assert (b.root / path).read_bytes() == (a.root / path).read_bytes()
    a.run("--cache", str(shared.cache), "--cache-prune", "0", check=0)
    assert size() == 0


def test_a_pruned_blob_just_makes_the_job_run(shared):
    a, b = shared.checkout("a"), shared.checkout("b")
    shared.build(a)
    shared.ran()
    shared.blob(b"HELLO\n").unlink()
    result = b.run("--cache", str(shared.cache), env={"MARK": str(shared.marker)}, check=0)
    assert "has no blob" in result.stdout
    assert shared.ran() == ["first"] and b.read("work/first.txt") == "HELLO\n"


def test_restored_output_identical_to_before_lets_downstream_skip(shared):
    b = shared.checkout("b", source="hello\n")
    b.build(env={"MARK": str(shared.marker)})  # no cache: b's own runs
    a = shared.checkout("a", source="HELLO\n")
    shared.build(a)  # first(HELLO) is now in the cache
    shared.ran()
    b.write("src.txt", "HELLO\n")
    record = shared.build(b)
    assert by_action(record, "restored") == {"first", "tool", "tree"}
    assert "second" in record["skipped"]  # first's restored output is byte-identical: early cutoff
    assert shared.ran() == []


def test_unusable_cache_locations_and_sizes_are_usage_errors(project):
    project.pipefile(PIPELINE)
    project.write("src.txt", "hi\n")
    for args, message in ((("--cache", "/dev/null/cache"), "cannot create the cache directory '/dev/null/cache'"),
                          (("--cache", "nosuchprotocol://bucket/x"), "cannot use the cache 'nosuchprotocol://"),
                          (("--cache", "/tmp", "--cache-prune", "12Q"), "bad size '12Q' for --cache-prune"),
                          (("--cache-prune", "1G"), "--cache-prune needs a cache")):
        result = project.run(*args, check=2)
        assert f"offbuild: error: {message}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not project.exists("work/first.txt")


def test_a_cache_that_cannot_be_written_warns_once_and_the_build_succeeds(shared):
    a = shared.checkout("a")
    shared.cache.mkdir()
    (shared.cache / "blobs").write_text("not a folder")  # every store fails, even as root
    result = a.run("--cache", str(shared.cache), env={"MARK": str(shared.marker)}, check=0)
    assert result.stdout.count("warning: cannot store") == 1, result.stdout
    assert a.read("out/second.txt") == "HELLO\nHELLO\n"
    assert a.ran(a.last_record()) == {"first", "second", "tool", "tree"}


def test_a_no_op_with_a_cache_does_not_import_fsspec(shared):
    a = shared.checkout("a", PIPELINE.split("stage tool:")[0])  # no directory output: the fast path applies
    shared.build(a)
    for path in ("Pipefile", "src.txt", "work/first.txt", "out/second.txt"):
        os.utime(a.root / path, (time.time() - 10, time.time() - 10))
    shared.build(a)
    env = {**os.environ, "MARK": str(shared.marker), "OFFBUILD_CACHE": str(shared.cache)}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "offbuild"], cwd=a.root, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and a.last_record().get("fast_path") == "noop"
    assert "fsspec" not in result.stderr
    a.write("src.txt", "changed\n")  # a real build with the cache does import it (the test can fail)
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "offbuild"], cwd=a.root, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "fsspec" in result.stderr


# -- unit tests of offbuild/cache.py


def make_job(name: str, *outputs: str, **options) -> Job:
    stage = Stage(name, Location("Pipefile", 1, 1), **options)
    return Job(name, stage, (), outputs, "true")


@pytest.fixture
def unit(tmp_path, monkeypatch):
    """A cache and a project folder (the working directory) with a fake clock."""
    monkeypatch.chdir(tmp_path)
    now = [1000.0]
    warnings: list[str] = []
    cache = OutputCache.open(str(tmp_path / "c"), create=True, warn=warnings.append, clock=lambda: now[0])
    return cache, now, warnings


def digest_of(path: str) -> str:
    return blake3.blake3(open(path, "rb").read()).hexdigest()


def test_unit_store_lookup_restore_round_trip(unit):
    cache, _, warnings = unit
    with open("out.txt", "w") as handle:
        handle.write("data\n")
    os.chmod("out.txt", 0o755)
    job = make_job("j", "out.txt")
    cache.store("ab" * 32, job, {"out.txt": digest_of("out.txt")}, 1.5)
    os.unlink("out.txt")
    entry = cache.lookup("ab" * 32)
    assert entry is not None and entry.duration == 1.5 and entry.job == "j"
    assert cache.restore(entry, job) and open("out.txt").read() == "data\n"
    assert os.stat("out.txt").st_mode & stat.S_IXUSR
    assert cache.lookup("cd" * 32) is None and warnings == []


def test_unit_malformed_or_escaping_entries_are_ignored(unit, tmp_path):
    cache, _, warnings = unit
    path = tmp_path / "c" / "entries" / "ab" / ("ab" * 32 + ".json")
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "key": "')  # cut short
    assert cache.lookup("ab" * 32) is None and "malformed" in warnings[-1]
    escaping = {"format": 1, "key": "ab" * 32, "job": "j", "used": 0, "duration": None, "outputs": {
        "t": {"digest": "tree:" + "0" * 64, "directories": [],
              "files": {"../../evil": {"digest": "0" * 64, "size": 1, "executable": False}}}}}
    path.write_text(json.dumps(escaping))
    assert cache.lookup("ab" * 32) is None


def test_unit_prune_drops_least_recently_used_first(unit, tmp_path):
    cache, now, _ = unit
    keys = []
    for index in range(3):
        name = f"o{index}.txt"
        with open(name, "w") as handle:
            handle.write(str(index) * 1000)
        keys.append(f"{index}a" * 32)
        cache.store(keys[-1], make_job(name, name), {name: digest_of(name)})
        now[0] += 100
    now[0] += REFRESH_SECONDS  # a hit refreshes an entry's recency at most this often
    entry = cache.lookup(keys[0])
    os.unlink("o0.txt")
    assert cache.restore(entry, make_job("o0.txt", "o0.txt"))  # a hit: o0 is now the most recent
    report = cache.prune(2900)
    assert report.entries_removed == 1 and report.blobs_removed == 1 and report.bytes_after <= 2900
    assert cache.lookup(keys[1]) is None and cache.lookup(keys[0]) and cache.lookup(keys[2])


def test_unit_jobs_never_cached(unit):
    assert why_not_cached(make_job("c")) == "it is a check (no outputs)"
    assert why_not_cached(make_job("k", "x", checkpoint=True)) == "checkpoint stages are never cached"
    assert why_not_cached(make_job("a", "x", always=True)) == "always stages are never cached"
    assert why_not_cached(make_job("f", "x", cache=False)) == "its stage says cache: false"
    assert why_not_cached(make_job("n", "x")) is None


def test_unit_location_precedence_and_sizes():
    env = {"OFFBUILD_CACHE": "envdir"}
    assert cache_location("flagdir", env, "pipe", "/here", "/root") == "/here/flagdir"
    assert cache_location(None, env, "pipe", "/here", "/root") == "/here/envdir"
    assert cache_location(None, {}, "pipe", "/here", "/root") == "/root/pipe"
    assert cache_location(None, {"OFFBUILD_CACHE": " "}, "s3://b/p", "/here", "/root") == "s3://b/p"
    assert cache_location(None, {}, None, "/here", "/root") is None
    assert parse_size("500M") == 500 << 20 and parse_size("2G") == 2 << 30 and parse_size("1.5k") == 1536
    assert parse_size("123") == 123 and parse_size("2GiB") == 2 << 30
    with pytest.raises(UsageError):
        parse_size("lots")


def test_a_symbolic_link_output_is_not_cached_with_a_note(shared):
    linking = 'stage link:\n    in:  src.txt\n    out: alias.txt\n    run: echo $stage >> "$$MARK"; ln -s $in $out\n'
    a, b = shared.checkout("a", linking), shared.checkout("b", linking)
    result = a.run("--cache", str(shared.cache), env={"MARK": str(shared.marker)}, check=0)
    assert "note: not caching 'link': 'alias.txt' is a symbolic link" in result.stdout
    shared.build(b)
    assert shared.ran() == ["link", "link"] and os.path.islink(b.root / "alias.txt")


def test_force_reruns_recipes_instead_of_restoring(shared):
    a, b = shared.checkout("a"), shared.checkout("b")
    shared.build(a)
    shared.ran()
    record = shared.build(b, "-B")
    assert shared.ran() == ["first", "second", "tool", "tree"] and record["counts"]["restored"] == 0
