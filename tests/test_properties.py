"""Property tests (issue 6): offbuild against a Python model of SPEC section 2.

Random pipelines (chains, fans, diamonds, wide layers, random DAGs) whose recipes are small
shell transforms the model can compute, then random edits between builds. After every build:

- correctness: every declared output holds what the model computes from the sources;
- minimality with early cutoff: the jobs that ran (each recipe appends its name to a log outside
  the project) are exactly those the model says must run: never succeeded, or recipe / input
  paths and contents / declared outputs differ from the last success, or an output is missing or
  differs from what that success wrote; inputs are compared after upstream jobs finished, so a
  rerun that writes identical bytes stops the change from spreading;
- SIGKILL, while a chosen recipe hangs before or after writing its outputs or at a random moment:
  the spawner and every recipe go with offbuild, and the next build restores correctness without
  rerunning a job that had finished (after a random kill, at most one job per slot whose recipe had
  just finished may be unrecorded and run again);
- outputs of vanished jobs are deleted while unchanged, kept when hand-edited.

The same scenarios run under `-j 1`, `-j 4`, and as two offbuild processes at once (both exit 0,
or the killed one with SIGKILL; each job runs at most once between them).

`python -m pytest tests/test_properties.py --hypothesis-profile=thorough` runs many more; both
profiles print how many pipelines, edits, builds and job decisions they checked.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from conftest import alive
from conftest_hypothesis import budget, report

BUILD_TIMEOUT = 60
HANG_SECONDS = 120


# --------------------------------------------------------------------------- the transforms


def _first_line(data: bytes) -> bytes:
    end = data.find(b"\n")
    return data[:end + 1] if end >= 0 else data


def _after_first_line(data: bytes) -> bytes:
    end = data.find(b"\n")
    return data[end + 1:] if end >= 0 else b""


def _lines(data: bytes) -> list[bytes]:
    if not data:
        return []
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    return lines


def _sort(data: bytes, unique: bool = False) -> bytes:
    lines = _lines(data)
    return b"".join(line + b"\n" for line in sorted(set(lines) if unique else lines))


@dataclass(frozen=True)
class Transform:
    """A deterministic shell recipe body and the model of what it writes (one value per output)."""

    name: str
    commands: tuple[str, ...]
    compute: Callable[[bytes], tuple[bytes, ...]]
    outputs: int = 1


TRANSFORMS = {transform.name: transform for transform in [
    Transform("cat", ("cat $in > $out",), lambda data: (data,)),
    Transform("upper", ("cat $in | tr a-z A-Z > $out",), lambda data: (data.upper(),)),
    Transform("nospace", ("cat $in | tr -d ' ' > $out",), lambda data: (data.replace(b" ", b""),)),
    Transform("lines", ("cat $in | wc -l | tr -d ' ' > $out",), lambda data: (b"%d\n" % data.count(b"\n"),)),
    Transform("parity", ("echo $(( $(cat $in | wc -l) % 2 )) > $out",),
              lambda data: (b"%d\n" % (data.count(b"\n") % 2),)),
    Transform("first", ("cat $in | head -n 1 > $out",), lambda data: (_first_line(data),)),
    Transform("sort", ("cat $in | LC_ALL=C sort > $out",), lambda data: (_sort(data),)),
    Transform("uniq", ("cat $in | LC_ALL=C sort -u > $out",), lambda data: (_sort(data, unique=True),)),
    Transform("split", ("cat $in | head -n 1 > $out0", "cat $in | tail -n +2 > $out1"),
              lambda data: (_first_line(data), _after_first_line(data)), outputs=2),
    Transform("cases", ("cat $in | tr a-z A-Z > $out0", "cat $in | tr A-Z a-z > $out1"),
              lambda data: (data.upper(), data.lower()), outputs=2),
]}
SINGLE = sorted(name for name, transform in TRANSFORMS.items() if transform.outputs == 1)
DOUBLE = sorted(name for name, transform in TRANSFORMS.items() if transform.outputs == 2)

# Every recipe can be made to hang (before or after writing its outputs) when the test sets
# OB_HANG=pre:NAME or post:NAME; neither variable is part of the stage key.
HANG = ('if [ "$${OB_HANG-}" = %s:$stage ]; then echo $$$$ > "$$OB_FLAG"; sleep ' + str(HANG_SECONDS) + '; fi')


# --------------------------------------------------------------------------- the model


@dataclass
class StageSpec:
    name: str
    inputs: list[str]
    outputs: list[str]
    transform: str
    version: int = 0  # bumped by a recipe edit that changes nothing the recipe computes
    block: bool = False  # `run:` as an indented block rather than one line

    def recipe_lines(self) -> list[str]:
        return [f": v{self.version}", HANG % "pre", *TRANSFORMS[self.transform].commands, HANG % "post",
                "echo $stage >> $LOG"]

    def text(self, style: int = 0) -> str:
        """The stage as Pipefile text; `style` changes only layout and comments, never meaning."""
        indent = ("    ", "  ", "\t")[style % 3]
        comment = "  # a comment" if style % 2 else ""
        lines = [f"stage {self.name}:{comment}", f"{indent}in: {' '.join(self.inputs)}{comment}",
                 f"{indent}out:  {' '.join(self.outputs)}"]
        if self.block:
            lines += [f"{indent}run:{comment}", *(indent * 2 + line for line in self.recipe_lines())]
        else:
            lines.append(f"{indent}run: " + "; ".join(self.recipe_lines()))
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Record:
    """What the model says offbuild stored for a job's last success."""

    key: tuple
    outputs: dict[str, bytes]


@dataclass
class Plan:
    run: set[str]
    values: dict[str, bytes]  # every current output's correct content after the build
    records: dict[str, Record]  # the new last success of each job that runs


@dataclass
class Model:
    sources: dict[str, bytes]
    stages: list[StageSpec]  # in a topological order: inputs come from sources or earlier stages
    records: dict[str, Record] = field(default_factory=dict)
    stale: dict[str, bytes] = field(default_factory=dict)  # outputs of vanished jobs → recorded content
    serial: int = 0
    style: int = 0  # Pipefile layout

    def fresh(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def outputs(self) -> list[str]:
        return [path for stage in self.stages for path in stage.outputs]

    def pipefile(self, log: str) -> str:
        blank = "\n" * (1 + self.style % 2)
        return f"LOG = {log}\n\n" + blank.join(stage.text(self.style) for stage in self.stages)

    def inputs(self, stage: StageSpec) -> list[str]:
        """`$in` of a stage: declared order, the glob's matches sorted, duplicates removed."""
        paths: list[str] = []
        for word in stage.inputs:
            for path in sorted(self.sources) if word == GLOB else [word]:
                if path not in paths:
                    paths.append(path)
        return paths

    def plan(self, disk: dict[str, bytes | None]) -> Plan:
        """Which jobs must run given the outputs on disk now, and what every output must hold."""
        values = dict(self.sources)
        run, records = set(), {}
        for stage in self.stages:
            inputs = self.inputs(stage)
            key = (stage.transform, stage.version, stage.block, tuple((path, values[path]) for path in inputs),
                   tuple(stage.outputs))
            written = dict(zip(stage.outputs, TRANSFORMS[stage.transform].compute(
                b"".join(values[path] for path in inputs))))
            record = self.records.get(stage.name)
            if (record is None or record.key != key
                    or any(disk.get(path) != record.outputs[path] for path in stage.outputs if path in record.outputs)):
                run.add(stage.name)
                records[stage.name] = Record(key, written)
            values.update(written)
        return Plan(run, {path: values[path] for path in self.outputs()}, records)

    def commit(self, plan: Plan, finished: set[str]) -> None:
        for name in finished:
            self.records[name] = plan.records[name]


# --------------------------------------------------------------------------- generating pipelines

CONTENT = st.text(alphabet="abAB \n", max_size=14).map(str.encode)
GLOB = "src/*.txt"  # every source: sources live in src/, outputs in out/
SHAPES = ("chain", "fan", "diamond", "layers", "random")


@st.composite
def pipelines(draw) -> Model:
    """Sources with random contents and a random DAG of stages over them."""
    sources = {f"src/f{index}.txt": draw(CONTENT) for index in range(draw(st.integers(1, 4)))}
    model = Model(sources, [], serial=len(sources))
    shape = draw(st.sampled_from(SHAPES))
    size = draw(st.integers(1, 7))
    if shape == "chain":
        widths = [1] * size
    elif shape == "fan":
        widths = [1, max(size - 2, 1), 1][:max(size, 1)]
    elif shape == "diamond":
        widths = [1 if index % 2 == 0 else 2 for index in range(size)]
    elif shape == "layers":
        widths = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    else:
        widths = [1] * size  # each stage picks its own inputs below
    previous, first_layer = list(sources), True
    for width in widths:
        layer: list[str] = []
        for _ in range(width):
            transform = draw(st.sampled_from(sorted(TRANSFORMS)))
            name = model.fresh("s")
            if shape == "random":
                pool = list(sources) + model.outputs()
                inputs = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
            elif first_layer:
                inputs = draw(st.lists(st.sampled_from(previous), min_size=1, max_size=2, unique=True))
            elif width == 1:  # a join: everything the previous layer made
                inputs = list(previous)
            else:
                inputs = draw(st.lists(st.sampled_from(previous), min_size=1, max_size=len(previous), unique=True))
            if draw(st.integers(0, 4)) == 0:  # now and then a source joins in, or all of them
                extra = draw(st.sampled_from(sorted(sources) + [GLOB]))
                inputs += [extra] if extra not in inputs else []
            outputs = [f"out/{name}.txt", f"out/{name}.2.txt"][:TRANSFORMS[transform].outputs]
            model.stages.append(StageSpec(name, inputs, outputs, transform, block=draw(st.booleans())))
            layer += outputs
        previous, first_layer = layer, False
    return model


EDIT_KINDS = ("source", "same_size", "save_unchanged", "touch", "touch_output", "recipe", "transform",
              "delete_output", "hand_edit_output", "rewrite_output", "add_input", "remove_input", "reorder_inputs",
              "add_source", "delete_source", "add_stage", "remove_stage", "rename_output", "reformat", "age")


@dataclass(frozen=True)
class Edit:
    kind: str
    a: int
    b: int
    content: bytes


EDITS = st.builds(Edit, st.sampled_from(EDIT_KINDS), st.integers(0, 999), st.integers(0, 999), CONTENT)


@dataclass(frozen=True)
class Step:
    edits: tuple[Edit, ...]
    # SIGKILL offbuild: (which job, "pre"|"post") while a job that must run hangs before or after
    # writing its outputs, or (delay, "random") at a moment of the build
    kill: tuple[int, str] | None


STEPS = st.builds(Step, st.lists(EDITS, min_size=1, max_size=3).map(tuple),
                  st.one_of(st.none(), st.none(), st.none(),
                            st.tuples(st.integers(0, 999), st.sampled_from(["pre", "post", "random"]))))


# --------------------------------------------------------------------------- the counts the thorough run reports

STATS: collections.Counter = collections.Counter()
EDITS_BY_KIND: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    if STATS:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(EDITS_BY_KIND.items()))
        line = (f"\ntest_properties: {STATS['pipelines']} pipelines, {STATS['steps']} edit steps with "
                f"{STATS['edits']} edits ({kinds}), {STATS['builds']} builds ({STATS['killed']} killed with "
                f"SIGKILL), {STATS['jobs_ran']} job runs and {STATS['jobs_skipped']} skips checked")
        report(request.config, line)


# --------------------------------------------------------------------------- running offbuild



class Scenario:
    """A model, the project folder it describes, and the checks run around each build."""

    def __init__(self, model: Model, root: Path, mode: str):
        self.model = model
        self.root = root  # root/project is the project; root/ran.log and root/flag live outside it
        self.project = root / "project"
        self.log = root / "ran.log"
        self.flag = root / "flag"
        self.mode = mode  # "j1" | "j4" | "two"
        self.builds = 0
        self.project.mkdir()
        for path, content in model.sources.items():
            self.write(path, content)

    # -- files

    def write(self, path: str, content: bytes) -> None:
        target = self.project / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)

    def read(self, path: str) -> bytes | None:
        try:
            return (self.project / path).read_bytes()
        except FileNotFoundError:
            return None

    def disk(self) -> dict[str, bytes | None]:
        return {path: self.read(path) for path in [*self.model.outputs(), *self.model.stale]}

    def ran_log(self) -> collections.Counter:
        text = self.log.read_text() if self.log.exists() else ""
        return collections.Counter(text.split())

    def start(self, jobs: int, run_id: str, hang: str | None = None) -> subprocess.Popen:
        env = {**os.environ, "OB_FLAG": str(self.flag)}
        env.pop("OB_HANG", None)
        if hang:
            env["OB_HANG"] = hang
        return subprocess.Popen([sys.executable, "-m", "offbuild", "-j", str(jobs), "--run-id", run_id],
                                cwd=self.project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def record(self, run_id: str) -> dict:
        return json.loads((self.project / ".offbuild" / "runs" / f"{run_id}.json").read_text())

    # -- one build, checked

    def build(self, kill: tuple[int, str] | None = None, maybe_again: frozenset = frozenset(),
              again_limit: int = 0) -> tuple[set[str], bool]:
        """Run a build (two at once in mode "two") and check it against the model.

        `kill` SIGKILLs the (first) offbuild: ("pre"|"post") while a job that must run hangs before or
        after writing its outputs, once the other jobs settle; ("random") at a moment `kill[0]` picks.
        After a kill at a random moment a job may have finished its recipe without offbuild recording
        it: the next build may run such jobs (`maybe_again`, at most `again_limit`) beyond the model's
        plan. Returns the jobs whose recipes finished and whether offbuild was killed."""
        model = self.model
        (self.project / "Pipefile").write_text(model.pipefile(str(self.log)))
        before = self.disk()
        plan = model.plan(before)
        self.log.write_text("")
        self.flag.unlink(missing_ok=True)
        where = kill[1] if kill else None
        victim = sorted(plan.run)[kill[0] % len(plan.run)] if where in ("pre", "post") and plan.run else None
        note(f"build {self.builds}: model says {sorted(plan.run)} must run"
             + (f"; kill in {where}:{victim}" if victim else f"; kill after {kill[0] % 40 * 10} ms"
                if where == "random" else ""))
        self.builds += 1
        STATS["builds"] += 1
        ids = [f"b{self.builds}-a", f"b{self.builds}-b"][:2 if self.mode == "two" else 1]
        jobs = {"j1": 1, "j4": 4, "two": 2}[self.mode]
        processes = [self.start(jobs, ids[0], f"{where}:{victim}" if victim else None)]
        processes += [self.start(jobs, run_id) for run_id in ids[1:]]
        killed = False
        try:
            if victim:
                killed = self._kill_when_hanging(processes[0])
            elif where == "random":
                time.sleep(kill[0] % 40 * 0.01)
                processes[0].send_signal(signal.SIGKILL)
                killed = processes[0].wait() == -signal.SIGKILL  # not if it had finished already
            outcomes = [(process, *process.communicate(timeout=BUILD_TIMEOUT)) for process in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for index, (process, out, err) in enumerate(outcomes):
            if index == 0 and killed:
                assert process.returncode == -signal.SIGKILL
                continue
            assert process.returncode == 0, f"offbuild exited {process.returncode}\n{out}\n{err}"
        if killed:
            STATS["killed"] += 1
            self._check_no_orphans()
        ran = self.ran_log()
        # Only a recipe that finished in an offbuild killed before recording it may run twice.
        twice = {name: count for name, count in ran.items() if count > 1}
        uncertain = killed and where == "random" and self.mode == "two"
        assert not twice or uncertain and max(twice.values()) == 2 and len(twice) <= jobs, \
            f"jobs ran more than once in one build: {twice}"
        finished = set(ran)
        extra = finished - plan.run
        assert extra <= maybe_again and len(extra) <= again_limit, \
            f"ran without need: {sorted(extra)} (needed {sorted(plan.run)})"
        STATS["jobs_ran"] += len(finished)
        STATS["jobs_skipped"] += len(model.stages) - len(finished)
        if not (killed and where == "random"):  # killed early, it may not have got to them yet
            self._check_stale(before)
        if killed:
            assert victim not in finished or self.mode == "two"
        if killed and self.mode != "two":  # a partial build: what finished must be right already
            for stage in model.stages:
                for path in stage.outputs if stage.name in finished else []:
                    assert self.read(path) == plan.values[path], f"{path} of finished job {stage.name}"
            model.commit(plan, finished & plan.run)
            return finished, True
        missing = plan.run - finished
        if killed:
            # The killed offbuild may have rewritten a job's outputs, the same as its last success,
            # before dying (a job rerun only because an output was deleted or edited): the survivor
            # then rightly finds it up to date. Its outputs are checked below like all others.
            missing = {name for name in missing if name not in model.records
                       or model.records[name].key != plan.records[name].key}
        assert not missing, (f"model says {sorted(plan.run)} must run; offbuild ran {sorted(finished)}"
                             f" (missing {sorted(missing)})")
        recorded = [set(job["stage"] for job in self.record(run_id)["jobs"] if job["action"] in ("ran", "resumed"))
                    for run_id in ids[1 if killed else 0:]]
        recorded_ran = set().union(*recorded)
        # A killed offbuild writes no record, so then only the survivor's can be compared.
        exact = recorded_ran == finished and sum(map(len, recorded)) == len(finished)
        assert recorded_ran <= finished if killed else exact, \
            f"run records {recorded} disagree with the recipes' own log {sorted(finished)}"
        self._check_outputs(plan)
        model.commit(plan, finished & plan.run)
        return finished, killed

    def _kill_when_hanging(self, process: subprocess.Popen) -> bool:
        """SIGKILL offbuild once the victim recipe hangs and the other jobs have settled; check the
        spawner then kills the recipe. False when the process ended first (the other process of a
        two-process build ran the victim)."""
        deadline = time.monotonic() + BUILD_TIMEOUT
        while not (self.flag.exists() and self.flag.read_text().strip()):
            if process.poll() is not None:
                return False
            assert time.monotonic() < deadline, "the chosen job never started"
            time.sleep(0.02)
        pid = int(self.flag.read_text())
        if self.mode != "j1":  # let jobs running beside the victim finish and be recorded
            size, quiet_since = -1, time.monotonic()
            while time.monotonic() - quiet_since < 0.5:
                current = self.log.stat().st_size
                if current != size:
                    size, quiet_since = current, time.monotonic()
                time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 20
        while alive(pid):
            assert time.monotonic() < deadline, "the hanging recipe outlived the offbuild that started it"
            time.sleep(0.02)
        return True

    def _check_no_orphans(self) -> None:
        """Once offbuild is killed, its spawner and every recipe it started go too (SPEC 4 and 5)."""
        deadline = time.monotonic() + 20
        while True:
            left = []
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit() and os.readlink(entry / "cwd").startswith(str(self.root)):
                        left.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
                except OSError:
                    continue
            if not left:
                return
            assert time.monotonic() < deadline, f"processes outlived the killed offbuild: {left}"
            time.sleep(0.05)

    def _check_outputs(self, plan: Plan) -> None:
        for path, value in plan.values.items():
            assert self.read(path) == value, f"{path}: {self.read(path)!r} != model {value!r}"
        for path, value in self.model.sources.items():
            assert self.read(path) == value, f"source {path} changed"

    def _check_stale(self, before: dict[str, bytes | None]) -> None:
        """Outputs of vanished jobs: deleted while unchanged since offbuild wrote them, else kept."""
        for path, recorded in self.model.stale.items():
            if before[path] == recorded:
                assert self.read(path) is None, f"stale output {path} kept though unchanged"
            else:
                assert self.read(path) == before[path], f"stale output {path} changed by offbuild"
        self.model.stale.clear()

    # -- edits

    def apply(self, edit: Edit) -> None:
        model = self.model
        stages, sources = model.stages, sorted(model.sources)
        stage = stages[edit.a % len(stages)] if stages else None
        source = sources[edit.a % len(sources)]
        outputs = model.outputs()
        output = outputs[edit.a % len(outputs)] if outputs else None
        kind = edit.kind
        if kind == "source":
            model.sources[source] = edit.content
            self.write(source, edit.content)
        elif kind == "same_size":
            old = model.sources[source]
            if old:
                position = edit.b % len(old)
                new_char = next(c for c in b"ab \nAB" if c != old[position])
                new = old[:position] + bytes([new_char]) + old[position + 1:]
            else:
                new = b"a"
            before = (self.project / source).stat()
            model.sources[source] = new
            self.write(source, new)
            if edit.b % 2 and old:  # same size and same mtime: only the ctime tells the stat cache
                os.utime(self.project / source, ns=(before.st_atime_ns, before.st_mtime_ns))
        elif kind == "age":  # old enough for the stat cache to trust what it records next
            for path in [*model.sources, *outputs]:
                if (self.project / path).exists():
                    stamp = (self.project / path).stat().st_mtime_ns - 10 * 10**9
                    os.utime(self.project / path, ns=(stamp, stamp))
        elif kind == "save_unchanged":
            self.write(source, model.sources[source])
        elif kind in ("touch", "touch_output"):
            if not (self.project / (source if kind == "touch" else output)).exists():
                return self._noop(kind)  # an output deleted by an earlier edit of this step
            stamp = time.time_ns() if edit.b % 2 else 1_000_000_000 * 10**9  # now, or back in 2001
            os.utime(self.project / (source if kind == "touch" else output), ns=(stamp, stamp))
        elif kind == "recipe":
            stage.version += 1
            stage.block ^= bool(edit.b % 2)
        elif kind == "transform":
            choices = [name for name in (DOUBLE if len(stage.outputs) == 2 else SINGLE) if name != stage.transform]
            stage.transform = choices[edit.b % len(choices)]
        elif kind == "delete_output":
            (self.project / output).unlink(missing_ok=True)
        elif kind == "hand_edit_output":
            current = self.read(output)
            self.write(output, edit.content if edit.content != current else edit.content + b"!")
        elif kind == "rewrite_output":
            self.write(output, self.read(output) or b"")
        elif kind == "add_input":
            options = {s.name: [path for path in sources + [GLOB] + [p for e in stages[:i] for p in e.outputs]
                                if path not in s.inputs] for i, s in enumerate(stages)}
            eligible = [s for s in stages if options[s.name]]
            if not eligible:
                return self._noop(kind)
            stage = eligible[edit.a % len(eligible)]
            candidates = options[stage.name]
            stage.inputs.insert(edit.b % (len(stage.inputs) + 1), candidates[edit.b % len(candidates)])
        elif kind in ("remove_input", "reorder_inputs"):
            eligible = [s for s in stages if len(s.inputs) >= 2]
            if not eligible:
                return self._noop(kind)
            stage = eligible[edit.a % len(eligible)]
            if kind == "remove_input":
                del stage.inputs[edit.b % len(stage.inputs)]
            else:
                stage.inputs.append(stage.inputs.pop(0))
        elif kind == "add_source":
            path = f"src/{model.fresh('f')}.txt"
            model.sources[path] = edit.content
            self.write(path, edit.content)
            if edit.b % 2:  # otherwise only stages reading every source (GLOB) see it
                stage.inputs.append(path)
        elif kind == "delete_source":
            named = {path for s in stages for path in s.inputs}
            unnamed = [path for path in sources if path not in named]
            if not unnamed or len(sources) < 2:
                return self._noop(kind)
            path = unnamed[edit.b % len(unnamed)]
            del model.sources[path]
            (self.project / path).unlink()
        elif kind == "reformat":
            model.style += 1 + edit.b % 5
        elif kind == "add_stage":
            if len(stages) >= 10:
                return self._noop(kind)
            transform = sorted(TRANSFORMS)[edit.b % len(TRANSFORMS)]
            name = model.fresh("s")
            pool = sources + outputs + [GLOB]
            inputs = list(dict.fromkeys([pool[edit.a % len(pool)], pool[(edit.a // 7 + edit.b) % len(pool)]]))
            outs = [f"out/{name}.txt", f"out/{name}.2.txt"][:TRANSFORMS[transform].outputs]
            stages.append(StageSpec(name, inputs, outs, transform, block=bool(edit.b % 2)))
        elif kind == "remove_stage":
            if len(stages) < 2:
                return self._noop(kind)
            stages.remove(stage)
            self._forget_outputs(stage, stage.outputs)
            model.records.pop(stage.name, None)
            for other in stages:
                other.inputs[:] = [path for path in other.inputs if path not in stage.outputs]
                if not other.inputs:
                    other.inputs.append(sources[edit.b % len(sources)])
        elif kind == "rename_output":
            renamed = {path: f"out/{model.fresh(stage.name + '-r')}.txt" for path in stage.outputs}
            self._forget_outputs(stage, stage.outputs)
            stage.outputs[:] = [renamed[path] for path in stage.outputs]
            for other in stages:
                other.inputs[:] = [renamed.get(path, path) for path in other.inputs]
        EDITS_BY_KIND[kind] += 1
        STATS["edits"] += 1

    def _noop(self, kind: str) -> None:
        EDITS_BY_KIND[kind + " (not applicable)"] += 1

    def _forget_outputs(self, stage: StageSpec, paths: list[str]) -> None:
        record = self.model.records.get(stage.name)
        for path in paths:
            if record is not None and path in record.outputs:
                self.model.stale[path] = record.outputs[path]


def describe(model: Model) -> str:
    lines = [f"sources: {model.sources}"]
    lines += [f"  {s.name}: {s.transform} {s.inputs} -> {s.outputs}" for s in model.stages]
    return "\n".join(lines)


def run_scenario(model: Model, steps: list[Step], mode: str) -> None:
    """Build, then for each step apply its edits and build again (checking every build); a killed
    build is followed at once by a recovery build that must finish the work."""
    STATS["pipelines"] += 1
    note(describe(model))
    with tempfile.TemporaryDirectory(prefix="offbuild-prop-") as temp:
        scenario = Scenario(model, Path(temp), mode)
        scenario.build()
        for step in steps:
            STATS["steps"] += 1
            for edit in step.edits:
                note(f"edit {edit}")
                scenario.apply(edit)
            finished, killed = scenario.build(step.kill)
            if killed:
                # Right after a kill at a random moment, a job whose recipe had just finished may not be
                # recorded yet: the recovery build may run it again, one per job slot at most.
                random_kill = step.kill[1] == "random" and mode != "two"
                limit = {"j1": 1, "j4": 4}.get(mode, 0) if random_kill else 0
                again, _ = scenario.build(maybe_again=frozenset(finished) if random_kill else frozenset(),
                                          again_limit=limit)
                assert len(again & finished) <= limit, f"reran jobs that had finished: {sorted(again & finished)}"


@pytest.mark.parametrize("mode", ["j1", "j4", "two"])
@settings(max_examples=budget(5, 150))
@given(model=pipelines(), steps=st.lists(STEPS, min_size=2, max_size=budget(4, 10)))
def test_builds_are_correct_and_minimal(mode, model, steps):
    run_scenario(model, steps, mode)
