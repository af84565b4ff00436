"""The scheduler: decides each job when its inputs are final, runs what must run, records it."""
from __future__ import annotations

import gc
import os
import shutil
import stat as stat_module
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from queue import Empty, SimpleQueue
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .executor import NETWORK_HINT, NETWORK_SYMPTOMS, Executor, RecipeResult
from .hashing import FileHasher
from .locks import JobLocks
from .planner import Action, Decision, Planner, Reason, job_options
from .reporter import Reporter
from .state import StateStore, Success

if TYPE_CHECKING:  # the fast path builds without networkx (any graph with the same methods will do),
    # and cache.py loads only when a cache is configured
    from .cache import CacheEntry, OutputCache
    from .graph import BuildGraph


_STAT_ENTRIES_PER_SAVE = 512


@dataclass(slots=True)
class Outcome:
    """What happened to one job in this build."""

    name: str
    action: str  # ran | resumed | restored | skipped | failed | interrupted | blocked
    decision: Decision | None = None
    result: RecipeResult | None = None
    error: str = ""
    seconds: float | None = None  # how long a restore from the cache took (no recipe ran)

    def as_record(self) -> dict:
        entry: dict = {"stage": self.name, "action": self.action}
        if self.decision is not None:
            entry["reasons"] = [why.as_dict() for why in self.decision.reasons]
            entry["key"] = self.decision.key
        if self.result is not None:
            entry["attempts"] = [{"attempt": a.number, "exit_code": a.exit_code, "duration": round(a.duration, 4),
                                  **({"timed_out": True} if a.timed_out else {}),
                                  **({"worker": a.worker} if a.worker is not None else {})}
                                 for a in self.result.attempts]
            entry["duration"] = round(self.result.duration, 4)
            entry["exit_code"] = self.result.exit_code
            if self.result.has_log():
                entry["log"] = self.result.log_path
            if self.result.worker is not None:
                entry["worker"] = self.result.worker
        if self.seconds is not None:
            entry["duration"] = round(self.seconds, 4)
        if self.error:
            entry["error"] = self.error
        return entry


@dataclass(slots=True)
class BuildResult:
    status: str  # ok | failed | interrupted
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        tally = Counter(outcome.action for outcome in self.outcomes.values())
        return {"total": len(self.outcomes), "ran": tally["ran"], "skipped": tally["skipped"],
                "failed": tally["failed"] + tally["interrupted"], "resumed": tally["resumed"],
                "restored": tally["restored"], "blocked": tally["blocked"]}


class Builder:
    """Runs the jobs of `order` (already in dependency order) with at most `jobs` at once.

    With a `cache`, a job that must run is first looked up by its stage key and restored when the
    cache holds it; a job whose recipe ran is stored in the background."""

    def __init__(self, graph: BuildGraph, order: list[str], store: StateStore, hasher: FileHasher,
                 planner: Planner, executor: Executor, reporter: Reporter, *, jobs: int,
                 keep_going: bool, run_id: str, cache: OutputCache | None = None):
        self.graph = graph
        self.order = order
        self.store = store
        self.hasher = hasher
        self.planner = planner
        self.executor = executor
        self.reporter = reporter
        self.max_jobs = max(1, jobs)
        self.keep_going = keep_going
        self.run_id = run_id
        self.result = BuildResult("ok", {name: Outcome(name, "blocked") for name in order})
        self.resumed: set[str] = set()
        self.locks = JobLocks(executor.state_dir)
        self._unmade_folders: dict[str, list[str]] = {}  # outputs to look up once their folder is made
        self.cache = cache
        self._stores: dict[Future, str] = {}  # background stores → job
        self._store_broken = False

    def run(self) -> BuildResult:
        """Build everything in `order`; Ctrl-C stops running recipes and returns 'interrupted'."""
        needed = set(self.order)
        dependencies = self.graph.dependencies
        self._waiting = {name: sum(1 for dep in dependencies(name) if dep in needed) for name in self.order}
        self._ready = [name for name in self.order if self._waiting[name] == 0]
        self._running: dict[Future, tuple[str, str, Decision | None]] = {}  # future → (job, phase, decision)
        self._completed: SimpleQueue[Future] = SimpleQueue()  # what `_running` holds, as each ends
        self._pools: Counter = Counter()
        self._stop = False
        self.executor.resume()  # an earlier build in this process (watch mode) may have ended holding
        self._threads = ThreadPoolExecutor(max_workers=self.max_jobs, thread_name_prefix="wait")  # lock waits, cache restores
        # Stores have threads of their own, so uploading never holds up a recipe.
        self._store_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store") if self.cache else None
        jobs, records = self.graph.jobs, self.planner.records
        self._unmade_folders = look_up(path for name in self.order if name not in records for path in jobs[name].outputs)
        # What is loaded by now (graph, jobs, records) lives as long as the build: the collector need
        # not walk it again and again (each walk of a 10k-job graph costs milliseconds).
        gc.freeze()
        try:
            while self._ready or self._running:
                self._start_ready_jobs()
                if not self._running:
                    break
                self._collect(self._completed.get())
                try:
                    while True:
                        self._collect(self._completed.get_nowait())
                except Empty:
                    pass
                self._reap_stores(block=False)
        except KeyboardInterrupt:
            self.result.status = "interrupted"
            self.executor.interrupt()
            for future, (name, phase, decision) in self._running.items():
                if phase == "run":
                    result = future.result()
                    if not result.started:  # withdrawn before it ran: it stays "blocked"
                        continue
                    result.interrupted = True
                    self._fail(Outcome(name, "interrupted", decision, result))
                elif phase == "restore":
                    future.result()  # a restore is short: let it end before its outputs are removed
                    self._fail(Outcome(name, "interrupted", decision))
        finally:
            self._threads.shutdown(wait=True)
            if self._store_threads is not None:
                interrupted = self.result.status == "interrupted"
                self._store_threads.shutdown(wait=True, cancel_futures=interrupted)
                self._reap_stores(block=True)
            self.locks.release_all()
            self._save_run_state()
            gc.unfreeze()
        if self.result.status == "ok" and any(o.action in ("failed", "blocked") for o in self.result.outcomes.values()):
            self.result.status = "failed"
        return self.result

    def _start_ready_jobs(self) -> None:
        index = 0
        # Up to `ahead` more than -j: the executor holds them until a slot frees (see LocalExecutor).
        in_flight = self.max_jobs + self.executor.ahead
        while not self._stop and index < len(self._ready) and len(self._running) < in_flight:
            name = self._ready[index]
            job = self.graph.jobs[name]
            limit = self.graph.pools.get(job.stage.pool) if job.stage.pool else None
            if limit is not None and self._pools[job.stage.pool] >= limit:
                index += 1
                continue
            self._ready.pop(index)
            decision = self.planner.decide(job)
            if decision.action is Action.SKIP:
                self._finish(Outcome(name, "skipped", decision))
                continue
            self._pools[job.stage.pool] += 1
            if self.locks.try_acquire(name):
                self._launch(name, decision)
            else:  # another offbuild runs this job now: wait for it, then look again
                self._track(self._threads.submit(self.locks.acquire, name, self.executor.stopping), name, "lock",
                            decision)

    def _launch(self, name: str, decision: Decision) -> None:
        """With the job's lock held: re-check against the store, then restore from the cache (on a
        worker thread) or start the recipe."""
        job = self.graph.jobs[name]
        fresh = self.store.load_job(name)
        if not _same_record(fresh, self.planner.records.get(name)):
            if fresh is None:
                self.planner.records.pop(name, None)
            else:
                self.planner.records[name] = fresh
            for path in job.outputs:  # another offbuild rewrote them
                self.hasher.forget(path)
            for path in job.inputs:  # and may have rewritten these: stat them again
                self.hasher.recheck(path)
            decision = self.planner.decide(job)
            if decision.action is Action.SKIP:  # built meanwhile by another offbuild
                self._leave(name)
                self._finish(Outcome(name, "skipped", decision))
                return
        missing = [why.path for why in decision.reasons if why.reason is Reason.INPUT_MISSING]
        if missing:
            self._leave(name)
            self._fail(Outcome(name, "failed", decision, error=f"input '{missing[0]}' is missing"))
            self._halt_unless_keep_going()
            return
        if self.cache is not None and not self.planner.force and self.cache.why_not(job) is None:
            self._prepare_outputs(job, keep=False)
            self._track(self._threads.submit(self._fetch, job, decision.key), name, "restore", decision)
            return
        self._start_recipe(name, decision)

    def _start_recipe(self, name: str, decision: Decision) -> None:
        job = self.graph.jobs[name]
        resuming = self._prepare_checkpoint(job, decision) if job.stage.checkpoint else False
        self._prepare_outputs(job, keep=resuming)
        if resuming:
            self.resumed.add(name)
        self.reporter.job_started(name, job.recipe)
        self._track(self.executor.submit(job), name, "run", decision)

    def _track(self, future: Future, name: str, phase: str, decision: Decision) -> None:
        self._running[future] = (name, phase, decision)
        future.add_done_callback(self._completed.put)

    def _collect(self, future: Future) -> None:
        name, phase, decision = self._running.pop(future)
        if phase == "lock":
            if future.result():
                self._launch(name, decision)
            return
        if phase == "restore":
            fetched = future.result()
            if fetched is not None and self._complete_restore(name, decision, *fetched):
                self._leave(name)
            else:  # not in the cache, or not intact: run the recipe after all
                self._start_recipe(name, decision)
            return
        result = future.result()
        if not result.started:  # withdrawn before it ran: it stays "blocked"
            self._leave(name)
            return
        ok = self._complete(name, decision, result)
        self._leave(name)
        if not ok:
            self._halt_unless_keep_going()

    def _halt_unless_keep_going(self) -> None:
        """After a failure: without -k, start nothing more and withdraw what waits for a slot; with
        -k, let it start (the failed recipe held it back)."""
        if self.keep_going:
            self.executor.resume()
        elif not self._stop:
            self._stop = True
            self.executor.withdraw()

    def _leave(self, name: str) -> None:
        """The job no longer occupies its pool slot or its lock."""
        self._pools[self.graph.jobs[name].stage.pool] -= 1
        self.locks.release(name)

    def _prepare_checkpoint(self, job, decision: Decision) -> bool:
        """Resume when a checkpoint was left by an attempt with the same stage key; otherwise
        discard it (and the partial outputs with it). Returns whether the job resumes."""
        checkpoint = self.executor.checkpoint_path(job)
        key_file = checkpoint + ".key"
        try:
            with open(key_file, encoding="utf-8") as handle:
                resuming = handle.read() == decision.key and os.path.exists(checkpoint)
        except FileNotFoundError:
            resuming = False
        if not resuming:
            remove_path(checkpoint)
        os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
        with open(key_file, "w", encoding="utf-8") as handle:
            handle.write(decision.key)
        return resuming

    def _prepare_outputs(self, job, keep: bool) -> None:
        """Parents exist; old outputs are removed so a recipe that writes nothing is caught."""
        for path in job.outputs:
            self.hasher.forget(path)
            if not keep:
                self._remove_output(path)
            parent = os.path.dirname(path)
            if parent and not os.path.isdir(parent):  # one stat, where makedirs would try mkdir and then stat
                os.makedirs(parent, exist_ok=True)
                # New and empty, no recipe writes there yet: looked up now, its outputs cost no lock later.
                look_up(self._unmade_folders.pop(parent, ()))

    def _complete(self, name: str, decision: Decision, result: RecipeResult) -> bool:
        job = self.graph.jobs[name]
        if not result.ok:
            detail = result.error or f"exit code {result.exit_code}"
            if result.attempts and result.attempts[-1].timed_out:
                detail = f"timed out after {job.stage.timeout:g}s"
            if len(result.attempts) > 1:
                detail += f" after {len(result.attempts)} attempts"
            if self.executor.is_isolated(job) and not result.interrupted and NETWORK_SYMPTOMS.search(result.output()):
                detail += f"; {NETWORK_HINT}"
            self._fail(Outcome(name, "failed", decision, result, error=detail))
            return False
        outputs = {}
        for path in job.outputs:
            digest = self.hasher.digest(path)
            if digest is None:
                self._fail(Outcome(name, "failed", decision, result,
                                   error=f"the recipe did not write its declared output '{path}'"))
                return False
            outputs[path] = digest
        self._record_success(name, decision, outputs, result.duration)
        if self.cache is not None and not self._store_broken and self.cache.why_not(job) is None:
            future = self._store_threads.submit(self.cache.store, decision.key, job, outputs, result.duration)
            self._stores[future] = name
        if job.stage.checkpoint:
            checkpoint = self.executor.checkpoint_path(job)
            remove_path(checkpoint)
            remove_path(checkpoint + ".key")
        action = "resumed" if name in self.resumed else "ran"
        self._finish(Outcome(name, action, decision, result))
        return True

    def _record_success(self, name: str, decision: Decision, outputs: dict[str, str], duration: float) -> None:
        job = self.graph.jobs[name]
        success = Success(decision.key, job.recipe, decision.inputs, outputs, decision.env, job_options(job),
                          duration, self.run_id)
        # Stat entries are only a cache (one lost to a crash costs a re-hash, never a wrong decision):
        # they ride along with every few hundredth success rather than each, which more than halves
        # what each success's transaction writes. The rest are saved when the build ends.
        fresh = self.hasher.take_fresh() if len(self.hasher.fresh) >= _STAT_ENTRIES_PER_SAVE else {}
        self.store.record_success(name, success, fresh)

    def _fetch(self, job, key: str) -> tuple[CacheEntry, float] | None:
        """On a worker thread: the cache's entry for `key` with its outputs put in place, and how
        long that took; None on a miss. The builder's own hasher checks them on the main thread."""
        started = time.monotonic()
        try:
            entry = self.cache.lookup(key)
            if entry is None or not self.cache.restore(entry, job):
                return None
        except Exception as error:  # a cache problem of any backend must not fail the build
            self.reporter.message(f"offbuild: warning: cannot restore '{job.name}' from the cache: {error}")
            return None
        return entry, time.monotonic() - started

    def _complete_restore(self, name: str, decision: Decision, entry: CacheEntry, seconds: float) -> bool:
        """Record a restored job exactly like a success, once its outputs hash to the entry's digests."""
        job = self.graph.jobs[name]
        outputs = {}
        for path in job.outputs:
            self.hasher.forget(path)
            digest = self.hasher.digest(path)
            if digest != entry.outputs[path].digest:
                self.reporter.message(f"offbuild: warning: '{path}' restored from the cache does not hash to the "
                                      f"cache entry's digest; running '{name}' instead")
                return False
            outputs[path] = digest
        self._record_success(name, decision, outputs, seconds)
        self._finish(Outcome(name, "restored", decision, seconds=seconds))
        return True

    def _reap_stores(self, block: bool) -> None:
        """Report finished background stores; a failed store is a warning, never a failed build."""
        finished = list(self._stores) if block else [future for future in self._stores if future.done()]
        for future in finished:
            name = self._stores.pop(future)
            if future.cancelled():
                continue
            error = future.exception()
            if self.cache.is_refusal(error):
                self.reporter.message(f"offbuild: note: not caching '{name}': {error}")
            elif error is not None and not self._store_broken:
                self._store_broken = True  # one warning, not one per job (a read-only cache, a full disk)
                self.reporter.message(f"offbuild: warning: cannot store '{name}' in the cache {self.cache.location}:"
                                      f" {error}; not storing more in this build")

    def _finish(self, outcome: Outcome) -> None:
        self.result.outcomes[outcome.name] = outcome
        duration = outcome.result.duration if outcome.result else (outcome.seconds or 0.0)
        output = outcome.result.output() if outcome.result else ""
        self.reporter.job_finished(outcome.name, outcome.action, duration, output)
        for dependent in self.graph.dependents(outcome.name):
            if dependent in self._waiting:
                self._waiting[dependent] -= 1
                if self._waiting[dependent] == 0:
                    self._ready.append(dependent)

    def _remove_output(self, path: str) -> None:
        if self.graph.holds_source(path):
            self.reporter.message(f"offbuild: warning: not deleting output '{path}': it holds source files")
        else:
            remove_path(path)

    def _fail(self, outcome: Outcome) -> None:
        """A failed job never counts as done: its outputs go (checkpoint stages keep them)."""
        job = self.graph.jobs[outcome.name]
        self.result.outcomes[outcome.name] = outcome
        if not job.stage.checkpoint:
            for path in job.outputs:
                self._remove_output(path)
                self.hasher.forget(path)
        self.store.record_failure(outcome.name, self.run_id)
        result = outcome.result
        log = f"log: {result.log_path}" if result and result.has_log() else ""
        detail = "; ".join(part for part in (outcome.error, log) if part)
        self.reporter.job_finished(outcome.name, outcome.action, result.duration if result else 0.0,
                                   result.output() if result else "", detail)

    def _save_run_state(self) -> None:
        self.store.save_stat_entries(self.hasher.take_fresh())
        decisions = [(o.name, o.action, [why.as_dict() for why in o.decision.reasons])
                     for o in self.result.outcomes.values() if o.decision is not None]
        self.store.record_decisions(self.run_id, decisions)


def dry_run(graph: BuildGraph, order: list[str], planner: Planner) -> list[Decision]:
    """What a build would do, without running or writing anything; downstream of a job that
    would run is reported as 'upstream will rerun' (early cutoff may still skip it)."""
    pending: dict[str, str] = {}
    decisions = []
    for name in order:
        job = graph.jobs[name]
        decision = planner.decide(job, pending)
        if decision.action is Action.RUN:
            for path in job.outputs:
                pending[path] = name
        decisions.append(decision)
    return decisions


def remove_stale_outputs(graph: BuildGraph, records, hasher: FileHasher, store: StateStore, reporter) -> None:
    """Outputs recorded for jobs that no longer exist (or no longer declare them) are deleted while
    their content is still what offbuild wrote; hand-edited ones are kept. Vanished jobs are forgotten."""
    for name, record in records.items():
        for path, digest in record.outputs.items():
            if path in graph.producer or graph.holds_source(path):
                continue
            if hasher.digest(path) == digest:
                remove_path(path)
                hasher.forget(path)
                reporter.message(f"offbuild: removed stale output {path} (its job '{name}' no longer makes it)")
    vanished = [name for name in records if name not in graph.jobs]
    if vanished:
        store.forget_jobs(vanished)
        for name in vanished:
            records.pop(name)


def is_stale_output(records, hasher: FileHasher):
    """A predicate for graph building: is this file an unchanged output recorded by offbuild?"""
    recorded = {path: digest for record in records.values() for path, digest in record.outputs.items()}

    def is_stale(path: str) -> bool:
        return path in recorded and hasher.digest(path) == recorded[path]

    return is_stale


def _same_record(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (a.key, a.built_at, a.failed, a.failed_at) == (b.key, b.built_at, b.failed, b.failed_at)


def remove_path(path: str) -> None:
    """Delete a file, a link (never its target) or a directory tree; already gone is fine.

    `lstat` first: most outputs are not there when their recipe is about to run, and an `unlink`
    takes the folder's lock even for a missing name, waiting on the recipes that create files in
    the same folder (70-100 microseconds per job in a big build). See `look_up`."""
    try:
        if stat_module.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def look_up(paths) -> dict[str, list[str]]:
    """Have the kernel remember which of `paths` do not exist. The first lookup of a name takes its
    folder's lock; done before recipes run, it waits for none, and later ones (`remove_path`) take
    no lock at all. Returns the paths whose folder does not exist yet, by folder: those are for
    when the folder is made (the kernel remembers nothing of a name in a missing folder)."""
    unmade: dict[str, list[str]] = {}
    folders_there: dict[str, bool] = {}
    for path in paths:
        try:
            os.lstat(path)
        except FileNotFoundError:
            parent = os.path.dirname(path)
            there = folders_there.get(parent)
            if there is None:
                there = folders_there[parent] = not parent or os.path.isdir(parent)
            if not there:
                unmade.setdefault(parent, []).append(path)
        except OSError:
            pass
    return unmade
