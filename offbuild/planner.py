"""Decides, per job, run or skip, and records every reason at the moment it decides.

`--explain`, `-n` and the run record print these reasons; nothing recomputes them.
"""
from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, field

from .hashing import FileHasher, hash_bytes
from .model import Job
from .state import JobRecord


class Action(enum.Enum):
    RUN = "run"
    SKIP = "skip"


class Reason(enum.Enum):
    UP_TO_DATE = "up to date"
    NEVER_BUILT = "never built"
    LAST_FAILED = "last attempt failed"
    FORCED = "forced (-B)"
    ALWAYS = "always"
    RECIPE_CHANGED = "recipe changed"
    INPUT_ADDED = "input added"
    INPUT_REMOVED = "input removed"
    INPUT_CHANGED = "input changed"
    INPUT_MISSING = "input missing"
    OUTPUTS_CHANGED = "declared outputs changed"
    OUTPUT_MISSING = "output missing"
    OUTPUT_CHANGED = "output changed since built"
    ENV_CHANGED = "environment variable changed"
    OPTIONS_CHANGED = "options changed"
    UPSTREAM_WILL_RUN = "an upstream stage will rerun"
    KEY_CHANGED = "stage key changed"


@dataclass(frozen=True, slots=True)
class Why:
    """One typed reason, with the path and old/new values it concerns."""

    reason: Reason
    path: str | None = None
    old: str | None = None
    new: str | None = None

    def describe(self) -> str:
        text = self.reason.value
        if self.path:
            text += f": {self.path}"
        if self.reason in (Reason.INPUT_CHANGED, Reason.OUTPUT_CHANGED, Reason.ENV_CHANGED):
            text += f" ({_short(self.old)} → {_short(self.new)})"
        return text

    def as_dict(self) -> dict:
        return {key: value for key, value in (("reason", self.reason.name.lower()), ("path", self.path),
                                              ("old", self.old), ("new", self.new)) if value is not None}


def _short(digest: str | None) -> str:
    if digest is None:
        return "none"
    return digest.removeprefix("tree:")[:12]


@dataclass(slots=True)
class Decision:
    """Run or skip one job, why, and the facts a success record needs."""

    job: str
    action: Action
    reasons: list[Why]
    key: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return "; ".join(why.describe() for why in self.reasons)


class Planner:
    """Compares a job's current key and outputs with its last success."""

    def __init__(self, hasher: FileHasher, records: dict[str, JobRecord], force: bool = False,
                 environ: dict[str, str] | None = None):
        self.hasher = hasher
        self.records = records
        self.force = force
        self.environ = os.environ if environ is None else environ

    def decide(self, job: Job, pending: dict[str, str] | None = None) -> Decision:
        """Run or skip, with reasons. `pending` maps inputs that upstream jobs will rewrite to those jobs
        (a dry run cannot hash them yet); a real build decides after upstream jobs finish."""
        pending = pending or {}
        inputs = {path: self.hasher.digest(path) if path not in pending else None for path in job.inputs}
        env = {name: self.environ.get(name, "") for name in job.stage.env}
        options = job_options(job)
        key = stage_key(job, inputs, env)
        decision = Decision(job.name, Action.RUN, [], key, inputs, env)
        record = self.records.get(job.name)
        reasons = decision.reasons
        upstream = sorted({pending[path] for path in job.inputs if path in pending})
        if upstream:
            reasons.append(Why(Reason.UPSTREAM_WILL_RUN, ", ".join(upstream)))
        if self.force:
            reasons.append(Why(Reason.FORCED))
        if job.stage.always:
            reasons.append(Why(Reason.ALWAYS))
        for path in job.inputs:
            if inputs[path] is None and path not in pending:
                reasons.append(Why(Reason.INPUT_MISSING, path))
        if record is None or record.key is None:
            reasons.append(Why(Reason.NEVER_BUILT))
            if record is not None and record.failed:  # tried, never succeeded: say so (and explain the checkpoint)
                reasons.append(Why(Reason.LAST_FAILED))
        else:
            if record.failed:
                reasons.append(Why(Reason.LAST_FAILED))
            if record.key != key:
                reasons.extend(_key_differences(job, record, inputs, env, options, pending))
            reasons.extend(self._output_differences(job, record))
        if not reasons:
            decision.action = Action.SKIP
            reasons.append(Why(Reason.UP_TO_DATE))
        return decision

    def _output_differences(self, job: Job, record: JobRecord) -> list[Why]:
        found = []
        for path in job.outputs:
            if path not in record.outputs:
                continue  # a newly declared output is reported as a key difference
            digest = self.hasher.digest(path)
            if digest is None:
                found.append(Why(Reason.OUTPUT_MISSING, path))
            elif digest != record.outputs[path]:
                found.append(Why(Reason.OUTPUT_CHANGED, path, record.outputs[path], digest))
        return found


def job_options(job: Job) -> dict:
    return {"network": job.stage.network, "checkpoint": job.stage.checkpoint}


def stage_key(job: Job, inputs: dict[str, str | None], env: dict[str, str]) -> str:
    """SPEC section 2: recipe, inputs with content hashes, outputs, env values, network, checkpoint."""
    material = {"recipe": job.recipe, "inputs": [[path, inputs[path]] for path in job.inputs],
                "outputs": list(job.outputs), "env": env, "options": job_options(job)}
    return hash_bytes(json.dumps(material, sort_keys=True, separators=(",", ":")).encode())


def _key_differences(job: Job, record: JobRecord, inputs: dict, env: dict, options: dict,
                     pending: dict[str, str]) -> list[Why]:
    found = []
    if record.recipe != job.recipe:
        found.append(Why(Reason.RECIPE_CHANGED, None, record.recipe, job.recipe))
    old_inputs = record.inputs
    for path in job.inputs:
        if path in pending:
            continue
        if path not in old_inputs:
            found.append(Why(Reason.INPUT_ADDED, path, None, inputs[path]))
        elif old_inputs[path] != inputs[path] and inputs[path] is not None:
            found.append(Why(Reason.INPUT_CHANGED, path, old_inputs[path], inputs[path]))
    for path in old_inputs:
        if path not in inputs:
            found.append(Why(Reason.INPUT_REMOVED, path, old_inputs[path], None))
    if sorted(record.outputs) != sorted(job.outputs):
        found.append(Why(Reason.OUTPUTS_CHANGED, " ".join(job.outputs)))
    for name, value in env.items():
        if record.env.get(name) != value:
            found.append(Why(Reason.ENV_CHANGED, name, record.env.get(name), value))
    if record.options != options:
        found.append(Why(Reason.OPTIONS_CHANGED, json.dumps(options, sort_keys=True)))
    if not found and not pending:
        found.append(Why(Reason.KEY_CHANGED))
    return found
