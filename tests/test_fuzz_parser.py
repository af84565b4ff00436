"""The Pipefile loader fuzzed (issue 6).

Valid Pipefiles are generated from a model (variables, pools, includes, stages with every field,
one-line and block recipes, comments, odd spacing, `$$` and shell `$(...)`), printed, loaded with
`offbuild.parser.load_pipefile`, and compared with what the model says they mean, source
locations included. Broken ones (an undefined variable, a bad UTF-8 byte, an unknown or
repeated field put at a known place; random edits of valid files; random bytes; deep nesting;
huge lines) must give a `LoadError` at the right place, never another exception or a hang;
a few go through the real `offbuild`, which must exit 2 with `FILE:LINE:COL: error:` and no traceback.
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

from conftest_hypothesis import budget, report
from offbuild.errors import LoadError, OffbuildError
from offbuild.graph import build_graph
from offbuild.jsonform import load_json
from offbuild.model import JobVar, PathSpec
from offbuild.parser import load_pipefile

STATS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    if STATS:
        report(request.config, "\ntest_fuzz_parser: " + ", ".join(f"{count} {what}" for what, count in STATS.items()))


# --------------------------------------------------------------------------- the model
# A value is a list of tokens: ("lit", text) | ("var", name, braced) | ("job", name, braced)
# | ("dollar",) for `$$` | ("shell", text) for a `$` the shell gets unchanged (`$(`, `$1`, `$?`).

NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
PATH_CHARS = "abcxyz019_.-/"
TEXT_CHARS = "abcxyzABC019 .,:;!?()[]{}<>/\\'\"-=+*&|~`@^%é☃𝄞"
RECIPE_CHARS = TEXT_CHARS + "#"
RESERVED = re.compile(r"(?:in|out)\d*\Z|stage\Z|stem\Z|include\Z|pool\Z")
JOB_NAMES = ("in", "out", "in0", "in1", "out0", "stage", "stem")
SHELL_DOLLARS = ("$(", "$1", "$?", "$@", "$-", "$ ")
BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600}


@dataclass
class VarDef:
    name: str
    value: list


@dataclass
class PoolDef:
    name: str
    size: int


@dataclass
class Default:
    words: list  # of token lists


@dataclass
class Include:
    path: str  # relative to the including file
    statements: list


@dataclass
class Field:
    name: str
    value: object  # token list, list of token lists (in/out/after/env), str (scalars), or Block
    comment: bool = False  # a trailing `# comment` (never after a one-line recipe: that is the shell's)
    shape: str = ""  # the field whose value syntax this one has, when `name` was misspelt on purpose

    @property
    def kind(self) -> str:
        return self.shape or self.name


@dataclass
class Block:
    """An indented recipe: lines of tokens, or ("comment", text) / ("blank",), each with extra indentation."""

    lines: list
    comment_after_run: bool = False


@dataclass
class StageDef:
    name: str
    fields: list


@dataclass
class Doc:
    """A whole generated project: statements of the Pipefile, with includes inline."""

    statements: list
    overrides: dict = field(default_factory=dict)
    style: dict = field(default_factory=dict)


def _is_name_char(char: str) -> bool:
    return char in NAME_CHARS


def render(tokens: list) -> tuple[str, list[int]]:
    """Raw text of a token list and the character offset of each token."""
    out, offsets, position = [], [], 0
    for index, token in enumerate(tokens):
        following = render_first_char(tokens[index + 1]) if index + 1 < len(tokens) else ""
        kind = token[0]
        if kind in ("lit", "shell"):
            text = token[1]
        elif kind == "dollar":
            text = "$$"
        else:
            name, braced = token[1], token[2]
            text = f"${{{name}}}" if braced or _is_name_char(following) else f"${name}"
        offsets.append(position)
        out.append(text)
        position += len(text)
    return "".join(out), offsets


def render_first_char(token) -> str:
    return token[1][:1] if token[0] in ("lit", "shell") else "$"


def expand(tokens: list, variables: dict) -> list:
    """What offbuild makes of a value: strings and ("job", name), adjacent strings merged."""
    parts: list = []
    for token in tokens:
        kind = token[0]
        piece = {"lit": lambda: token[1], "shell": lambda: token[1], "dollar": lambda: "$",
                 "var": lambda: variables[token[1]], "job": lambda: ("job", token[1])}[kind]()
        if isinstance(piece, str) and parts and isinstance(parts[-1], str):
            parts[-1] += piece
        else:
            parts.append(piece)
    return [part for part in parts if part != ""]


def expand_text(tokens: list, variables: dict) -> str:
    return "".join(expand(tokens, variables))


# --------------------------------------------------------------------------- strategies


def lit(alphabet: str, min_size=1, max_size=6):
    return st.text(alphabet=alphabet, min_size=min_size, max_size=max_size).map(lambda text: ("lit", text))


def var_token(names: list[str]):
    return st.tuples(st.just("var"), st.sampled_from(names), st.booleans())


@st.composite
def value_tokens(draw, variables: list[str], alphabet: str, jobs: bool = False, shell: bool = False,
                 max_tokens: int = 5) -> list:
    """Tokens whose raw text has no leading or trailing whitespace and does not start with '#'."""
    choices = [lit(alphabet)]
    if variables:
        choices.append(var_token(variables))
    choices.append(st.just(("dollar",)))
    if jobs:
        choices.append(st.tuples(st.just("job"), st.sampled_from(JOB_NAMES), st.booleans()))
    if shell:
        choices.append(st.sampled_from(SHELL_DOLLARS).map(lambda text: ("shell", text)))
    tokens = [draw(lit("abcxyz", 1, 3))] + draw(st.lists(st.one_of(*choices), max_size=max_tokens))
    return normalize_edges(tokens)


def normalize_edges(tokens: list) -> list:
    """Strip trailing whitespace the loader would strip, so the model needs no special case."""
    while tokens and tokens[-1][0] in ("lit", "shell") and tokens[-1][1] != tokens[-1][1].rstrip():
        text = tokens[-1][1].rstrip()
        tokens[-1] = ("lit", text)
        if not text:
            tokens.pop()
    return tokens


@st.composite
def word_tokens(draw, variables: list[str], alphabet: str = PATH_CHARS, special: str = "") -> list:
    """One space-free word: path characters, maybe a variable, maybe `special` (`%` or `*`)."""
    tokens = [draw(lit(alphabet, 1, 5))]
    if variables and draw(st.integers(0, 3)) == 0:
        tokens.append(draw(var_token(variables)))
        tokens.append(draw(lit(alphabet, 0, 3)))
    if special:
        tokens.append(("lit", special))
        tokens.append(draw(lit(alphabet, 0, 3)))
    return [token for token in tokens if token != ("lit", "")]


def var_names():
    return st.text(alphabet=NAME_CHARS, min_size=1, max_size=6).filter(
        lambda name: not name[0].isdigit() and not RESERVED.match(name))


def stage_names():
    return st.text(alphabet="abcxyz019_.-", min_size=1, max_size=6)


@st.composite
def durations(draw) -> str:
    number = draw(st.sampled_from(["0", "1", "30", "1.5", ".5", "2.", "100"]))
    unit = draw(st.sampled_from(sorted(UNITS)))
    return number + (draw(st.sampled_from(["", " "])) if unit else "") + unit


@st.composite
def stage_defs(draw, name: str, variables: list[str], pools: list[str]) -> StageDef:
    pattern = draw(st.integers(0, 3)) == 0
    fields: dict[str, object] = {}
    inputs = draw(st.lists(word_tokens(variables, special=draw(st.sampled_from(["", "", "*"]))), max_size=3))
    if pattern:
        inputs.insert(draw(st.integers(0, len(inputs))), draw(word_tokens(variables, special="%")))
    if inputs or draw(st.booleans()):
        fields["in"] = inputs
    # A variable's value may hold spaces and so split a word: in a pattern stage that could leave an
    # output piece without its `%`, which is an error, so pattern outputs use no variables.
    outputs = draw(st.lists(word_tokens([] if pattern else variables, special="%" if pattern else ""), max_size=2))
    if outputs:
        fields["out"] = outputs
    if outputs or draw(st.integers(0, 3)):
        if draw(st.booleans()):
            lines = []
            for index in range(draw(st.integers(1, 4))):
                kind = draw(st.sampled_from(["line", "line", "line", "comment", "blank"])) if index else "line"
                extra = draw(st.sampled_from(["", "", "  ", "    "])) if index else ""
                if kind == "line":
                    lines.append((extra, draw(value_tokens(variables, RECIPE_CHARS, jobs=True, shell=True))))
                elif kind == "comment":
                    lines.append((extra, ("comment", ("# " + draw(st.text(alphabet=TEXT_CHARS, max_size=8))).rstrip())))
                else:
                    lines.append(("", ("blank",)))
            while isinstance(lines[-1][1], tuple):
                lines.pop()  # a block ends at its last recipe line; trailing comments are offbuild's
            fields["run"] = Block(lines, draw(st.booleans()))
        else:
            fields["run"] = draw(value_tokens(variables, RECIPE_CHARS, jobs=True, shell=True))
    optional = {
        "doc": value_tokens(variables, TEXT_CHARS),
        "after": st.lists(st.lists(lit("abcxyz019_.-", 1, 5), min_size=1, max_size=1), min_size=1, max_size=3),
        "env": st.lists(var_names().map(lambda name: [("lit", name)]), min_size=1, max_size=3),
        "checkpoint": st.sampled_from(sorted(BOOLS)).map(lambda text: text.upper() if len(text) == 2 else text),
        "network": st.sampled_from(sorted(BOOLS)),
        "always": st.sampled_from(sorted(BOOLS)).map(str.capitalize),
        "retries": st.integers(0, 20).map(str),
        "retry-on": st.lists(st.integers(0, 255).map(str), min_size=1, max_size=3),
        "timeout": durations(),
        "backoff": durations(),
    }
    if pools:
        optional["pool"] = st.sampled_from(pools)
    for field_name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, min_size=0 if fields else 1,
                                    max_size=5)):
        fields[field_name] = draw(optional[field_name])  # a stage has at least one field
    order = draw(st.permutations(sorted(fields)))
    return StageDef(name, [Field(key, fields[key], draw(st.integers(0, 3)) == 0) for key in order])


@st.composite
def docs(draw) -> Doc:
    """A random valid project: top-level statements (with includes) in the order they will be printed."""
    variables: list[str] = []
    pools: list[str] = []
    includes = 0
    used_stage_names: set[str] = set()
    have_default = False

    def statements(depth: int) -> list:
        nonlocal have_default, includes
        result = []
        for _ in range(draw(st.integers(0 if depth else 1, 6 if depth == 0 else 3))):
            kind = draw(st.sampled_from(["var", "var", "stage", "stage", "stage", "pool", "default", "include"]))
            if kind == "var":
                name = draw(var_names())
                result.append(VarDef(name, draw(value_tokens(variables, "abc019_./- ", max_tokens=3))
                                     if draw(st.integers(0, 5)) else []))
                if name not in variables:
                    variables.append(name)
            elif kind == "pool":
                name = draw(var_names())
                result.append(PoolDef(name, draw(st.integers(1, 64))))
                pools.append(name)
            elif kind == "default" and not have_default:
                have_default = True
                result.append(Default(draw(st.lists(st.lists(lit("abcxyz019_.-", 1, 5), min_size=1, max_size=1),
                                                    min_size=1, max_size=3))))
            elif kind == "include" and depth < 2:
                includes += 1
                result.append(Include(f"inc{includes}/part{depth}.pipe", statements(depth + 1)))
            else:
                name = draw(stage_names().filter(lambda name: name not in used_stage_names))
                used_stage_names.add(name)
                result.append(draw(stage_defs(name, list(variables), list(pools))))
        return result

    body = statements(0)
    overrides = {}
    for name in draw(st.lists(st.sampled_from(variables), unique=True, max_size=2)) if variables else []:
        overrides[name] = draw(st.text(alphabet="abc019_./-", min_size=0, max_size=4))
    style = {
        "indent": draw(st.sampled_from(["    ", "  ", "\t", "   "])),
        "block": draw(st.sampled_from(["    ", "  ", "\t"])),
        "space": draw(st.sampled_from([" ", "  ", "\t", ""])),
        "eq": draw(st.sampled_from([" = ", "=", " =  ", "\t=\t"])),
        "blank": draw(st.integers(0, 3)),
        "crlf": draw(st.integers(0, 9)) == 0,
        "bom": draw(st.integers(0, 9)) == 0,
        "final_newline": draw(st.integers(0, 5)) > 0,
        "seed": draw(st.integers(0, 2**16)),
    }
    return Doc(body, overrides, style)


# --------------------------------------------------------------------------- the printer


@dataclass
class Printed:
    """The files of a printed Doc and where things landed: (file, line, column), 1-based."""

    files: dict[str, list[str]]
    stage_at: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    words_at: dict[tuple, tuple[str, int, int]] = field(default_factory=dict)  # (stage, field, i) → place
    tokens_at: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # id(token list) → place of each
    token_places: dict[tuple[int, int], tuple[str, int, int]] = field(default_factory=dict)
    field_at: dict[tuple[str, int], tuple[str, int, int]] = field(default_factory=dict)  # (stage, index)

    def text(self, name: str, style: dict) -> bytes:
        newline = "\r\n" if style["crlf"] else "\n"
        text = newline.join(self.files[name]) + (newline if style["final_newline"] else "")
        return (("\ufeff" if style["bom"] and name == "Pipefile" else "") + text).encode()


class Printer:
    def __init__(self, doc: Doc):
        self.doc = doc
        self.style = doc.style
        self.out = Printed({})
        self.counter = doc.style["seed"]

    def coin(self, odds: int = 2) -> bool:
        """A deterministic pseudo-random choice, so a Doc always prints the same way."""
        self.counter = (self.counter * 1103515245 + 12345) % 2**31
        return self.counter % odds == 0

    def print(self) -> Printed:
        self.file("Pipefile", self.doc.statements)
        return self.out

    def file(self, name: str, statements: list) -> None:
        lines: list[str] = []
        self.out.files[name] = lines
        for statement in statements:
            for _ in range(self.style["blank"] if self.coin() else 0):
                lines.append("")
            if self.coin(5):
                lines.append("# " + "comment " * (self.counter % 3))
            self.statement(name, lines, statement)

    def place_tokens(self, file: str, line: int, column: int, tokens: list) -> str:
        """Render tokens whose first character lands at (line, column); remember every token's place."""
        text, offsets = render(tokens)
        for index, offset in enumerate(offsets):
            self.out.token_places[(id(tokens), index)] = (file, line, column + offset)
        return text

    def comment(self) -> str:
        return "  # trailing comment" if self.coin(3) else ""

    def statement(self, name: str, lines: list[str], statement) -> None:
        line = len(lines) + 1
        space = self.style["space"]
        if isinstance(statement, VarDef):
            head = statement.name + self.style["eq"]
            lines.append(head + self.place_tokens(name, line, len(head) + 1, statement.value) + self.comment())
        elif isinstance(statement, PoolDef):
            lines.append(f"pool {statement.name}{self.style['eq']}{statement.size}{self.comment()}")
        elif isinstance(statement, Default):
            lines.append("default:" + (space or " ") + self.words(name, line, len("default:" + (space or " ")) + 1,
                                                                statement.words, None) + self.comment())
        elif isinstance(statement, Include):
            lines.append(f"include {statement.path}{self.comment()}")
            directory = os.path.dirname(name)
            self.file(os.path.normpath(os.path.join(directory, statement.path)), statement.statements)
        else:
            self.stage(name, lines, statement)

    def words(self, file: str, line: int, column: int, words: list, key) -> str:
        parts = []
        for index, word in enumerate(words):
            gap = " " if not parts else (" " if self.coin() else "   ")
            column += len(gap) if parts else 0
            text = self.place_tokens(file, line, column, word)
            if key is not None:
                self.out.words_at[(*key, index)] = (file, line, column)
            parts.append((gap if parts else "") + text)
            column += len(text)
        return "".join(parts)

    def stage(self, file: str, lines: list[str], stage: StageDef) -> None:
        indent = self.style["indent"]
        header = "stage " + (" " if self.coin(4) else "")
        lines.append(f"{header}{stage.name}{' ' if self.coin(5) else ''}:{self.comment()}")
        self.out.stage_at[stage.name] = (file, len(lines), len(header) + 1)
        for index, item in enumerate(stage.fields):
            line = len(lines) + 1
            head = f"{indent}{item.name}:"
            self.out.field_at[(stage.name, index)] = (file, line, len(indent) + 1)
            gap = self.style["space"] if item.kind != "run" else (self.style["space"] or " ")
            column = len(head + gap) + 1
            value = item.value
            if isinstance(value, Block):
                lines.append(head + ("  # about the recipe" if value.comment_after_run else ""))
                block_indent = indent + self.style["block"]
                for extra, content in value.lines:
                    if content == ("blank",):
                        lines.append("")
                    elif isinstance(content, tuple):  # ("comment", text)
                        lines.append(block_indent + extra + content[1])
                    else:
                        start = len(block_indent + extra) + 1
                        lines.append(block_indent + extra + self.place_tokens(file, len(lines) + 1, start, content))
                continue
            if item.kind in ("in", "out", "after", "env"):
                text = self.words(file, line, column, value, (stage.name, item.name))
            elif isinstance(value, list) and item.kind == "retry-on":
                text = " ".join(value)
            elif isinstance(value, list):
                text = self.place_tokens(file, line, column, value)
            else:
                text = value
            trailing = self.comment() if item.kind != "run" and item.comment else ""
            lines.append(head + (gap if text else "") + text + trailing)


# --------------------------------------------------------------------------- what the model means


def expected(doc: Doc, pieces: dict | None = None) -> dict:
    """The loaded pipeline the model describes, in plain values comparable with `summary()`;
    `pieces` gets, per (stage, "in"|"out"), how many paths each written word expands to."""
    pieces = {} if pieces is None else pieces
    variables = dict(doc.overrides)
    pools: dict[str, int] = {}
    stages, default = [], []

    def walk(statements):
        nonlocal default
        for statement in statements:
            if isinstance(statement, VarDef):
                if statement.name not in doc.overrides:
                    variables[statement.name] = expand_text(statement.value, variables)
            elif isinstance(statement, PoolDef):
                pools[statement.name] = statement.size
            elif isinstance(statement, Default):
                default = [expand_text(word, variables) for word in statement.words]
            elif isinstance(statement, Include):
                walk(statement.statements)
            else:
                stages.append(expected_stage(statement, variables, pieces))

    walk(doc.statements)
    return {"variables": variables, "pools": pools, "default": default, "stages": stages}


def expected_stage(stage: StageDef, variables: dict, pieces: dict) -> dict:
    result = {"name": stage.name, "inputs": [], "outputs": [], "recipe": [], "doc": "", "after": [], "env": [],
              "checkpoint": False, "retries": 0, "backoff": 1.0, "retry_on": [], "timeout": None, "pool": None,
              "network": False, "always": False}
    for item in stage.fields:
        value = item.value
        if item.name in ("in", "out", "after"):
            key = {"in": "inputs", "out": "outputs", "after": "after"}[item.name]
            result[key] = [piece for word in value for piece in expand_text(word, variables).split()]
            pieces[(stage.name, item.name)] = [len(expand_text(word, variables).split()) for word in value]
        elif item.name == "env":
            result["env"] = [expand_text(word, variables) for word in value]
        elif item.name == "run":
            tokens = value
            if isinstance(value, Block):
                tokens = []
                for index, (extra, content) in enumerate(value.lines):
                    if index:
                        tokens.append(("lit", "\n"))
                    if isinstance(content, list):
                        tokens += [("lit", extra)] + content
                    elif content != ("blank",):
                        tokens.append(("lit", extra + content[1]))
            result["recipe"] = expand(tokens, variables)
        elif item.name == "doc":
            result["doc"] = expand_text(value, variables).strip()
        elif item.name in ("checkpoint", "network", "always"):
            result[item.name] = BOOLS[value.lower()]
        elif item.name == "retries":
            result["retries"] = int(value)
        elif item.name == "retry-on":
            result["retry_on"] = [int(code) for code in value]
        elif item.name in ("timeout", "backoff"):
            number = value.rstrip("msh ")
            result[item.name] = float(number) * UNITS[value[len(number):].strip()]
        elif item.name == "pool":
            result["pool"] = value
    return result


def summary(pipeline) -> dict:
    """The same plain values, read from offbuild's `Pipeline`."""
    def parts(recipe):
        return [("job", part.name) if isinstance(part, JobVar) else part for part in recipe]

    return {
        "variables": dict(pipeline.variables), "pools": dict(pipeline.pools),
        "default": [spec.text for spec in pipeline.default],
        "stages": [{
            "name": stage.name, "inputs": [spec.text for spec in stage.inputs],
            "outputs": [spec.text for spec in stage.outputs], "recipe": parts(stage.recipe), "doc": stage.doc,
            "after": [spec.text for spec in stage.after], "env": list(stage.env), "checkpoint": stage.checkpoint,
            "retries": stage.retries, "backoff": stage.backoff, "retry_on": list(stage.retry_on),
            "timeout": stage.timeout, "pool": stage.pool, "network": stage.network, "always": stage.always,
        } for stage in pipeline.stages],
    }


def write_project(root: Path, doc: Doc, printed: Printed) -> None:
    for name in printed.files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(printed.text(name, doc.style))


def load(root: Path, doc: Doc | None = None):
    return load_pipefile(str(root / "Pipefile"), "Pipefile", dict(doc.overrides) if doc else {})


def show(printed: Printed, doc: Doc) -> None:
    for name in printed.files:
        note(f"--- {name}\n" + printed.text(name, doc.style).decode("utf-8", "replace"))


# --------------------------------------------------------------------------- valid files load as modelled


@settings(max_examples=budget(150, 3000))
@given(doc=docs())
def test_valid_pipefiles_load_to_their_model(doc):
    printed = Printer(doc).print()
    show(printed, doc)
    STATS["valid Pipefiles"] += 1
    STATS["stages in them"] += sum(1 for _ in iter_stages(doc.statements))
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        write_project(root, doc, printed)
        pipeline = load(root, doc)
    pieces: dict = {}
    assert summary(pipeline) == expected(doc, pieces)
    # ... and everything is where the printer put it
    by_name = {stage.name: stage for stage in pipeline.stages}
    for name, (file, line, column) in printed.stage_at.items():
        location = by_name[name].location
        assert (location.file, location.line, location.column) == (file, line, column), name
    for stage_def in iter_stages(doc.statements):
        stage = by_name[stage_def.name]
        for key, specs in (("in", stage.inputs), ("out", stage.outputs)):
            word_places = [printed.words_at[(stage.name, key, index)]
                           for index, count in enumerate(pieces.get((stage.name, key), [])) for _ in range(count)]
            assert [(s.location.file, s.location.line, s.location.column) for s in specs] == word_places


def iter_stages(statements):
    for statement in statements:
        if isinstance(statement, StageDef):
            yield statement
        elif isinstance(statement, Include):
            yield from iter_stages(statement.statements)


# --------------------------------------------------------------------------- broken at a known place


def token_slots(doc: Doc) -> list[tuple[list, bool]]:
    """Every token list a variable reference may go into, and whether it is a recipe."""
    slots = []

    def walk(statements):
        for statement in statements:
            if isinstance(statement, VarDef) and statement.name not in doc.overrides and statement.value:
                slots.append((statement.value, False))
            elif isinstance(statement, Default):
                slots.extend((word, False) for word in statement.words)
            elif isinstance(statement, Include):
                walk(statement.statements)
            elif isinstance(statement, StageDef):
                for item in statement.fields:
                    if item.name in ("in", "out", "after", "env"):
                        slots.extend((word, False) for word in item.value)
                    elif item.name in ("doc",):
                        slots.append((item.value, False))
                    elif item.name == "run" and isinstance(item.value, Block):
                        slots.extend((content, True) for _, content in item.value.lines if isinstance(content, list))
                    elif item.name == "run":
                        slots.append((item.value, True))

    walk(doc.statements)
    return slots


@dataclass
class Breakage:
    """A broken project and the error it must give."""

    files: dict[str, bytes]
    file: str
    line: int
    column: int
    message: str  # a fragment of the message


@st.composite
def undefined_variables(draw) -> Breakage:
    doc = draw(docs())
    slots = token_slots(doc)
    assume(slots)
    tokens, _ = draw(st.sampled_from(slots))
    name = "Undefined_" + draw(st.text(alphabet="xyz", min_size=1, max_size=3))
    index = draw(st.integers(0, len(tokens)))
    assume(index == 0 or not render(tokens[index - 1:index])[0].endswith("$"))  # `$` + `$X` would be `$$` + `X`
    tokens.insert(index, ("var", name, draw(st.booleans())))
    printed = Printer(doc).print()
    file, line, column = printed.token_places[(id(tokens), index)]
    files = {name_: printed.text(name_, doc.style) for name_ in printed.files}
    return Breakage(files, file, line, column, f"undefined variable '{name}'")


@st.composite
def bad_bytes(draw) -> Breakage:
    doc = draw(docs())
    printed = Printer(doc).print()
    files = {name: printed.text(name, doc.style) for name in printed.files}
    file = draw(st.sampled_from(sorted(files)))
    text = files[file].decode()
    position = draw(st.integers(1 if text.startswith("\ufeff") else 0, len(text)))  # after a byte-order mark
    bad = draw(st.sampled_from([b"\xff", b"\xc3(", b"\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]))
    before = text[:position].encode()
    files[file] = before + bad + text[position:].encode()
    line = before.count(b"\n") + 1
    line_text = before[before.rfind(b"\n") + 1:].decode()
    if line == 1:
        line_text = line_text.removeprefix("\ufeff")
    return Breakage(files, file, line, len(line_text) + 1, "is not valid UTF-8")


@st.composite
def unknown_or_repeated_fields(draw) -> Breakage:
    doc = draw(docs())
    stages = [stage for stage in iter_stages(doc.statements)
              if any(not isinstance(item.value, Block) for item in stage.fields)]
    assume(stages)
    stage = draw(st.sampled_from(stages))
    index = draw(st.sampled_from([i for i, item in enumerate(stage.fields) if not isinstance(item.value, Block)]))
    original = stage.fields[index].name
    repeat = draw(st.booleans())
    if repeat:
        stage.fields.insert(index + 1, Field(original, stage.fields[index].value))
        printed = Printer(doc).print()
        file, line, column = printed.field_at[(stage.name, index + 1)]
        message = f"field '{original}' given twice in stage '{stage.name}'"
    else:
        stage.fields[index].name, stage.fields[index].shape = original + "z", original
        printed = Printer(doc).print()
        file, line, column = printed.field_at[(stage.name, index)]
        message = f"unknown field '{original}z' (did you mean '{original}'?)"
    files = {name: printed.text(name, doc.style) for name in printed.files}
    return Breakage(files, file, line, column, message)


BREAKAGES = st.one_of(undefined_variables(), bad_bytes(), unknown_or_repeated_fields())


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@settings(max_examples=budget(150, 3000))
@given(broken=BREAKAGES)
def test_broken_pipefiles_fail_at_the_right_place(broken):
    for name, data in broken.files.items():
        note(f"--- {name}\n{data.decode('utf-8', 'replace')}")
    STATS["broken Pipefiles with a known error place"] += 1
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        write_files(root, broken.files)
        with pytest.raises(LoadError) as caught:
            load(root)
    error = caught.value
    location = error.location
    assert (location.file, location.line, location.column) == (broken.file, broken.line, broken.column), \
        error.render()
    assert broken.message in error.message
    assert error.render().startswith(f"{broken.file}:{broken.line}:{broken.column}: error: ")


# --------------------------------------------------------------------------- random damage never crashes

NASTY = ":$#{}%*?[]\t\n =\\\"'()$${in}$(x)${}é\x00\x0b\x0c\r\u2028\xa0abc"
NASTY_WORDS = ["stage ", "run:", "in:", "out:", "include ", "pool ", "default:", "    ", "\t", "\n    ", "$", "${",
               "$$", "#", "%", "*", "stage a:\n", "run:\n", "\n        x\n", ":", "=", "retries: -1", "timeout: 9x",
               "after: a", "pool: p", "checkpoint: maybe", "env: 1X", "${in}", "$stem", "$out9"]


@st.composite
def mutations(draw) -> tuple[list, list]:
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "word", "dup_line", "drop_line", "swap_lines", "indent",
                                     "dedent", "truncate"]))
        ops.append((kind, draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)),
                    draw(st.text(alphabet=NASTY, min_size=1, max_size=4)), draw(st.sampled_from(NASTY_WORDS))))
    return ops


def mutate(text: str, ops: list) -> str:
    for kind, a, b, chars, word in ops:
        lines = text.split("\n")
        n = max(len(text), 1)
        if kind == "delete":
            start = a % n
            text = text[:start] + text[start + 1 + b % 8:]
        elif kind == "insert":
            start = a % (len(text) + 1)
            text = text[:start] + chars + text[start:]
        elif kind == "word":
            start = a % (len(text) + 1)
            text = text[:start] + word + text[start:]
        elif kind == "dup_line":
            i = a % len(lines)
            lines.insert(i, lines[i])
            text = "\n".join(lines)
        elif kind == "drop_line":
            del lines[a % len(lines)]
            text = "\n".join(lines)
        elif kind == "swap_lines":
            i, j = a % len(lines), b % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif kind == "indent":
            i = a % len(lines)
            lines[i] = " " * (1 + b % 9) + lines[i]
            text = "\n".join(lines)
        elif kind == "dedent":
            i = a % len(lines)
            lines[i] = lines[i].lstrip()
            text = "\n".join(lines)
        else:
            text = text[:a % n]
    return text


def escapes_project(pipeline) -> bool:
    """Globs and patterns outside the project would make the test walk the whole file system."""
    specs = [spec for stage in pipeline.stages for spec in (*stage.inputs, *stage.outputs)]
    return any(os.path.isabs(spec.text) or ".." in spec.text.split("/")
               or (spec.is_glob or spec.is_pattern) and len(spec.text) > 200 for spec in specs)


def check_load_and_plan(root: Path, name: str = "Pipefile") -> str:
    """Load, build the job graph and select the targets as `offbuild -n` would, in-process.
    Returns 'ok' or the error's first line; any exception but OffbuildError fails the test."""
    started = time.monotonic()
    previous = os.getcwd()
    os.chdir(root)
    try:
        pipeline = load_pipefile(str(root / name), name, {})
        if escapes_project(pipeline):
            return "ok"
        graph = build_graph(pipeline)
        targets = list(pipeline.default) or [PathSpec(stage.name, stage.location) for stage in pipeline.stages]
        graph.check_inputs_exist(graph.select(targets))
        return "ok"
    except OffbuildError as error:
        rendered = error.render()
        if isinstance(error, LoadError):
            assert error.location is not None and error.location.line >= 1 and error.location.column >= 1, rendered
            assert re.match(r"[^\n]+:\d+:\d+: error: \S", rendered), rendered
        return rendered.splitlines()[0]
    finally:
        os.chdir(previous)
        assert time.monotonic() - started < 20, "loading took too long"


@settings(max_examples=budget(200, 4000))
@given(doc=docs(), ops=mutations())
def test_randomly_damaged_pipefiles_give_errors_not_crashes(doc, ops):
    printed = Printer(doc).print()
    text = mutate(printed.text("Pipefile", doc.style).decode(), ops)
    note(text)
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        write_project(root, doc, printed)
        (root / "Pipefile").write_bytes(text.encode("utf-8", "surrogatepass"))
        outcome = check_load_and_plan(root)
    STATS["damaged Pipefiles"] += 1
    STATS["of them rejected"] += outcome != "ok"


@settings(max_examples=budget(100, 2000))
@given(data=st.binary(max_size=300))
def test_random_bytes_give_errors_not_crashes(data):
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        (root / "Pipefile").write_bytes(data)
        check_load_and_plan(root)
    STATS["random byte strings"] += 1


# --------------------------------------------------------------------------- deep nesting and huge lines

MEGABYTE = 1 << 20
EXTREMES = {
    "nested indentation": "stage a:\n" + "".join(" " * depth + "in: x\n" for depth in range(1, 3000)),
    "nested braces": "X = " + "${" * 20000 + "}" * 20000 + "\n",
    "nested dollar braces in a recipe": "stage a:\n    run: " + "${in" * 5000 + "\n",
    "block recipe ever deeper": "stage a:\n    run:\n" + "".join(" " * (8 + i) + "echo\n" for i in range(3000)),
    "huge doc line": "stage a:\n    doc: " + "d" * MEGABYTE + "\n    run: true\n",
    "huge recipe line": "stage a:\n    run: echo " + "r" * MEGABYTE + "\n",
    "huge variable": "X = " + "v" * MEGABYTE + "\nstage a:\n    run: echo $X $X $X\n",
    "huge comment": "# " + "c" * MEGABYTE + "\nstage a:\n    run: true\n",
    "many inputs": "stage a:\n    in: " + " ".join(f"i{n}" for n in range(100000)) + "\n    run: true\n",
    "huge stage name": "stage " + "n" * MEGABYTE + ":\n    run: true\n",
    "huge path": "stage a:\n    in: " + "p" * MEGABYTE + "\n    run: true\n",
    "many stages": "".join(f"stage s{n}:\n    out: o{n}\n    run: true\n" for n in range(5000)),
    "long dependency chain": "".join(f"stage s{n}:\n    in: o{n - 1}\n    out: o{n}\n    run: true\n"
                                     for n in range(1, 3000)) + "stage s0:\n    in: o2999\n    out: o0\n    run: true\n",
    "many nested blocks": "stage a:\n" + "    run:\n        x\n" * 2000,
    "long line of colons": ":" * MEGABYTE + "\n",
    "only indentation": " " * MEGABYTE + "\n",
    "undefined variable far right": "stage a:\n    run: " + "x" * MEGABYTE + " $nope\n",
}


@pytest.mark.parametrize("name", sorted(EXTREMES))
def test_deep_nesting_and_huge_lines_in_process(name, tmp_path):
    (tmp_path / "Pipefile").write_text(EXTREMES[name])
    started = time.monotonic()
    check_load_and_plan(tmp_path)
    assert time.monotonic() - started < 20


def run_offbuild(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offbuild", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout)


def assert_clean_exit(result: subprocess.CompletedProcess, file: str | None = None) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode in (0, 2), (result.returncode, result.stderr[-3000:])
    if result.returncode == 2:
        first = result.stderr.splitlines()[0]
        assert re.match(r"offbuild: [^\n]+:\d+:\d+: error: \S", first), first[:500]
        if file:
            assert first.startswith(f"offbuild: {file}:"), first[:500]


@pytest.mark.parametrize("name", ["nested indentation", "nested braces", "huge recipe line", "many inputs",
                                  "long dependency chain", "undefined variable far right"])
def test_deep_nesting_and_huge_lines_with_the_real_offbuild(name, tmp_path):
    (tmp_path / "Pipefile").write_text(EXTREMES[name])
    result = run_offbuild(tmp_path, "-n")
    assert_clean_exit(result, "Pipefile")
    STATS["extreme Pipefiles run through offbuild"] += 1


# --------------------------------------------------------------------------- a few through the real command


@settings(max_examples=budget(4, 60))
@given(broken=BREAKAGES)
def test_the_real_offbuild_exits_2_at_the_right_place(broken, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    write_files(root, broken.files)
    result = run_offbuild(root, "-n")
    note(result.stderr)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert result.stderr.startswith(f"offbuild: {broken.file}:{broken.line}:{broken.column}: error: ")
    assert broken.message in result.stderr.splitlines()[0]
    STATS["broken Pipefiles run through offbuild"] += 1


@settings(max_examples=budget(4, 60))
@given(doc=docs(), ops=mutations(), raw=st.one_of(st.none(), st.binary(max_size=200)))
def test_the_real_offbuild_survives_damaged_files(doc, ops, raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    printed = Printer(doc).print()
    write_project(root, doc, printed)
    data = raw if raw is not None else mutate(printed.text("Pipefile", doc.style).decode(), ops).encode(
        "utf-8", "surrogatepass")
    (root / "Pipefile").write_bytes(data)
    try:
        pipeline = load_pipefile(str(root / "Pipefile"), "Pipefile", {})
        assume(not escapes_project(pipeline))
    except OffbuildError:
        pass
    result = run_offbuild(root, "-n")
    note(result.stderr)
    assert_clean_exit(result)
    STATS["damaged Pipefiles run through offbuild"] += 1


# --------------------------------------------------------------------------- the JSON form


def flatten(statements: list) -> list:
    """Statements with includes inlined (the JSON form has no includes)."""
    flat = []
    for statement in statements:
        flat.extend(flatten(statement.statements) if isinstance(statement, Include) else [statement])
    return flat


def to_json(doc: Doc) -> dict | None:
    """The JSON form of a Doc, or None when it has none (a variable defined twice: JSON keys are unique,
    and every variable is defined before any stage)."""
    printer = Printer(doc)
    statements = flatten(doc.statements)
    names = [statement.name for statement in statements if isinstance(statement, VarDef)]
    if len(names) != len(set(names)):
        return None
    document: dict = {"vars": {}, "pools": {}, "stages": []}
    for statement in statements:
        if isinstance(statement, VarDef):
            document["vars"][statement.name] = render(statement.value)[0]
        elif isinstance(statement, PoolDef):
            document["pools"][statement.name] = statement.size if printer.coin() else str(statement.size)
        elif isinstance(statement, Default):
            document["default"] = [render(word)[0] for word in statement.words]
        elif isinstance(statement, StageDef):
            entry = {"name": statement.name}
            for item in statement.fields:
                entry[item.name] = json_value(item, printer)
            document["stages"].append(entry)
    return document


def json_value(item: Field, printer: Printer):
    value = item.value
    if isinstance(value, Block):
        return [extra + (render(content)[0] if isinstance(content, list) else
                         ("" if content == ("blank",) else content[1])) for extra, content in value.lines]
    if item.name in ("in", "out", "after", "env"):
        words = [render(word)[0] for word in value]
        # A list item is one word even if a variable in it expands to several: keep those as text.
        plain = all(token[0] == "lit" for word in value for token in word)
        return words if plain and printer.coin() else " ".join(words)
    if item.name == "retry-on":
        return [int(code) for code in value] if printer.coin() else " ".join(value)
    if isinstance(value, list):
        return render(value)[0]
    if item.name in ("checkpoint", "network", "always") and value.lower() in ("true", "false") and printer.coin():
        return value.lower() == "true"
    if item.name == "retries" and printer.coin():
        return int(value)
    return value


@settings(max_examples=budget(100, 2000))
@given(doc=docs())
def test_the_json_form_loads_to_the_same_model(doc):
    document = to_json(doc)
    assume(document is not None)
    with tempfile.TemporaryDirectory() as temp:
        path = Path(temp) / "pipeline.json"
        text = json.dumps(document, indent=2 if doc.style["seed"] % 2 else None, ensure_ascii=doc.style["seed"] % 3 == 0)
        path.write_text(text, encoding="utf-8")
        note(text)
        pipeline = load_json(str(path), "pipeline.json", dict(doc.overrides))
    assert summary(pipeline) == expected(doc)
    STATS["JSON pipelines"] += 1


JSON_NASTY = '{}[]:,"\\ 0-1e9.5truefalsenull\n\t$%#é\x00'


@settings(max_examples=budget(150, 3000))
@given(doc=docs(), ops=mutations(), chars=st.lists(st.tuples(st.integers(0, 10**6), st.text(JSON_NASTY, min_size=1,
                                                                                         max_size=3)), max_size=3))
def test_damaged_json_gives_errors_not_crashes(doc, ops, chars):
    document = to_json(doc)
    assume(document is not None)
    text = json.dumps(document, indent=2)
    for position, insert in chars:
        position %= len(text) + 1
        text = text[:position] + insert + text[position:]
    text = mutate(text, [op for op in ops if op[0] in ("delete", "dup_line", "drop_line", "swap_lines", "truncate")])
    note(text)
    with tempfile.TemporaryDirectory() as temp:
        path = Path(temp) / "pipeline.json"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            load_json(str(path), "pipeline.json", {})
        except OffbuildError as error:
            assert error.location is not None and error.location.line >= 1, error.render()
            assert re.match(r"pipeline\.json:\d+:\d+: error: \S", error.render()), error.render()
    STATS["damaged JSON pipelines"] += 1
