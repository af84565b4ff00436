"""Looking at a project without building it: `--list`, `--graph`, `--clean`, and the plan they
(and the progress display) show. States come from the planner's dry run; nothing here decides."""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import STATE_DIR
from .build import dry_run
from .executor import checkpoint_path_for
from .graph import BuildGraph
from .model import Job, Location, PathSpec
from .planner import Action, Decision, Planner

UP_TO_DATE, WILL_RUN, FAILED = "up to date", "will run", "failed last time"
_EVERYTHING = Location("<every stage>", 0, 0)


def checkpoint_file(state_dir: str, job: Job) -> str:
    """Where the executor keeps this job's checkpoint."""
    return checkpoint_path_for(state_dir, job.name)


def plan(project, order: list[str], force: bool = False) -> dict[str, Decision]:
    """What a build of `order` would do with each job, by the planner's dry run (reads only)."""
    planner = Planner(project.hasher, project.records, force=force)
    return {decision.job: decision for decision in dry_run(project.graph, order, planner)}


def job_state(project, decision: Decision) -> str:
    """up to date | will run | failed last time (which also means it will run)."""
    record = project.records.get(decision.job)
    if record is not None and record.failed:
        return FAILED
    return WILL_RUN if decision.action is Action.RUN else UP_TO_DATE


def planned_durations(project, order: list[str], force: bool = False) -> dict[str, float | None]:
    """The jobs a build is expected to run, each with its last recorded duration (None if unknown)."""
    decisions = plan(project, order, force)
    return {name: (project.records[name].duration if name in project.records else None)
            for name, decision in decisions.items() if decision.action is Action.RUN}


def every_job(graph: BuildGraph) -> list[str]:
    """All jobs of the pipeline, in build order."""
    return graph.select([PathSpec(stage.name, _EVERYTHING) for stage in graph.pipeline.stages])


# -- --list


def render_list(project) -> str:
    """Each stage (and pattern job) with its doc line, inputs, outputs and whether it is up to date."""
    graph = project.graph
    decisions = plan(project, every_job(graph))
    defaults = {spec.text for spec in project.pipeline.default}
    width = max((len(stage.name) for stage in graph.pipeline.stages), default=0)
    lines = []
    for stage in graph.pipeline.stages:
        jobs = graph.jobs_by_stage[stage.name]
        states = [job_state(project, decisions[name]) for name in jobs]
        if stage.pattern_input is not None:
            stale = sum(1 for state in states if state != UP_TO_DATE)
            status = f"{len(jobs)} job(s), " + (f"{stale} will run" if stale else "all up to date")
        else:
            status = states[0] if states else UP_TO_DATE
        marker = " (default)" if stage.name in defaults else ""
        doc = f"  {stage.doc}" if stage.doc else ""
        lines.append(f"{stage.name.ljust(width)}  [{status}]{marker}{doc}")
        if stage.inputs:
            lines.append("    in:  " + " ".join(spec.text for spec in stage.inputs))
        if stage.outputs:
            lines.append("    out: " + " ".join(spec.text for spec in stage.outputs))
        if stage.pattern_input is not None:
            job_width = max((len(name) for name in jobs), default=0)
            for name, state in zip(jobs, states):
                lines.append(f"    {name.ljust(job_width)}  [{state}]")
    if project.pipeline.default:
        lines.append("default: " + " ".join(spec.text for spec in project.pipeline.default))
    return "\n".join(lines) + "\n"


# -- --graph


@dataclass(frozen=True, slots=True)
class Edge:
    """upstream → downstream, through these files (none: an `after:` ordering)."""

    upstream: str
    downstream: str
    files: tuple[str, ...]


def graph_edges(graph: BuildGraph, order: list[str]) -> list[Edge]:
    """The DAG's edges among `order`, each with the files that make it."""
    wanted = set(order)
    edges = []
    for upstream, downstream in sorted(graph.dag.subgraph(wanted).edges):
        inputs = graph.jobs[downstream].inputs
        files = [path for path in inputs if graph.producer.get(path) == upstream]
        if not files:  # a directory input holding the upstream job's outputs
            files = [path for path in inputs if upstream in graph.producers_under(path)]
        edges.append(Edge(upstream, downstream, tuple(files)))
    return edges


_COLOURS = {UP_TO_DATE: ("#d8f0dc", "#2e7d32"), WILL_RUN: ("#fff1c2", "#b58100"), FAILED: ("#f9d0d0", "#c62828")}
_CLASSES = {UP_TO_DATE: "uptodate", WILL_RUN: "willrun", FAILED: "failed"}


def _edge_label(files: tuple[str, ...]) -> str:
    return files[0] if len(files) == 1 else f"{len(files)} files"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(project, order: list[str], states: dict[str, str]) -> str:
    """Graphviz DOT: one box per job, filled by state; solid edges carry files, dashed ones `after:`."""
    lines = ["digraph offbuild {", "    rankdir=LR;",
             '    node [shape=box, style="rounded,filled", fontname="Helvetica"];',
             '    edge [fontname="Helvetica", fontsize=10];']
    for name in order:
        fill, border = _COLOURS[states[name]]
        label = f"{name}\n{states[name]}"
        lines.append(f"    {_dot_quote(name)} [label={_dot_quote(label)}, fillcolor=\"{fill}\", color=\"{border}\"];")
    for edge in graph_edges(project.graph, order):
        pair = f"{_dot_quote(edge.upstream)} -> {_dot_quote(edge.downstream)}"
        if edge.files:
            lines.append(f"    {pair} [label={_dot_quote(_edge_label(edge.files))}];")
        else:
            lines.append(f"    {pair} [style=dashed];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_text(text: str) -> str:
    return (text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;"))


def render_mermaid(project, order: list[str], states: dict[str, str]) -> str:
    """A Mermaid flowchart with the same nodes, states and edges as the DOT form."""
    ids = {name: f"n{index}" for index, name in enumerate(order)}
    lines = ["flowchart LR"]
    for name in order:
        label = f"{_mermaid_text(name)}<br/>{states[name]}"
        lines.append(f'    {ids[name]}["{label}"]:::{_CLASSES[states[name]]}')
    for edge in graph_edges(project.graph, order):
        if edge.files:
            label = _mermaid_text(_edge_label(edge.files))
            lines.append(f'    {ids[edge.upstream]} -->|"{label}"| {ids[edge.downstream]}')
        else:
            lines.append(f"    {ids[edge.upstream]} -.-> {ids[edge.downstream]}")
    for state, css in _CLASSES.items():
        fill, border = _COLOURS[state]
        lines.append(f"    classDef {css} fill:{fill},stroke:{border}")
    return "\n".join(lines) + "\n"


def graph_data(project, order: list[str], states: dict[str, str], decisions: dict[str, Decision]) -> dict:
    """The JSON form: nodes with their state and reasons, edges with their files."""
    nodes = []
    for name in order:
        job = project.graph.jobs[name]
        nodes.append({"id": name, "stage": job.stage.name, "state": states[name],
                      "action": decisions[name].action.value,
                      "reasons": [why.as_dict() for why in decisions[name].reasons],
                      "inputs": list(job.inputs), "outputs": list(job.outputs)})
    edges = [{"from": edge.upstream, "to": edge.downstream, "files": list(edge.files),
              "kind": "files" if edge.files else "after"} for edge in graph_edges(project.graph, order)]
    return {"nodes": nodes, "edges": edges}


# -- --clean


@dataclass(frozen=True, slots=True)
class Removal:
    """One path `--clean` deletes, or keeps with the reason why."""

    path: str
    kind: str  # output | checkpoint
    kept: str = ""  # why it is kept, when it is


def clean_plan(project, order: list[str], state_dir: str) -> list[Removal]:
    """Existing declared outputs and checkpoints of the jobs in `order`. Only declared outputs are
    ever candidates; one that is or holds a source (an input no stage makes, the Pipefile, the
    project itself or offbuild's state) is kept."""
    graph = project.graph
    sources = _source_paths(project)
    root = os.path.realpath(os.getcwd())
    # Every pipeline file's state: another file's lives inside `.offbuild/` too (see state_dir_for).
    protected = {root, os.path.realpath(state_dir), os.path.realpath(STATE_DIR), os.path.realpath(".git")}
    removals = []
    for name in order:
        job = graph.jobs[name]
        for path in job.outputs:
            if not os.path.lexists(path):
                continue
            removals.append(Removal(path, "output", _why_kept(path, sources, protected)))
        if job.stage.checkpoint:
            checkpoint = checkpoint_file(state_dir, job)
            for path in (checkpoint, checkpoint + ".key"):
                if os.path.lexists(path):
                    removals.append(Removal(path, "checkpoint"))
    return removals


def _source_paths(project) -> set[str]:
    """Real paths of every file a stage reads that no stage makes, and of the pipeline files."""
    graph = project.graph
    found = {os.path.realpath(path) for path in project.pipeline.sources}
    for job in graph.jobs.values():
        for path in job.inputs:
            if path not in graph.producer:
                found.add(os.path.realpath(path))
    return found


def _why_kept(path: str, sources: set[str], protected: set[str]) -> str:
    if os.path.islink(path):
        return ""  # removing a link never touches what it points to
    real = os.path.realpath(path)
    for guarded in protected:
        if real == guarded or guarded.startswith(real + os.sep):
            return f"it is or holds {os.path.relpath(guarded)}"
    if real in sources:
        return "it is also a source file"
    if os.path.isdir(real):
        inside = sorted(source for source in sources if source.startswith(real + os.sep))
        if inside:
            return f"it holds the source file {os.path.relpath(inside[0])}"
    return ""


