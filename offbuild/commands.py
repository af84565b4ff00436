"""What each command-line mode does, given a loaded project."""
from __future__ import annotations

import json
import os
import sys
import time

from .build import Builder, dry_run, remove_stale_outputs
from .errors import UsageError
from .executor import LocalExecutor
from .planner import Action, Planner
from .records import iso, new_run_id, write_run_record
from .reporter import PlainReporter
from .session import STATE_DIR, open_project

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def run_command(args, targets: list[str], overrides: dict[str, str]) -> int:
    """Load the project named by `args` and run the mode the flags ask for."""
    modes = [flag for flag in ("explain", "watch", "list", "graph", "clean") if getattr(args, flag)]
    if len(modes) > 1:
        raise UsageError(f"--{modes[0]} and --{modes[1]} cannot be combined")
    if args.watch:
        raise UsageError("--watch is not available yet in this version")
    project = open_project(args.file, overrides)
    try:
        if args.explain:
            targets = [args.explain] + targets
        order = project.graph.select(project.targets(targets))
        project.graph.check_inputs_exist(order)
        verbosity = args.verbose - args.quiet
        if args.list:
            return list_stages(project, order)
        if args.graph:
            return print_graph(project, order, args.graph)
        if args.clean:
            return clean(project, order, args.dry_run, verbosity)
        if args.explain:
            return explain(project, order)
        if args.dry_run:
            return show_dry_run(project, order, args.force)
        return build(project, order, args, targets, verbosity)
    finally:
        project.store.close()


def build(project, order: list[str], args, targets: list[str], verbosity: int) -> int:
    started_wall, started = time.time(), time.monotonic()
    run_id = args.run_id or new_run_id()
    reporter = PlainReporter(len(order), verbosity, sys.stderr if args.json else sys.stdout)
    remove_stale_outputs(project.graph, project.records, project.hasher, project.store, reporter)
    planner = Planner(project.hasher, project.records, force=args.force)
    executor = LocalExecutor(os.getcwd(), STATE_DIR, run_id, offline=args.offline, warn=reporter.message)
    try:
        if args.offline == "strict":
            executor.spawner(isolate=True)  # refuse before anything runs
        builder = Builder(project.graph, order, project.store, project.hasher, planner, executor, reporter,
                          jobs=args.jobs, keep_going=args.keep_going, run_id=run_id)
        result = builder.run()
    finally:
        executor.close()
    counts = result.counts()
    record = {
        "run_id": run_id, "started": iso(started_wall), "ended": iso(time.time()), "status": result.status,
        "targets": targets or [spec.text for spec in project.targets([])], "offline": executor.offline_status(),
        "counts": counts,
        "hashed": {"files": project.hasher.files_hashed, "bytes": project.hasher.bytes_hashed},
        "jobs": [outcome.as_record() for outcome in result.outcomes.values() if outcome.action != "skipped"],
        "skipped": [outcome.name for outcome in result.outcomes.values() if outcome.action == "skipped"],
    }
    write_run_record(STATE_DIR, record)
    reporter.summary(counts, time.monotonic() - started, {"ok": "done"}.get(result.status, result.status))
    if args.json:
        print(json.dumps(record, indent=2))
    return {"ok": EXIT_OK, "failed": EXIT_FAILED, "interrupted": EXIT_INTERRUPTED}[result.status]


def show_dry_run(project, order: list[str], force: bool) -> int:
    planner = Planner(project.hasher, project.records, force=force)
    decisions = dry_run(project.graph, order, planner)
    would_run = [d for d in decisions if d.action is Action.RUN]
    for decision in would_run:
        print(f"would run {decision.job}: {decision.describe()}")
    print(f"offbuild: dry run: {len(would_run)} would run, {len(decisions) - len(would_run)} up to date")
    return EXIT_OK


def list_stages(project, order: list[str]) -> int:
    graph = project.graph
    for stage in graph.pipeline.stages:
        jobs = graph.jobs_by_stage[stage.name]
        doc = f"  {stage.doc}" if stage.doc else ""
        print(f"{stage.name}{doc}")
        if stage.pattern_input is not None:
            for name in jobs:
                print(f"    {name}")
    return EXIT_OK


def print_graph(project, order: list[str], form: str) -> int:
    dag = project.graph.dag.subgraph(order)
    if form == "json":
        print(json.dumps({"nodes": order, "edges": sorted([a, b] for a, b in dag.edges)}, indent=2))
    elif form == "mermaid":
        ids = {name: f"n{index}" for index, name in enumerate(order)}
        print("graph LR")
        for name in order:
            print(f'    {ids[name]}["{name}"]')
        for a, b in sorted(dag.edges):
            print(f"    {ids[a]} --> {ids[b]}")
    else:
        print("digraph offbuild {\n    rankdir=LR;")
        for name in order:
            print(f"    {json.dumps(name)};")
        for a, b in sorted(dag.edges):
            print(f"    {json.dumps(a)} -> {json.dumps(b)};")
        print("}")
    return EXIT_OK


def clean(project, order: list[str], dry: bool, verbosity: int) -> int:
    removed = 0
    for name in order:
        for path in project.graph.jobs[name].outputs:
            if os.path.lexists(path):
                removed += 1
                print(f"{'would remove' if dry else 'removed'} {path}")
                if not dry:
                    from .build import _remove
                    _remove(path)
    if not dry:
        project.store.forget_jobs(order)
    print(f"offbuild: {'would remove' if dry else 'removed'} {removed} file(s)")
    return EXIT_OK


def explain(project, order: list[str]) -> int:
    planner = Planner(project.hasher, project.records)
    for decision in dry_run(project.graph, order, planner):
        verb = "will run" if decision.action is Action.RUN else "will skip"
        print(f"{decision.job}: {verb}: {decision.describe()}")
    return EXIT_OK
