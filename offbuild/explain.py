"""`--explain`: what the next build would do with each job and why, what the last run did, and
the root cause behind every "an upstream stage will rerun".

Nothing here decides: the reasons are the planner's own typed records from a dry run, and the
last run is what the builder stored. This module only links them up and renders them.
"""
from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, field

from .planner import Action, Decision, Reason, Why
from .records import iso
from .state import JobRecord

UPSTREAM_SEPARATOR = ", "  # how the planner joins the names in an UPSTREAM_WILL_RUN reason


@dataclass(frozen=True, slots=True)
class Chain:
    """A root cause: `jobs[0]` will run because `jobs[1]` will … because of `causes` of `jobs[-1]`."""

    jobs: tuple[str, ...]
    causes: tuple[Why, ...]


@dataclass(frozen=True, slots=True)
class LastRun:
    """The decision the most recent build made about a job, as the store keeps it."""

    action: str  # ran | skipped | failed | interrupted | resumed | restored
    run_id: str | None
    at: float | None
    reasons: tuple[Why, ...]


@dataclass(frozen=True, slots=True)
class CheckpointState:
    """A checkpoint left by a failed attempt, and whether the next attempt resumes from it."""

    path: str
    size: int
    saved_at: float
    resumes: bool | None  # None: only known once the upstream jobs have rerun
    attempt_started: float | None = None  # when the attempt that left it began (its `.key` file)


@dataclass(slots=True)
class Explanation:
    """Everything `--explain` says about one job."""

    job: str
    decision: Decision
    record: JobRecord | None
    last: LastRun | None
    chains: list[Chain] = field(default_factory=list)
    checkpoint: CheckpointState | None = None
    # With a cache configured, for a job that would run: "hit", "miss", "never: <why>" or "unknown"
    # (its key depends on upstream jobs yet to run); None without a cache.
    cache: str | None = None

    @property
    def will_run(self) -> bool:
        return self.decision.action is Action.RUN


def explain_jobs(decisions: list[Decision], records: dict[str, JobRecord], last_decisions: dict[str, dict],
                 checkpoint_paths: dict[str, str] | None = None,
                 cache_states: dict[str, str] | None = None) -> list[Explanation]:
    """Link each dry-run decision (in build order) to its root causes, its last run and its checkpoint.

    `last_decisions` is the store's decisions table; `checkpoint_paths` names the checkpoint file
    of each checkpoint job; `cache_states` says what the cache holds for jobs that would run."""
    by_name = {decision.job: decision for decision in decisions}
    checkpoint_paths = checkpoint_paths or {}
    explanations = []
    for decision in decisions:
        explanation = Explanation(decision.job, decision, records.get(decision.job),
                                  _last_run(last_decisions.get(decision.job)))
        explanation.chains = root_causes(decision.job, by_name)
        if cache_states is not None:
            explanation.cache = cache_states.get(decision.job)
        if decision.job in checkpoint_paths and explanation.will_run:
            explanation.checkpoint = _checkpoint_state(checkpoint_paths[decision.job], decision)
        explanations.append(explanation)
    return explanations


def upstream_jobs(why: Why, known: dict[str, Decision]) -> list[str]:
    """The job names an UPSTREAM_WILL_RUN reason lists (a name may itself contain the separator)."""
    names, pending = [], ""
    for part in (why.path or "").split(UPSTREAM_SEPARATOR):
        pending = part if not pending else pending + UPSTREAM_SEPARATOR + part
        if pending in known:
            names.append(pending)
            pending = ""
    return names


def root_causes(job: str, decisions: dict[str, Decision]) -> list[Chain]:
    """For a job that will run because upstream jobs will, the shortest chain to each job that
    will run for a reason of its own (breadth first, so diamonds are reported once)."""
    start = decisions[job]
    if not any(why.reason is Reason.UPSTREAM_WILL_RUN for why in start.reasons):
        return []
    chains: list[Chain] = []
    seen = {job}
    frontier = [(job,)]
    while frontier:
        following = []
        for path in frontier:
            for why in decisions[path[-1]].reasons:
                if why.reason is not Reason.UPSTREAM_WILL_RUN:
                    continue
                for upstream in upstream_jobs(why, decisions):
                    if upstream in seen:
                        continue
                    seen.add(upstream)
                    chain = path + (upstream,)
                    own = tuple(w for w in decisions[upstream].reasons if w.reason is not Reason.UPSTREAM_WILL_RUN)
                    if own:
                        chains.append(Chain(chain, own))
                    following.append(chain)
        frontier = following
    return chains


def _last_run(row: dict | None) -> LastRun | None:
    if row is None:
        return None
    reasons = tuple(why for why in (_why_from_dict(entry) for entry in row.get("reasons") or []) if why)
    return LastRun(row.get("action") or "?", row.get("run_id"), row.get("at"), reasons)


def _why_from_dict(entry: dict) -> Why | None:
    """A reason as stored by `Why.as_dict`; None for a reason this version does not know."""
    try:
        reason = Reason[str(entry.get("reason", "")).upper()]
    except KeyError:
        return None
    return Why(reason, entry.get("path"), entry.get("old"), entry.get("new"))


def _checkpoint_state(path: str, decision: Decision) -> CheckpointState | None:
    """Mirrors the builder's resume rule: the `.key` file must hold the stage key of this attempt."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    try:
        with open(path + ".key", encoding="utf-8") as handle:
            saved_key = handle.read()
            started = os.fstat(handle.fileno()).st_mtime
    except OSError:
        saved_key, started = None, None
    upstream_pending = any(why.reason is Reason.UPSTREAM_WILL_RUN for why in decision.reasons)
    if saved_key is not None and upstream_pending:
        resumes = None
    else:
        resumes = saved_key is not None and saved_key == decision.key
    return CheckpointState(path, info.st_size, info.st_mtime, resumes, started)


# -- wording


def short(digest: str | None) -> str:
    """A digest shortened for people, like git's abbreviated hashes."""
    if digest is None:
        return "none"
    return digest.removeprefix("tree:")[:12]


def _value(text: str | None) -> str:
    if text is None:
        return "unset"
    return repr(text if len(text) <= 40 else text[:37] + "...")


def describe(why: Why) -> str:
    """One reason as a line of the explanation."""
    path, old, new = why.path, why.old, why.new
    match why.reason:
        case Reason.UP_TO_DATE:
            return "up to date: same stage key as the last success and every output as it wrote it"
        case Reason.NEVER_BUILT:
            return "never built"
        case Reason.LAST_FAILED:
            return "the last attempt failed or was interrupted"
        case Reason.FORCED:
            return "forced (-B)"
        case Reason.ALWAYS:
            return "always: true (runs on every build)"
        case Reason.RECIPE_CHANGED:
            return "recipe changed"
        case Reason.INPUT_ADDED:
            return f"input added: {path} ({short(new)})"
        case Reason.INPUT_REMOVED:
            return f"input removed: {path} (was {short(old)})"
        case Reason.INPUT_CHANGED:
            return f"input changed: {path} ({short(old)} → {short(new)})"
        case Reason.INPUT_MISSING:
            return f"input missing: {path} (the build will fail)"
        case Reason.OUTPUTS_CHANGED:
            return f"declared outputs changed: now {path or 'none'}"
        case Reason.OUTPUT_MISSING:
            return f"output missing: {path}"
        case Reason.OUTPUT_CHANGED:
            return f"output changed since built: {path} ({short(old)} → {short(new)})"
        case Reason.ENV_CHANGED:
            return f"environment variable changed: {path} ({_value(old)} → {_value(new)})"
        case Reason.OPTIONS_CHANGED:
            return f"options changed: now {path}"
        case Reason.UPSTREAM_WILL_RUN:
            who = "it rewrites" if UPSTREAM_SEPARATOR not in (path or "") else "they rewrite"
            return f"an upstream stage will rerun: {path} (early cutoff may still skip this one if {who} " \
                   f"identical outputs)"
        case Reason.KEY_CHANGED:
            return "stage key changed"
    return why.reason.value


def cause_clause(why: Why) -> str:
    """A reason as the end of a 'because …' sentence."""
    path, old, new = why.path, why.old, why.new
    match why.reason:
        case Reason.NEVER_BUILT:
            return "it was never built"
        case Reason.LAST_FAILED:
            return "its last attempt failed"
        case Reason.FORCED:
            return "-B forces it"
        case Reason.ALWAYS:
            return "it is marked always"
        case Reason.RECIPE_CHANGED:
            return "its recipe changed"
        case Reason.INPUT_ADDED:
            return f"{path} was added to its inputs"
        case Reason.INPUT_REMOVED:
            return f"{path} was removed from its inputs"
        case Reason.INPUT_CHANGED:
            return f"{path} changed ({short(old)} → {short(new)})"
        case Reason.INPUT_MISSING:
            return f"its input {path} is missing"
        case Reason.OUTPUTS_CHANGED:
            return "its declared outputs changed"
        case Reason.OUTPUT_MISSING:
            return f"its output {path} is missing"
        case Reason.OUTPUT_CHANGED:
            return f"its output {path} was changed since it was built"
        case Reason.ENV_CHANGED:
            return f"${path} changed ({_value(old)} → {_value(new)})"
        case Reason.OPTIONS_CHANGED:
            return "its options changed"
        case Reason.KEY_CHANGED:
            return "its stage key changed"
    return why.reason.value


def chain_sentence(chain: Chain, rerun: bool = True) -> str:
    """`upper will rerun because copy will, because data/input/sample.txt changed (… → …)`."""
    verb = "rerun" if rerun else "run"
    steps = [f"{name} will" for name in chain.jobs[1:]]
    causes = " and ".join(cause_clause(why) for why in chain.causes)
    return f"{chain.jobs[0]} will {verb} because " + ", because ".join(steps + [causes])


def recipe_diff(why: Why) -> list[str]:
    """The unified diff of the recipe at the last success and the recipe now."""
    return list(difflib.unified_diff((why.old or "").splitlines(), (why.new or "").splitlines(),
                                     "recipe at last success", "recipe now", lineterm=""))


# -- rendering


class Paint:
    """ANSI colours when enabled, the plain text otherwise."""

    CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles:
            return text
        return "\x1b[" + ";".join(self.CODES[style] for style in styles) + "m" + text + "\x1b[0m"


def wants_colour(stream) -> bool:
    """Colour on a terminal only, and never when NO_COLOR is set (no-color.org)."""
    return hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR") \
        and os.environ.get("TERM") != "dumb"


def when(timestamp: float | None, now: float) -> str:
    """`2026-12-04 20:38:19 (5 min ago)`."""
    if timestamp is None:
        return "at an unknown time"
    ago = max(0.0, now - timestamp)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if ago >= size:
            relative = f"{int(ago // size)} {unit} ago"
            break
    else:
        relative = f"{int(ago)} s ago"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) + f" ({relative})"


def render_text(explanations: list[Explanation], target: str, paint: Paint, now: float | None = None) -> str:
    """The human form: one block per job, in build order, then a count."""
    now = time.time() if now is None else now
    lines: list[str] = []
    for item in explanations:
        decision = item.decision
        if item.will_run:
            lines.append(paint(item.job, "bold") + ": " + paint("will run", "yellow", "bold"))
        else:
            lines.append(paint(item.job, "bold") + ": " + paint("up to date, will skip", "green"))
        for why in decision.reasons:
            if why.reason is Reason.UP_TO_DATE:
                continue
            lines.append(f"  because {describe(why)}")
            if why.reason is Reason.LAST_FAILED:
                lines.extend(f"    {line}" for line in _failure_lines(item, now))
            if why.reason is Reason.RECIPE_CHANGED:
                lines.extend("    " + _paint_diff_line(line, paint) for line in recipe_diff(why))
        rerun = item.record is not None and item.record.key is not None
        for chain in item.chains:
            lines.append("  " + paint("root cause: ", "cyan") + chain_sentence(chain, rerun))
        if item.checkpoint is not None:
            lines.append("  " + _checkpoint_line(item.checkpoint, now))
        if item.cache is not None:
            lines.append("  " + _cache_line(item.cache, paint))
        lines.extend("  " + paint(line, "dim") for line in _history_lines(item, now))
    running = sum(1 for item in explanations if item.will_run)
    restoring = sum(1 for item in explanations if item.cache == "hit")
    from_cache = f" ({restoring} restored from cache)" if restoring else ""
    lines.append(f"offbuild: explain {target}: {running} of {len(explanations)} job(s) would run{from_cache}, "
                 f"{len(explanations) - running} up to date")
    return "\n".join(lines) + "\n"


def _cache_line(state: str, paint: Paint) -> str:
    if state == "hit":
        return paint("would be restored from cache", "cyan", "bold") + " (the cache holds its stage key)"
    if state == "miss":
        return "the cache does not hold its stage key: the recipe would run"
    if state == "unknown":
        return "the cache is looked up once the upstream jobs have run their recipes (its stage key depends on them)"
    return "never restored from cache: " + state.removeprefix("never: ")


def _paint_diff_line(line: str, paint: Paint) -> str:
    if line.startswith(("---", "+++")):
        return paint(line, "bold")
    if line.startswith("@@"):
        return paint(line, "cyan")
    if line.startswith("-"):
        return paint(line, "red")
    if line.startswith("+"):
        return paint(line, "green")
    return line


def _failure_lines(item: Explanation, now: float) -> list[str]:
    record, last = item.record, item.last
    if record is None or not record.failed:
        return []
    how = "failed"
    if last is not None and last.run_id == record.failed_run and last.action == "interrupted":
        how = "was interrupted"
    return [f"it {how} in run {record.failed_run or '?'}, {when(record.failed_at, now)}"]


def _checkpoint_line(checkpoint: CheckpointState, now: float) -> str:
    saved = f"{checkpoint.path} ({checkpoint.size} bytes, saved {when(checkpoint.saved_at, now)})"
    if checkpoint.resumes is None:
        return f"checkpoint {saved} is kept: it resumes only if the stage key is unchanged once upstream jobs rerun"
    if checkpoint.resumes:
        return f"will resume from checkpoint {saved}"
    return f"checkpoint {saved} was written under another stage key and will be discarded"


def _history_lines(item: Explanation, now: float) -> list[str]:
    last, record = item.last, item.record
    succeeded = record is not None and record.key is not None and record.built_at is not None
    took = f", took {record.duration:.2f}s" if succeeded and record.duration is not None else ""
    lines = []
    checkpoint = item.checkpoint
    if checkpoint is not None and checkpoint.attempt_started is not None and (
            last is None or last.at is None or last.at < checkpoint.attempt_started):
        # offbuild itself was stopped (killed, power cut) before it could record the attempt
        lines.append(f"last attempt: started {when(checkpoint.attempt_started, now)} and never finished")
    if last is not None:
        reasons = "; ".join(describe(why) for why in last.reasons) or "no reasons recorded"
        same = succeeded and last.run_id == record.run_id and last.action in ("ran", "resumed", "restored")
        action = "restored from cache" if last.action == "restored" else last.action
        lines.append(f"last run: {action} in run {last.run_id or '?'}, {when(last.at, now)}"
                     f"{took if same else ''}, because {reasons}")
        if same:
            return lines
    elif not succeeded:
        return lines or ["last run: never ran"]
    if succeeded:
        lines.append(f"last success: run {record.run_id or '?'}, {when(record.built_at, now)}{took}")
    return lines


def render_json(explanations: list[Explanation], target: str) -> dict:
    """The same explanation as data, for `--explain T --json`."""
    jobs = []
    for item in explanations:
        entry: dict = {
            "job": item.job,
            "action": item.decision.action.value,
            "key": item.decision.key,
            "reasons": [{**why.as_dict(), "text": describe(why)} for why in item.decision.reasons],
            "root_causes": [{"chain": list(chain.jobs), "causes": [why.as_dict() for why in chain.causes],
                             "text": chain_sentence(chain)} for chain in item.chains],
        }
        diff = [line for why in item.decision.reasons if why.reason is Reason.RECIPE_CHANGED
                for line in recipe_diff(why)]
        if diff:
            entry["recipe_diff"] = "\n".join(diff) + "\n"
        if item.cache is not None:
            entry["cache"] = item.cache
        if item.checkpoint is not None:
            started = item.checkpoint.attempt_started
            entry["checkpoint"] = {"path": item.checkpoint.path, "bytes": item.checkpoint.size,
                                   "saved_at": iso(item.checkpoint.saved_at), "resumes": item.checkpoint.resumes,
                                   "attempt_started": iso(started) if started is not None else None}
        last = item.last
        entry["last_run"] = None if last is None else {
            "action": last.action, "run_id": last.run_id, "at": iso(last.at) if last.at else None,
            "reasons": [why.as_dict() for why in last.reasons]}
        record = item.record
        entry["last_success"] = None
        entry["last_failure"] = None
        if record is not None and record.key is not None:
            entry["last_success"] = {"run_id": record.run_id, "at": iso(record.built_at) if record.built_at else None,
                                     "duration": record.duration}
        if record is not None and record.failed:
            entry["last_failure"] = {"run_id": record.failed_run,
                                     "at": iso(record.failed_at) if record.failed_at else None,
                                     "interrupted": bool(last and last.run_id == record.failed_run
                                                         and last.action == "interrupted")}
        jobs.append(entry)
    running = sum(1 for item in explanations if item.will_run)
    summary = {"target": target, "jobs": jobs, "would_run": running, "up_to_date": len(explanations) - running}
    if any(item.cache is not None for item in explanations):
        summary["would_restore"] = sum(1 for item in explanations if item.cache == "hit")
    return summary
