"""Model → concrete jobs → DAG: producers of each output, patterns, globs, targets, cycles."""
from __future__ import annotations

import bisect
import functools
import heapq
import os
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx

from .errors import LoadError, UsageError, did_you_mean
from .model import Job, JobVar, Location, PathSpec, Pipeline, Stage
from .snapshot import listing_signature

# Pattern stages feeding each other can generate jobs forever; real chains are far shorter.
MAX_PATTERN_ROUNDS = 1000
_IGNORED_DIRS = {".offbuild", ".git", "__pycache__"}


@dataclass(slots=True)
class BuildGraph:
    """Every job of a pipeline, who produces each path, and the dependency DAG (edges dep → job)."""

    pipeline: Pipeline
    jobs: dict[str, Job]
    producer: dict[str, str]
    dag: nx.DiGraph
    jobs_by_stage: dict[str, list[str]] = field(default_factory=dict)
    # folder → (mtime_ns, ino, ctime_ns, when taken, listing signature), or None when it did not exist
    listed_folders: dict[str, tuple[int, int, int, int, str] | None] = field(default_factory=dict)
    _sources: list[str] | None = None
    _sorted_outputs: list[str] | None = None

    @property
    def pools(self) -> dict[str, int]:
        return self.pipeline.pools

    def dependencies(self, name: str):
        """Jobs that must finish before `name` (inputs' producers and `after:` stages)."""
        return self.dag.predecessors(name)

    def dependents(self, name: str):
        """Jobs that wait for `name`."""
        return self.dag.successors(name)

    def holds_source(self, path: str) -> bool:
        """Is `path` a source (an input no job makes) or a folder containing one? Such a path is
        never deleted, even when a stage declares it as an output folder."""
        if self._sources is None:
            self._sources = sorted({p for job in self.jobs.values() for p in job.inputs if p not in self.producer})
        index = bisect.bisect_left(self._sources, path)
        if index < len(self._sources) and self._sources[index] == path:
            return True
        prefix = path.rstrip("/") + "/"
        index = bisect.bisect_left(self._sources, prefix)
        return index < len(self._sources) and self._sources[index].startswith(prefix)

    def producers_under(self, directory: str) -> list[str]:
        """Jobs writing a declared output inside `directory`."""
        prefix = directory.rstrip("/") + "/"
        if self._sorted_outputs is None:
            self._sorted_outputs = sorted(self.producer)
        outputs = self._sorted_outputs
        start = bisect.bisect_left(outputs, prefix)
        found = []
        for path in outputs[start:]:
            if not path.startswith(prefix):
                break
            found.append(self.producer[path])
        return found

    def select(self, targets: list[PathSpec]) -> list[str]:
        """Job names the targets need (the targets and everything upstream), in build order."""
        wanted: set[str] = set()
        for target in targets:
            wanted.update(self.resolve_target(target))
        # One walk up from all targets at once (ancestors per target is quadratic on a chain).
        needed, pending, upstream = set(wanted), list(wanted), self.dag.pred
        while pending:
            for name in upstream[pending.pop()]:
                if name not in needed:
                    needed.add(name)
                    pending.append(name)
        return self._build_order(needed)

    def _build_order(self, needed: set[str]) -> list[str]:
        """Dependencies first; among ready jobs, the one declared first (Kahn's algorithm)."""
        rank = {name: (job.stage.location.file, job.stage.location.line, name)
                for name, job in self.jobs.items() if name in needed}
        waiting = {name: sum(1 for up in self.dag.pred[name] if up in needed) for name in needed}
        ready = [rank[name] for name, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            name = heapq.heappop(ready)[2]
            order.append(name)
            for down in self.dag.succ[name]:
                if down in waiting:
                    waiting[down] -= 1
                    if waiting[down] == 0:
                        heapq.heappush(ready, rank[down])
        return order

    def resolve_target(self, target: PathSpec) -> list[str]:
        """A stage name (all its jobs), a job name or an output path → job names."""
        text = target.text
        if text in self.jobs_by_stage:
            return self.jobs_by_stage[text]
        if text in self.jobs:
            return [text]
        path = normalize(text)
        if path in self.producer:
            return [self.producer[path]]
        inside = self.producers_under(path)
        if inside:
            return inside
        choices = list(self.jobs_by_stage) + list(self.jobs) + list(self.producer)
        message = f"unknown target '{text}'{did_you_mean(text, choices)}"
        if os.path.exists(path):
            message = f"'{text}' is a source file, not something a stage makes"
        if target.location.line:
            raise LoadError(message, target.location)
        raise UsageError(message)

    def check_inputs_exist(self, names: list[str]) -> None:
        """A load error for the first input of these jobs that exists nowhere."""
        for name in names:
            job = self.jobs[name]
            for path, location in zip(job.inputs, job.input_locations):
                if path in self.producer or os.path.exists(path) or self.producers_under(path):
                    continue
                raise LoadError(f"input '{path}' of '{name}' does not exist and no stage makes it", location)


def normalize(path: str) -> str:
    """Project-relative, normalized spelling of a path, so one file has one name."""
    return os.path.normpath(path) if path else path


class _FileLister:
    """Existing files under a directory, listed once per build and shared by every pattern.

    Each folder's stat is taken before it is read, so a later change to its entries shows as a
    different stat, and its listing's signature is kept: the fast path (snapshot.py) relies on both.
    """

    def __init__(self, is_stale: Callable[[str], bool]):
        self.cache: dict[str, list[str]] = {}
        self.is_stale = is_stale
        self.folders: dict[str, tuple[int, int, int, int, str] | None] = {}  # as BuildGraph.listed_folders

    def under(self, directory: str) -> list[str]:
        if directory not in self.cache:
            found = []
            pending = [directory or "."]
            while pending:
                folder = pending.pop()
                try:
                    taken = time.time_ns()
                    st = os.stat(folder)
                    entries = list(os.scandir(folder))
                except OSError:  # missing, not a folder, a symlink loop, a name too long: nothing to match
                    self.folders[folder] = None
                    continue
                self.folders[folder] = (st.st_mtime_ns, st.st_ino, st.st_ctime_ns, taken, listing_signature(entries))
                for entry in entries:
                    path = normalize(entry.path)
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name not in _IGNORED_DIRS:
                            pending.append(path)
                    elif not self.is_stale(path):
                        found.append(path)
            self.cache[directory] = sorted(found)
        return self.cache[directory]


def _fixed_prefix_dir(pattern: str) -> str:
    """The deepest directory of a pattern/glob that contains no wildcard."""
    wildcard = min((i for i, c in enumerate(pattern) if c in "%*?["), default=len(pattern))
    return os.path.dirname(pattern[:wildcard])


def _glob_to_regex(glob_text: str) -> str:
    """Shell glob → regex source: `*` and `?` stay inside one folder, `**/` spans folders."""
    out, i = [], 0
    while i < len(glob_text):
        c = glob_text[i]
        if glob_text.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob_text.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in glob_text[i + 2:]:
            end = glob_text.index("]", i + 2)
            body = glob_text[i + 1:end]
            negated = body[:1] in ("!", "^")
            members = (body[1:] if negated else body).replace("\\", "\\\\")
            out.append(("[^" if negated else "[") + members + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@functools.cache
def glob_regex(glob_text: str) -> re.Pattern:
    return re.compile(_glob_to_regex(glob_text) + r"\Z", re.S)


def _pattern_regex(pattern: str) -> re.Pattern:
    """`%` matches any non-empty text (slashes too); glob characters keep their meaning."""
    head, tail = pattern.split("%", 1)
    return re.compile(f"{_glob_to_regex(head)}(?P<stem>.+?){_glob_to_regex(tail)}\\Z", re.S)


def build_graph(pipeline: Pipeline, is_stale: Callable[[str], bool] = lambda path: False) -> BuildGraph:
    """Expand stages into jobs (patterns, globs), wire producers and check the DAG is acyclic.

    `is_stale(path)` says a file on disk is a leftover output of a job that no longer exists:
    such files never feed a glob or pattern.
    """
    lister = _FileLister(is_stale)
    producer: dict[str, str] = {}
    declared_at: dict[str, Location] = {}
    jobs: dict[str, Job] = {}
    jobs_by_stage: dict[str, list[str]] = {stage.name: [] for stage in pipeline.stages}

    def declare(job_name: str, path: str, location: Location) -> None:
        if path in producer:
            raise LoadError(f"output '{path}' is already declared by '{producer[path]}' at {declared_at[path]}",
                            location)
        producer[path] = job_name
        declared_at[path] = location

    plain = [stage for stage in pipeline.stages if stage.pattern_input is None]
    patterned = [stage for stage in pipeline.stages if stage.pattern_input is not None]
    for stage in plain:
        for spec in stage.outputs:
            declare(stage.name, normalize(spec.text), spec.location)

    # Pattern stages chain (a.txt → a.up → a.gz), so expand them until no new job appears.
    stems: dict[str, set[str]] = {stage.name: set() for stage in patterned}
    for _ in range(MAX_PATTERN_ROUNDS):
        grew = False
        for stage in patterned:
            for stem in _match_pattern(stage, lister, producer, stems[stage.name]):
                stems[stage.name].add(stem)
                name = f"{stage.name}[{stem}]"
                for spec in stage.outputs:
                    declare(name, normalize(spec.text.replace("%", stem)), spec.location)
                grew = True
        if not grew:
            break
    else:
        raise LoadError("pattern stages keep generating new jobs from each other's outputs",
                        patterned[0].location)

    outputs_sorted = sorted(producer)
    for stage in plain:
        job = _make_job(stage, stage.name, None, lister, producer, outputs_sorted)
        jobs[job.name] = job
        jobs_by_stage[stage.name].append(job.name)
    for stage in patterned:
        for stem in sorted(stems[stage.name]):
            job = _make_job(stage, f"{stage.name}[{stem}]", stem, lister, producer, outputs_sorted)
            jobs[job.name] = job
            jobs_by_stage[stage.name].append(job.name)

    graph = BuildGraph(pipeline, jobs, producer, nx.DiGraph(), jobs_by_stage, lister.folders)
    _add_edges(graph)
    return graph


def _match_pattern(stage: Stage, lister: _FileLister, producer: dict[str, str], known: set[str]) -> list[str]:
    """Stems of files (existing or declared) matching the stage's `%` input, not yet known."""
    pattern = normalize(stage.pattern_input.text)
    regex = _pattern_regex(pattern)
    own_prefix = stage.name + "["
    found = set()
    for path in [*lister.under(_fixed_prefix_dir(pattern)), *producer]:
        match = regex.match(path)
        if match and not producer.get(path, "").startswith(own_prefix):  # never its own outputs
            found.add(match.group("stem"))
    return sorted(found - known)


def _make_job(stage: Stage, name: str, stem: str | None, lister: _FileLister, producer: dict[str, str],
              outputs_sorted: list[str]) -> Job:
    outputs = tuple(normalize(spec.text.replace("%", stem) if stem is not None else spec.text)
                    for spec in stage.outputs)
    own = set(outputs)
    inputs: list[str] = []
    locations: list[Location] = []
    seen: set[str] = set()
    specs = list(stage.inputs)
    if stem is not None:  # the `%` input comes first in $in
        first = stage.pattern_input
        specs.remove(first)
        specs.insert(0, first)
    for spec in specs:
        text = spec.text.replace("%", stem) if stem is not None else spec.text
        if spec.is_glob:
            pattern = normalize(text)
            regex = glob_regex(pattern)
            matches = [path for path in lister.under(_fixed_prefix_dir(pattern)) if regex.match(path)]
            matches += [path for path in producer if regex.match(path)]
            paths = sorted(set(matches) - own)
        else:
            paths = [normalize(text)]
        for path in paths:
            if path not in seen:
                seen.add(path)
                inputs.append(path)
                locations.append(spec.location)
    recipe = _render_recipe(stage, name, stem, inputs, outputs)
    return Job(name=name, stage=stage, inputs=tuple(inputs), outputs=outputs, recipe=recipe, stem=stem,
               input_locations=tuple(locations))


def _render_recipe(stage: Stage, name: str, stem: str | None, inputs: list[str], outputs: tuple[str, ...]) -> str:
    """Substitute the per-job variables; paths are shell-quoted."""
    parts = []
    for part in stage.recipe:
        if isinstance(part, str):
            parts.append(part)
        else:
            parts.append(_job_variable(part, stage, name, stem, inputs, outputs))
    return "".join(parts)


def _job_variable(var: JobVar, stage: Stage, name: str, stem: str | None, inputs, outputs) -> str:
    if var.name == "stage":
        return shlex.quote(name)
    if var.name == "stem":
        if stem is None:
            raise LoadError(f"$stem is only set in pattern stages ('{stage.name}' has no '%' input)", var.location)
        return shlex.quote(stem)
    paths = inputs if var.name.startswith("in") else outputs
    index = var.name[2:] if var.name.startswith("in") else var.name[3:]
    if index == "":
        return " ".join(shlex.quote(path) for path in paths)
    if int(index) >= len(paths):
        kind = "input" if var.name.startswith("in") else "output"
        raise LoadError(f"${var.name}: stage '{stage.name}' has only {len(paths)} {kind}(s)", var.location)
    return shlex.quote(paths[int(index)])


def _add_edges(graph: BuildGraph) -> None:
    dag = graph.dag
    dag.add_nodes_from(graph.jobs)
    for name, job in graph.jobs.items():
        for path in job.inputs:
            if path in graph.producer:
                dag.add_edge(graph.producer[path], name)
            elif not os.path.isfile(path):
                for upstream in graph.producers_under(path):  # a directory input holding outputs
                    dag.add_edge(upstream, name)
        for spec in job.stage.after:
            if spec.text in graph.jobs_by_stage:
                upstreams = graph.jobs_by_stage[spec.text]
            elif spec.text in graph.jobs:
                upstreams = [spec.text]
            else:
                choices = list(graph.jobs_by_stage)
                raise LoadError(f"'after:' names unknown stage '{spec.text}'{did_you_mean(spec.text, choices)}",
                                spec.location)
            for upstream in upstreams:
                dag.add_edge(upstream, name)
    if not nx.is_directed_acyclic_graph(dag):
        raise _cycle_error(graph, nx.find_cycle(dag))


def _cycle_error(graph: BuildGraph, edges) -> LoadError:
    chain = [edge[0] for edge in edges] + [edges[-1][1]]
    first = graph.jobs[chain[0]].stage
    steps = [f"  {name} ({graph.jobs[name].stage.location})" for name in chain]
    return LoadError("dependency cycle: " + " → ".join(chain), first.location,
                     notes=("the chain, each needing the next's output:", *steps))
