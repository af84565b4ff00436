"""Loading a project: the Pipefile, the state store and the graph, as every command needs them."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

from .build import is_stale_output
from .errors import UsageError
from .graph import BuildGraph, build_graph
from .hashing import RACY_NS, FileHasher, fine_timestamps_device
from .jsonform import load_json
from .model import Location, PathSpec, Pipeline
from . import STATE_DIR, __version__, state_dir_for
from .state import JobRecord, StateStore

_NO_LOCATION = Location("<command line>", 0, 0)


@dataclass(slots=True)
class Project:
    """A loaded project, with the process already in its root directory."""

    pipeline: Pipeline
    store: StateStore
    hasher: FileHasher
    records: dict[str, JobRecord]
    graph: BuildGraph
    cwd_offset: str  # where the user stood, relative to the root, for path targets
    start_generation: int = 0  # the store's generation when the records were read
    state_dir: str = STATE_DIR  # see `state_dir_for`, relative to the root

    def targets(self, names: list[str]) -> list[PathSpec]:
        """The command line's targets, else `default:`, else every stage."""
        if names:
            return [PathSpec(self._path_or_name(name), _NO_LOCATION) for name in names]
        if self.pipeline.default:
            return list(self.pipeline.default)
        return [PathSpec(stage.name, _NO_LOCATION) for stage in self.pipeline.stages]

    def _path_or_name(self, text: str) -> str:
        if text in self.graph.jobs or text in self.graph.jobs_by_stage or self.cwd_offset == ".":
            return text
        return os.path.normpath(os.path.join(self.cwd_offset, text))


def unchanged_since_read(pipeline: Pipeline) -> bool:
    """Do the pipeline's source files still hold exactly what was parsed (settled, same stat)?"""
    for path, size, mtime_ns, ino, ctime_ns, taken in pipeline.source_stats:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if taken - mtime_ns < RACY_NS or (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) != (
                size, mtime_ns, ino, ctime_ns):
            return False
    return bool(pipeline.source_stats)


PARSED_NAME = "pipeline.cache"


def _load_pipeline(pipefile: str, state_dir: str, display: str, overrides: dict[str, str], save: bool) -> Pipeline:
    """The parsed pipeline, from `.offbuild/pipeline.cache` while its files are unchanged (settled,
    same stat: the rule of the stat cache), else parsed (and, unless `save` is false, kept).
    Unpickling a 10,000-stage model takes a fifth of lark's parse."""
    path = os.path.join(os.path.dirname(pipefile), state_dir, PARSED_NAME)
    key = (pipefile, display, sorted(overrides.items()), __version__)
    try:
        with open(path, "rb") as handle:
            cached_key, pipeline = pickle.load(handle)
        if cached_key == key and isinstance(pipeline, Pipeline) and unchanged_since_read(pipeline):
            return pipeline
    except Exception:  # noqa: BLE001 - missing, truncated, or written by another version: parse
        pass
    if pipefile.endswith(".json"):
        pipeline = load_json(pipefile, display, overrides)
    else:
        from .parser import load_pipefile  # lark loads only when a Pipefile must be parsed

        pipeline = load_pipefile(pipefile, display, overrides)
    if save and all(taken - mtime_ns >= RACY_NS for _, _, mtime_ns, _, _, taken in pipeline.source_stats):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as handle:
            pickle.dump((key, pipeline), handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temporary, path)
    return pipeline


def open_project(pipefile: str, overrides: dict[str, str], shown_from: str | None = None,
                 readonly: bool = False, previous: Pipeline | None = None) -> Project:
    """Load the pipeline, chdir to its directory, open the state and build the job graph.

    `previous`, a pipeline this process loaded earlier with the same arguments, is reused when
    its files are unchanged (watch mode re-opens the project on every pass)."""
    if not os.path.isfile(pipefile):
        hint = "" if os.path.exists(pipefile) else " (use -f FILE or -C DIR to point at one)"
        raise UsageError(f"no pipeline file '{pipefile}'{hint}")
    start = os.getcwd()
    root = os.path.dirname(os.path.abspath(pipefile))
    display = os.path.relpath(os.path.abspath(pipefile), shown_from or start) if not os.path.isabs(pipefile) else pipefile
    state_dir = state_dir_for(pipefile)  # relative to the root
    if previous is not None and unchanged_since_read(previous):
        pipeline = previous
    else:
        pipeline = _load_pipeline(os.path.abspath(pipefile), state_dir, display, overrides, save=not readonly)
    os.chdir(root)
    store = StateStore(os.path.join(state_dir, "state.db"), readonly=readonly)
    start_generation = store.generation()  # read before the records: a later write shows as a new generation
    hasher = FileHasher(store.load_stat_cache(), fine_device=None if readonly else fine_timestamps_device(state_dir))
    records = store.load_jobs()
    graph = build_graph(pipeline, is_stale_output(records, hasher))
    return Project(pipeline, store, hasher, records, graph, os.path.relpath(start, root), start_generation,
                   state_dir)
