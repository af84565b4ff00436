"""One build, start to finish: executor, scheduler, run record, snapshot. Both the full path
(commands.py) and the fast path (fastpath.py) end here, so a build behaves the same either way."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

from . import snapshot, state_dir_for
from .errors import UsageError
from .executor import Executor, LocalExecutor
from .records import iso, new_run_id, write_run_record
from .reporter import make_reporter

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
_SETTLED = ("ran", "skipped", "resumed", "restored")  # outcomes after which a job is up to date


def build(project, order: list[str], args, shown_targets: list[str], verbosity: int, *,
          estimates: Callable[[], dict[str, float | None]] | None = None,
          capture: Callable[[set[str]], tuple | dict | None] | None = None, presumed_done: tuple[str, ...] = (),
          run_id: str | None = None, executor: Executor | None = None,
          before: Callable[[object], None] | None = None, fast_path: bool = False,
          cache_at: str | None = None) -> int:
    """Build `order` and record the run. `presumed_done` are jobs the fast path proved up to date
    (counted as skipped), `fast_path` says the fast path chose what to decide. `capture(unsettled)`
    makes the snapshot to save afterwards, given the jobs left not up to date (None removes it).
    `before(reporter)` runs first; `cache_at` is the shared cache to use, if any; watch mode passes
    its long-lived `executor` (closed by its owner)."""
    # Loaded here, not at the top: the fast path starts the executor's spawner first, then these load.
    from .build import Builder
    from .planner import Planner

    started_wall, started = time.time(), time.monotonic()
    run_id = run_id or args.run_id or new_run_id()
    # Opened first: an unusable cache is a usage error before any output is drawn, removed or run.
    cache = None
    if cache_at:
        from .cache import OutputCache  # loaded only when a cache is configured

        cache = OutputCache.open(cache_at, create=True, warn=lambda text: reporter.message(text))
    reporter = make_reporter(len(order) + len(presumed_done), verbosity, sys.stderr if args.json else sys.stdout,
                             parallel=args.jobs, estimates=estimates)
    owned = executor is None
    if owned:  # before anything changes on disk: an unreachable cluster is a usage error
        executor = make_executor(args, run_id, reporter.message)
    else:
        executor.run_id, executor.warn = run_id, reporter.message
    try:
        if before is not None:
            before(reporter)
        planner = Planner(project.hasher, project.records, force=args.force)
        if args.offline == "strict":
            executor.require_isolation()  # refuse before anything runs
        builder = Builder(project.graph, order, project.store, project.hasher, planner, executor, reporter,
                          jobs=args.jobs, keep_going=args.keep_going, run_id=run_id, cache=cache)
        result = builder.run()
    finally:
        if owned:
            executor.close()
    counts = result.counts()
    # The jobs the fast path proved up to date count as skipped, without an outcome each (10,000 of
    # them on a one-file edit of a big pipeline).
    counts["total"] += len(presumed_done)
    counts["skipped"] += len(presumed_done)
    record = {
        "run_id": run_id, "started": iso(started_wall), "ended": iso(time.time()), "status": result.status,
        "targets": shown_targets, "offline": executor.offline_status(), "counts": counts,
        "hashed": {"files": project.hasher.files_hashed, "bytes": project.hasher.bytes_hashed},
        "jobs": [outcome.as_record() for outcome in result.outcomes.values() if outcome.action != "skipped"],
        "skipped": [outcome.name for outcome in result.outcomes.values() if outcome.action == "skipped"]
        + list(presumed_done),
    }
    if fast_path:
        record["fast_path"] = "changes"
    write_run_record(project.state_dir, record)
    unsettled = {outcome.name for outcome in result.outcomes.values() if outcome.action not in _SETTLED}
    snapshot.save(project.state_dir, capture(unsettled) if capture is not None else None)
    reporter.summary(counts, time.monotonic() - started, {"ok": "done"}.get(result.status, result.status))
    if args.json:
        print(json.dumps(record, indent=2))
    return {"ok": EXIT_OK, "failed": EXIT_FAILED, "interrupted": EXIT_INTERRUPTED}[result.status]


def show_dry_run(project, order: list[str], force: bool, presumed_done: int = 0) -> int:
    """`-n`: what would run and why; `presumed_done` jobs the fast path proved up to date."""
    from .build import dry_run
    from .planner import Action, Planner

    decisions = dry_run(project.graph, order, Planner(project.hasher, project.records, force=force))
    would_run = [decision for decision in decisions if decision.action is Action.RUN]
    for decision in would_run:
        print(f"would run {decision.job}: {decision.describe()}")
    up_to_date = len(decisions) - len(would_run) + presumed_done
    print(f"offbuild: dry run: {len(would_run)} would run, {up_to_date} up to date")
    return EXIT_OK


def make_executor(args, run_id: str, warn=lambda text: None) -> Executor:
    """The executor `--executor` names: local processes, or a Dask cluster (dask imported only then)."""
    if getattr(args, "executor", "local") != "dask":
        return LocalExecutor(os.getcwd(), state_dir_for(args.file), run_id, offline=args.offline, warn=warn,
                             slots=args.jobs)
    try:
        from .dask_executor import DaskExecutor
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in ("dask", "distributed"):
            raise
        raise UsageError("--executor dask needs Dask's distributed package: pip install 'offbuild[dask]'"
                         f" ({error})") from None
    return DaskExecutor(os.getcwd(), state_dir_for(args.file), run_id, args.scheduler, offline=args.offline,
                        warn=warn)
