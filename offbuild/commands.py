"""What each command-line mode does, given a loaded project."""
from __future__ import annotations

import json
import os
import sys

from . import inspection, run, snapshot
from .build import remove_path, remove_stale_outputs
from .cache import OutputCache, parse_size, why_not_cached
from .cachesetting import PIPEFILE_VARIABLE, cache_location
from .errors import UsageError
from .executor import Executor
from .explain import Paint, explain_jobs, render_json, render_text, wants_colour
from .planner import Action, Reason, stage_key
from .run import EXIT_FAILED, EXIT_OK
from .session import open_project


def run_command(args, targets: list[str], overrides: dict[str, str]) -> int:
    """Load the project named by `args` and run the mode the flags ask for."""
    modes = [flag for flag in ("explain", "watch", "list", "graph", "clean", "lint", "cache_prune")
             if getattr(args, flag)]
    if len(modes) > 1:
        raise UsageError(f"--{modes[0]} and --{modes[1].replace('_', '-')} cannot be combined")
    if args.cache_prune:
        return prune_cache(args, overrides)
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
            cache = open_cache(args, project, create=False, warn=lambda text: print(text, file=sys.stderr))
            return explain(project, order, args.explain, args.force, args.json, cache)
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
    pipefile_cache = pipefile_cache_location(project)

    def capture(unsettled: set[str]):
        if snapshot_key is None:
            return None
        return snapshot.capture(snapshot_key, project, order, shown_targets, pipefile_cache, unsettled)

    def remove_stale(reporter) -> None:
        remove_stale_outputs(project.graph, project.records, project.hasher, project.store, reporter)

    return run.build(project, order, args, shown_targets, verbosity, capture=capture, before=remove_stale,
                     estimates=lambda: inspection.planned_durations(project, order, args.force),
                     run_id=run_id, executor=executor, cache_at=None if args.no_cache else args.user_cache or pipefile_cache)


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
    removals = inspection.clean_plan(project, order, project.state_dir)
    verb = "would remove" if dry else "removed"
    removed = 0
    for removal in removals:
        if removal.kept:
            print(f"offbuild: kept {removal.path}: {removal.kept}", file=sys.stderr)
            continue
        if not dry:
            remove_path(removal.path)
        removed += 1
        if verbosity >= 0:
            print(f"{verb} {removal.path}" + (" (checkpoint)" if removal.kind == "checkpoint" else ""))
    known = [name for name in order if name in project.records]
    if known and not dry:
        project.store.forget_jobs(known)
    forget = "would forget" if dry else "forgot"
    print(f"offbuild: {verb} {removed} file(s), {forget} {len(known)} job record(s)")
    return EXIT_OK


def explain(project, order: list[str], target: str, force: bool, as_json: bool, cache: OutputCache | None) -> int:
    """`--explain T`: runs nothing and writes nothing; prints the planner's reasons per job."""
    decisions = list(inspection.plan(project, order, force).values())
    checkpoints = {name: inspection.checkpoint_file(project.state_dir, project.graph.jobs[name])
                   for name in order if project.graph.jobs[name].stage.checkpoint}
    cached = cache_states(project, decisions, cache) if cache is not None and not force else None
    explanations = explain_jobs(decisions, project.records, project.store.load_decisions(), checkpoints, cached)
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


def pipefile_cache_location(project) -> str | None:
    """The Pipefile's own `cache = ...`, resolved from its folder (the current directory by now)."""
    return cache_location(None, {}, project.pipeline.variables.get(PIPEFILE_VARIABLE), "", os.getcwd())


def open_cache(args, project, *, create: bool, warn) -> OutputCache | None:
    """The cache this build uses (`--cache` > $OFFBUILD_CACHE > the Pipefile's `cache = ...`), or None."""
    if getattr(args, "no_cache", False):
        return None
    location = getattr(args, "user_cache", None) or pipefile_cache_location(project)
    return OutputCache.open(location, create=create, warn=warn) if location else None


def cache_states(project, decisions, cache: OutputCache) -> dict[str, str]:
    """For `--explain`, per job that would run: "hit" (the cache holds its key), "miss", "never: <why>"
    or "unknown" (its key depends on upstream jobs that would run their recipes). A job downstream of
    hits is looked up under the key the restored outputs would give it. Reads only."""
    states: dict[str, str] = {}
    restorable: dict[str, str] = {}  # output path → digest it would have once restored
    for decision in decisions:
        if decision.action is not Action.RUN:
            continue
        job = project.graph.jobs[decision.job]
        refusal = why_not_cached(job)
        if refusal is not None:
            states[decision.job] = f"never: {refusal}"
            continue
        inputs = {path: restorable.get(path, digest) for path, digest in decision.inputs.items()}
        if any(why.reason is Reason.INPUT_MISSING for why in decision.reasons) or None in inputs.values():
            states[decision.job] = "unknown"
            continue
        key = stage_key(job, inputs, decision.env)
        record = project.records.get(decision.job)
        if record is not None and record.key == key and not record.failed:
            continue  # the restored inputs are what it was built from: early cutoff may skip it
        entry = cache.lookup(key)
        states[decision.job] = "hit" if entry is not None else "miss"
        if entry is not None:
            restorable.update((path, output.digest) for path, output in entry.outputs.items())
    return states


def prune_cache(args, overrides: dict[str, str]) -> int:
    """`--cache-prune SIZE`: shrink the configured cache to SIZE, least recently used entries first
    (with `-n`, only say what would go)."""
    limit = parse_size(args.cache_prune)
    warn = lambda text: print(text, file=sys.stderr)  # noqa: E731
    cache = None
    if args.user_cache:  # no Pipefile needed (a CI job that only maintains the cache)
        cache = OutputCache.open(args.user_cache, create=False, warn=warn)
    elif os.path.isfile(args.file) and not args.no_cache:
        project = open_project(args.file, overrides, getattr(args, "invocation_dir", None), readonly=True)
        try:
            cache = open_cache(args, project, create=False, warn=warn)
        finally:
            project.store.close()
    if cache is None:
        raise UsageError("--cache-prune needs a cache: --cache DIR_OR_URL, $OFFBUILD_CACHE or 'cache = ...'"
                         " in the Pipefile")
    report = cache.prune(limit, dry=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"offbuild: cache {cache.location}: {verb} {report.entries_removed} entries and "
          f"{report.blobs_removed} blobs; {_size(report.bytes_before)} → {_size(report.bytes_after)}"
          f" (limit {_size(limit)})")
    return EXIT_OK


def _size(count: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count}B"
