"""What each command-line mode does, given a loaded project."""
from __future__ import annotations

import json
import os
import sys

from . import inspection, run, snapshot
from .build import remove_stale_outputs
from .errors import UsageError
from .executor import Executor
from .explain import Paint, explain_jobs, render_json, render_text, wants_colour
from .run import EXIT_FAILED, EXIT_OK
from .session import STATE_DIR, open_project


def run_command(args, targets: list[str], overrides: dict[str, str]) -> int:
    """Load the project named by `args` and run the mode the flags ask for."""
    modes = [flag for flag in ("explain", "watch", "list", "graph", "clean", "lint") if getattr(args, flag)]
    if len(modes) > 1:
        raise UsageError(f"--{modes[0]} and --{modes[1]} cannot be combined")
    if args.watch:
        from .watch import watch  # watchdog is imported in watch mode only

        return watch(args, targets, overrides, build, run.make_executor)
    # Only a build or --clean may write; the others look without touching the disk.
    readonly = bool(args.explain or args.dry_run or args.list or args.graph or args.lint) and not args.clean
    snapshot_for = (os.path.abspath(args.file), list(targets), dict(overrides))  # before open_project's chdir
    project = open_project(args.file, overrides, getattr(args, "invocation_dir", None), readonly)
    try:
        if args.explain:
            targets = [args.explain] + targets
        order = project.graph.select(project.targets(targets))
        if not (args.lint or args.list or args.graph or args.clean):  # those work with sources missing
            project.graph.check_inputs_exist(order)
        verbosity = args.verbose - args.quiet
        if args.lint:  # without targets, lint every stage, not just the default ones
            return run_lint(project, order if targets else list(project.graph.jobs))
        if args.list:
            return list_stages(project, order)
        if args.graph:
            return print_graph(project, order, args.graph)
        if args.clean:
            return clean(project, order, args.dry_run, verbosity)
        if args.explain:
            return explain(project, order, args.explain, args.force, args.json)
        if args.dry_run:
            return run.show_dry_run(project, order, args.force)
        pipefile, given_targets, given_overrides = snapshot_for
        key = snapshot.snapshot_key(pipefile, given_targets, given_overrides, project.cwd_offset)
        return build(project, order, args, targets, verbosity, key)
    finally:
        project.store.close()


def build(project, order: list[str], args, targets: list[str], verbosity: int,
          snapshot_key: tuple | None = None, *, run_id: str | None = None,
          executor: Executor | None = None) -> int:
    """One full-path build of `order`; watch mode passes its long-lived `executor` and a run id."""
    shown_targets = targets or [spec.text for spec in project.targets([])]

    def capture():
        return snapshot.capture(snapshot_key, project, order, shown_targets) if snapshot_key else None

    def remove_stale(reporter) -> None:
        remove_stale_outputs(project.graph, project.records, project.hasher, project.store, reporter)

    return run.build(project, order, args, shown_targets, verbosity, capture=capture, before=remove_stale,
                     estimates=lambda: inspection.planned_durations(project, order, args.force),
                     run_id=run_id, executor=executor)


def list_stages(project, order: list[str]) -> int:
    """`--list`: every stage (and pattern job) with its doc line, inputs, outputs and state."""
    sys.stdout.write(inspection.render_list(project))
    return EXIT_OK


def print_graph(project, order: list[str], form: str) -> int:
    """`--graph[=dot|mermaid|json]`: the DAG the targets need, nodes marked by what a build would do."""
    decisions = inspection.plan(project, order)
    states = {name: inspection.job_state(project, decisions[name]) for name in order}
    if form == "json":
        print(json.dumps(inspection.graph_data(project, order, states, decisions), indent=2))
    elif form == "mermaid":
        sys.stdout.write(inspection.render_mermaid(project, order, states))
    else:
        sys.stdout.write(inspection.render_dot(project, order, states))
    return EXIT_OK


def clean(project, order: list[str], dry: bool, verbosity: int) -> int:
    """`--clean`: delete the declared outputs, checkpoints and records of `order`; `-n` only lists."""
    removals = inspection.clean_plan(project, order, STATE_DIR)
    verb = "would remove" if dry else "removed"
    removed = 0
    for removal in removals:
        if removal.kept:
            print(f"offbuild: kept {removal.path}: {removal.kept}", file=sys.stderr)
            continue
        if not dry:
            inspection.remove_path(removal.path)
        removed += 1
        if verbosity >= 0:
            print(f"{verb} {removal.path}" + (" (checkpoint)" if removal.kind == "checkpoint" else ""))
    known = [name for name in order if name in project.records]
    if known and not dry:
        project.store.forget_jobs(known)
    forget = "would forget" if dry else "forgot"
    print(f"offbuild: {verb} {removed} file(s), {forget} {len(known)} job record(s)")
    return EXIT_OK


def explain(project, order: list[str], target: str, force: bool, as_json: bool) -> int:
    """`--explain T`: runs nothing and writes nothing; prints the planner's reasons per job."""
    decisions = list(inspection.plan(project, order, force).values())
    checkpoints = {name: inspection.checkpoint_file(STATE_DIR, project.graph.jobs[name])
                   for name in order if project.graph.jobs[name].stage.checkpoint}
    explanations = explain_jobs(decisions, project.records, project.store.load_decisions(), checkpoints)
    if as_json:
        print(json.dumps(render_json(explanations, target), indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(render_text(explanations, target, Paint(wants_colour(sys.stdout))))
    return EXIT_OK


def run_lint(project, order: list[str]) -> int:
    """Exit 1 when an offline stage's Python script imports a networking module."""
    from .lint import lint

    findings = lint([project.graph.jobs[name] for name in order])
    for finding in findings:
        print(finding)
    print(f"offbuild: lint: {len(findings)} finding(s)")
    return EXIT_FAILED if findings else EXIT_OK
