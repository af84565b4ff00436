"""Turn raw field text into typed model values; shared by the Pipefile and JSON loaders."""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from .errors import LoadError, UsageError, did_you_mean
from .model import JobVar, Location, PathSpec, Stage

STAGE_FIELDS = (
    "in", "out", "run", "doc", "after", "env", "checkpoint", "retries", "backoff",
    "retry-on", "timeout", "pool", "network", "always", "cache",
)
MAX_EXPANSION = 16 << 20  # bytes one field may expand to
_REFERENCE = re.compile(r"\$(?:(\$)|\{([^}\n]*)\}|([A-Za-z_][A-Za-z0-9_]*)|(\{))")
_WORD = re.compile(r"\S+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_JOB_VARIABLE = re.compile(r"(?:in|out)\d*\Z|stage\Z|stem\Z")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\Z")
_PATH_FIELDS = {"in": "inputs", "out": "outputs", "after": "after"}  # field → Stage attribute
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True, slots=True)
class Text:
    """A raw value from a source file and where each of its characters came from."""

    value: str
    location: Location
    # Source location of each line start after the first, for block recipes.
    line_starts: tuple[Location, ...] = ()

    def locate(self, offset: int) -> Location:
        """The source location of character `offset` of `value`."""
        line_index = self.value.count("\n", 0, offset) if self.line_starts else 0  # one line: skip the scan
        if line_index == 0:
            loc = self.location
            return loc.at(loc.line, loc.column + offset) if loc.line else loc
        start = self.line_starts[line_index - 1] if line_index <= len(self.line_starts) else self.location
        column_offset = offset - self.value.rfind("\n", 0, offset) - 1
        return start.at(start.line, start.column + column_offset)

    def words(self) -> list["Text"]:
        """The whitespace-separated words of a one-line value, each with its own location."""
        return [Text(word, location) for word, location in self.located_words()]

    def located_words(self) -> list[tuple[str, Location]]:
        """`words()` as (word, location) pairs, without a `Text` for each."""
        loc = self.location
        if "\n" in self.value or not loc.line:
            return [(m.group(), self.locate(m.start())) for m in _WORD.finditer(self.value)]
        # One line: columns are plain offsets (locate() would rescan the line for every word).
        # str.split() splits where \S+ would (the same whitespace), and faster; a word starts with
        # non-whitespace, so find() from the end of the previous word lands on its start.
        file, line, column, path = loc.file, loc.line, loc.column, loc.path
        located = []
        offset = 0
        for word in self.value.split():
            offset = self.value.find(word, offset)
            located.append((word, Location(file, line, column + offset, path)))
            offset += len(word)
        return located


def expand(text: Text, variables: dict[str, str], job_variables: bool = False) -> list[str | JobVar]:
    """Substitute `$NAME`, `${NAME}` and `$$`; per-job names stay as JobVar when allowed."""
    if "$" not in text.value:  # most values: nothing to substitute (what _merge would make of it)
        return [text.value] if text.value else []
    parts: list[str | JobVar] = []
    position = 0
    size = len(text.value)
    for match in _REFERENCE.finditer(text.value):
        parts.append(text.value[position:match.start()])
        position = match.end()
        if match.group(1):
            parts.append("$")
            continue
        if match.group(4):
            raise LoadError("'${' without a closing '}' (write $${ for the shell)", text.locate(match.start()))
        name = match.group(2) if match.group(2) is not None else match.group(3)
        location = text.locate(match.start())
        if job_variables and _JOB_VARIABLE.match(name):
            parts.append(JobVar(name, location))
        elif name in variables:
            parts.append(variables[name])
            size += len(variables[name])
            if size > MAX_EXPANSION:  # `X1 = $X0$X0`, `X2 = $X1$X1`... doubles without end
                raise LoadError(f"expands to more than {MAX_EXPANSION >> 20} MiB (variables using variables?)",
                                text.location)
        else:
            raise _undefined(name, location, variables, job_variables)
    parts.append(text.value[position:])
    return list(_merge(parts))


def _merge(parts: list[str | JobVar]) -> tuple[str | JobVar, ...]:
    """Adjacent strings joined and empty ones dropped, so equal recipes have equal parts."""
    merged: list[str | JobVar] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        elif part != "":
            merged.append(part)
    return tuple(merged)


def expand_string(text: Text, variables: dict[str, str]) -> str:
    """`expand` for fields where per-job variables make no sense."""
    return "".join(expand(text, variables))  # type: ignore[arg-type]


def _undefined(name: str, location: Location, variables, job_variables: bool) -> LoadError:
    if not _NAME.match(name):
        return LoadError(f"bad variable reference '${{{name}}}'", location)
    hint = did_you_mean(name, variables)
    if not hint and not job_variables and _JOB_VARIABLE.match(name):
        hint = f" (${name} is only available in 'run:')"
    if not hint:
        hint = f" (write $${name} if you meant the shell's variable)"
    return LoadError(f"undefined variable '{name}'{hint}", location)


def check_overrides(overrides: dict[str, str]) -> None:
    """Command-line `NAME=VALUE` may not set a per-job name either (`in=x` would change `$in` in paths)."""
    for name in overrides:
        if _JOB_VARIABLE.match(name):
            raise UsageError(f"cannot set '{name}' on the command line: it is reserved for recipes")


def check_variable_name(name: str, location: Location) -> None:
    """Per-job names are reserved: defining `in = ...` would silently shadow `$in`."""
    if _JOB_VARIABLE.match(name):
        raise LoadError(f"'{name}' is reserved for recipes and cannot be a variable", location)


def parse_duration(text: str, location: Location) -> float:
    """`30s`, `5m`, `2h`, `500ms` or a plain number of seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise LoadError(f"bad duration '{text.strip()}' (use e.g. 30s, 5m, 2h)", location)
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def parse_bool(text: str, location: Location, field: str) -> bool:
    """`true`/`false` (also yes/no, on/off, 1/0), any case."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise LoadError(f"'{field}:' must be true or false, not '{text.strip()}'", location)


def parse_int(text: str, location: Location, what: str, minimum: int = 0, maximum: int | None = None) -> int:
    """A whole number in [minimum, maximum]; `what` names the value in the error (`'retries:'`)."""
    try:
        number = int(text.strip())
    except ValueError:
        number = minimum - 1
    if number < minimum or (maximum is not None and number > maximum):
        wanted = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
        raise LoadError(f"{what} must be a whole number {wanted}, not '{text.strip()}'", location)
    return number


class StageBuilder:
    """Collects one stage's fields, validating each, then builds the frozen `Stage`."""

    def __init__(self, name: str, location: Location, variables: dict[str, str], pools: dict[str, int]):
        self.name = name
        self.location = location
        self.variables = variables
        self.pools = pools
        self.values: dict = {}
        self.seen: dict[str, Location] = {}

    def add(self, field: str, texts: list[Text], field_location: Location, split_words: bool = True) -> None:
        """Add one field; `texts` are its values (one text for a Pipefile line, several for JSON lists)."""
        location = texts[0].location if texts else field_location
        if field not in STAGE_FIELDS:
            raise LoadError(f"unknown field '{field}'{did_you_mean(field, STAGE_FIELDS)}", field_location)
        if field in self.seen:
            raise LoadError(f"field '{field}' given twice in stage '{self.name}' (first at {self.seen[field]})",
                            field_location)
        self.seen[field] = field_location
        if field == "run":
            if len(texts) == 1:  # a Pipefile's: expand() already merges
                self.values["recipe"] = tuple(expand(texts[0], self.variables, True))
                return
            parts: list[str | JobVar] = []
            for index, text in enumerate(texts):
                parts.extend((["\n"] if index else []) + expand(text, self.variables, True))
            self.values["recipe"] = _merge(parts)  # one segmentation, however the lines were given
            return
        if field in _PATH_FIELDS:
            self.values[_PATH_FIELDS[field]] = tuple([
                PathSpec(word, word_location) for word, word_location in self._words(texts, split_words)])
            return
        scalar = " ".join(expand_string(text, self.variables) for text in texts)
        if field == "doc":
            self.values["doc"] = scalar.strip()
        elif field == "env":
            names = []
            for env_name, word_location in self._words(texts, True):
                if not _NAME.match(env_name):
                    raise LoadError(f"'{env_name}' is not an environment variable name", word_location)
                names.append(env_name)
            self.values["env"] = tuple(names)
        elif field in ("checkpoint", "network", "always", "cache"):
            self.values[field] = parse_bool(scalar, location, field)
        elif field == "retries":
            self.values["retries"] = parse_int(scalar, location, f"'{field}:'")
        elif field == "retry-on":
            self.values["retry_on"] = tuple(parse_int(code, word_location, "an exit code in 'retry-on:'", 0, 255)
                                            for code, word_location in self._words(texts, True))
        elif field in ("timeout", "backoff"):
            self.values[field] = parse_duration(scalar, location)
        elif field == "pool":
            pool = scalar.strip()
            if pool not in self.pools:
                raise LoadError(f"unknown pool '{pool}'{did_you_mean(pool, self.pools)}"
                                f" (declare it at top level: pool {pool} = N)", location)
            self.values["pool"] = pool

    def _words(self, texts: list[Text], split_words: bool):
        """(word, location) pairs after expansion; a variable holding several words gives several."""
        for text in texts:
            if split_words and "$" not in text.value:
                yield from text.located_words()  # nothing to expand: each word is one piece
                continue
            for word in (text.words() if split_words else [text]):
                expanded = expand_string(word, self.variables)
                for piece in (expanded.split() if split_words else [expanded]):
                    yield piece, word.location

    def build(self) -> Stage:
        """The validated stage."""
        stage = Stage(name=self.name, location=self.location, **self.values)
        has_pattern = stage.pattern_input is not None
        for spec in stage.outputs:
            if spec.is_pattern and not has_pattern:
                raise LoadError(f"output '{spec.text}' uses '%' but no input of stage '{self.name}' does",
                                spec.location)
            if has_pattern and not spec.is_pattern:
                raise LoadError(f"output '{spec.text}' of pattern stage '{self.name}' must contain '%'"
                                " (otherwise every job would write the same file)", spec.location)
            if spec.is_glob:
                raise LoadError(f"output '{spec.text}' cannot be a glob: outputs are exact paths", spec.location)
        if stage.outputs and not stage.recipe:
            raise LoadError(f"stage '{self.name}' declares outputs but has no 'run:'", self.location)
        return stage


def source_stat(path: str) -> tuple[str, int, int, int, int, int]:
    """What a source file looked like just before it was read (for the no-op fast path)."""
    taken = time.time_ns()
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, taken)
