"""The JSON form of a pipeline (`-f pipeline.json`), loaded into the same model as a Pipefile."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import LoadError
from .fields import StageBuilder, source_stat, Text, check_overrides, check_variable_name, expand_string, parse_int
from .model import Location, PathSpec, Pipeline


class _Locator:
    """Best-effort source locations in the JSON text (the json module keeps none), searched forwards."""

    def __init__(self, raw: str, origin: Location):
        self.raw = raw
        self.origin = origin

    def at(self, offset: int) -> Location:
        line_start = self.raw.rfind("\n", 0, offset) + 1
        return self.origin.at(self.raw.count("\n", 0, offset) + 1, offset - line_start + 1)

    def find(self, pattern: str, start: int = 0) -> int | None:
        match = re.compile(pattern).search(self.raw, start)
        return match.start() if match else None

    def key(self, name: str, start: int = 0) -> int | None:
        """Offset of `"name":` at or after `start`."""
        return self.find(re.escape(json.dumps(name)) + r"\s*:", start)

    def string(self, value: str, start: int = 0) -> int | None:
        return self.find(re.escape(json.dumps(value)), start)

    def value(self, value, start: int) -> int | None:
        """Offset of a scalar's first character (inside the quotes for a string) at or after `start`.

        Only strings written as `json.dumps` writes them are found; others fall back to their key.
        """
        if isinstance(value, str):
            found = self.find(re.escape(json.dumps(value, ensure_ascii=False)), start)
            return found + 1 if found is not None else None
        return self.find(r"(?<![\w.])" + re.escape(json.dumps(value)) + r"(?![\w.])", start)


def load_json(path: str, display_name: str, overrides: dict[str, str]) -> Pipeline:
    """Load `{"vars": {...}, "pools": {...}, "stages": [...], "default": [...]}`."""
    origin = Location(display_name, 0, 0, os.path.realpath(path))
    try:
        stat_before_reading = source_stat(path)
        data = Path(path).read_bytes()
    except OSError as error:
        raise LoadError(f"cannot read '{display_name}': {error.strerror}") from None
    try:
        raw = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = len(data[data.rfind(b"\n", 0, error.start) + 1:error.start].decode("utf-8", errors="replace")) + 1
        raise LoadError(f"'{display_name}' is not valid UTF-8 ({error.reason} 0x{data[error.start]:02x})",
                        origin.at(line, column)) from None
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoadError(f"invalid JSON: {error.msg}", origin.at(error.lineno, error.colno)) from None
    except RecursionError:
        raise LoadError("invalid JSON: nested too deeply", origin.at(1, 1)) from None
    locator = _Locator(raw, origin)
    top = origin.at(1, 1)
    if not isinstance(document, dict):
        raise LoadError("a JSON pipeline must be an object with a \"stages\" list", top)
    unknown = sorted(set(document) - {"vars", "pools", "stages", "default"})
    if unknown:
        raise LoadError(f"unknown key '{unknown[0]}' (expected vars, pools, stages, default)",
                        _key_location(locator, unknown[0], 0, top))

    check_overrides(overrides)
    variables = dict(overrides)
    vars_at = locator.key("vars") or 0
    for name, value in _mapping(document, "vars", locator, top).items():
        location = _key_location(locator, name, vars_at, top)
        check_variable_name(name, location)
        if name not in overrides:
            variables[name] = expand_string(Text(_scalar(value, f"variable '{name}'", location), location), variables)
    pools_at = locator.key("pools") or 0
    pools = {}
    for name, value in _mapping(document, "pools", locator, top).items():
        location = _key_location(locator, name, pools_at, top)
        pools[name] = parse_int(_scalar(value, f"pool '{name}'", location), location, f"the size of pool '{name}'", 1)

    stages, seen = [], {}
    stage_list = document.get("stages", [])
    if not isinstance(stage_list, list):
        raise LoadError('"stages" must be a list', _key_location(locator, "stages", 0, top))
    search_from = locator.key("stages") or 0
    for index, entry in enumerate(stage_list):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise LoadError(f"stage #{index + 1} needs a \"name\" string", top)
        name = entry["name"]
        name_at = locator.find(re.escape(json.dumps("name")) + r"\s*:\s*" + re.escape(json.dumps(name)), search_from)
        if name_at is None:  # written with escapes json.dumps does not produce: fall back to the start
            name_at = search_from
        location = locator.at(name_at)
        # The stage's own keys may come before "name": search them from the object's opening brace.
        object_at = max(raw.rfind("{", 0, name_at), 0)
        search_from = name_at + 1
        if name in seen:
            raise LoadError(f"stage '{name}' is already defined (stage #{seen[name] + 1})", location)
        seen[name] = index
        builder = StageBuilder(name, location, variables, pools)
        for field, value in entry.items():
            if field == "name":
                continue
            key_at = locator.key(field, object_at)
            field_location = locator.at(key_at) if key_at is not None else location
            values = value if isinstance(value, list) else [value]
            what = f"field '{field}' of stage '{name}'"
            texts, value_from = [], key_at
            for item in values:
                text = _scalar(item, what, field_location)
                item_at = locator.value(item, value_from) if value_from is not None else None
                texts.append(Text(text, locator.at(item_at) if item_at is not None else field_location))
                value_from = item_at + 1 if item_at is not None else None
            builder.add(field, texts, field_location, split_words=not isinstance(value, list))
        stages.append(builder.build())

    default = document.get("default", [])
    default_at = locator.key("default")
    default_location = locator.at(default_at) if default_at is not None else top
    if isinstance(default, str):
        default = default.split()
    if not isinstance(default, list):
        raise LoadError('"default" must be a list of targets', default_location)
    targets = []
    for target in default:
        target = _scalar(target, '"default"', default_location)
        target_at = locator.string(target, default_at or 0)
        targets.append(PathSpec(target, locator.at(target_at) if target_at is not None else default_location))
    return Pipeline(stages=tuple(stages), default=tuple(targets), pools=pools, variables=variables, sources=(path,),
                    source_stats=(stat_before_reading,))


def _key_location(locator: _Locator, key: str, start: int, fallback: Location) -> Location:
    offset = locator.key(key, start)
    return locator.at(offset) if offset is not None else fallback


def _mapping(document: dict, key: str, locator: _Locator, top: Location) -> dict:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise LoadError(f'"{key}" must be an object', _key_location(locator, key, 0, top))
    return value


def _scalar(value, what: str, location: Location) -> str:
    """A JSON string, number or boolean as the text a Pipefile would hold; anything else is an error."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    kind = "null" if value is None else type(value).__name__.replace("dict", "an object").replace("list", "a list")
    raise LoadError(f"{what} must be a string, number or boolean (or a list of them), not {kind}", location)
