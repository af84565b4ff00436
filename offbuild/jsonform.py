"""The JSON form of a pipeline (`-f pipeline.json`), loaded into the same model as a Pipefile."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import LoadError, Location
from .fields import StageBuilder, Text, check_variable_name, expand_string, parse_int
from .model import PathSpec, Pipeline


def _line_of(text: str, needle: str) -> int:
    """Best-effort line of a stage in the JSON text, so errors point somewhere useful."""
    index = text.find(needle)
    return text.count("\n", 0, index) + 1 if index >= 0 else 1


def load_json(path: str, display_name: str, overrides: dict[str, str]) -> Pipeline:
    """Load `{"vars": {...}, "pools": {...}, "stages": [...], "default": [...]}`."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
        document = json.loads(raw)
    except UnicodeDecodeError as error:
        raise LoadError(f"'{display_name}' is not valid UTF-8 ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise LoadError(f"invalid JSON: {error.msg}", Location(display_name, error.lineno, error.colno)) from None
    except OSError as error:
        raise LoadError(f"cannot read '{display_name}': {error.strerror}") from None
    top = Location(display_name, 1, 1)
    if not isinstance(document, dict):
        raise LoadError("a JSON pipeline must be an object with a \"stages\" list", top)
    unknown = set(document) - {"vars", "pools", "stages", "default"}
    if unknown:
        raise LoadError(f"unknown key '{sorted(unknown)[0]}' (expected vars, pools, stages, default)", top)

    variables = dict(overrides)
    for name, value in _mapping(document, "vars", top).items():
        location = Location(display_name, _line_of(raw, f'"{name}"'), 1)
        check_variable_name(name, location)
        if name not in overrides:
            variables[name] = expand_string(Text(str(value), location), variables)
    pools = {name: parse_int(str(value), top, f"pool {name}", 1)
             for name, value in _mapping(document, "pools", top).items()}

    stages, seen = [], {}
    stage_list = document.get("stages", [])
    if not isinstance(stage_list, list):
        raise LoadError('"stages" must be a list', top)
    for index, entry in enumerate(stage_list):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise LoadError(f"stage #{index + 1} needs a \"name\" string", top)
        name = entry["name"]
        location = Location(display_name, _line_of(raw, f'"{name}"'), 1)
        if name in seen:
            raise LoadError(f"stage '{name}' is already defined (stage #{seen[name] + 1})", location)
        seen[name] = index
        builder = StageBuilder(name, location, variables, pools)
        for field, value in entry.items():
            if field == "name":
                continue
            values = value if isinstance(value, list) else [value]
            texts = [Text(_scalar(item), location) for item in values]
            builder.add(field, texts, split_words=not isinstance(value, list))
        stages.append(builder.build())
    default = document.get("default", [])
    default = default.split() if isinstance(default, str) else default
    return Pipeline(stages=tuple(stages), default=tuple(PathSpec(str(name), top) for name in default),
                    pools=pools, variables=variables, sources=(path,))


def _mapping(document: dict, key: str, location: Location) -> dict:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise LoadError(f'"{key}" must be an object', location)
    return value


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
