"""Pipefile text → `Pipeline`, with a source location on everything a user can get wrong."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .errors import LoadError, Location, did_you_mean
from .fields import StageBuilder, Text, check_variable_name, expand_string, parse_int
from .model import PathSpec, Pipeline, Stage

_TOKEN_NAMES = {
    "_NL": "end of line", "_INDENT": "indented block", "_DEDENT": "end of block", "$END": "end of file",
    "NAME": "a name", "FIELD": "a field name", "STAGE_NAME": "a stage name", "VALUE": "a value",
    "RECIPE": "a recipe", "COLON": "':'", "EQUAL": "'='", "RUN": "'run'", "STAGE": "'stage'",
    "INCLUDE": "'include'", "POOL": "'pool'",
}
TOP_LEVEL_FIELDS = ("default",)


class IndentationLexer:
    """Turns the whitespace after each newline into _INDENT/_DEDENT tokens.

    Inside a recipe block (`run:` then deeper lines) indentation is the shell script's own:
    deeper lines emit nothing, so the script may indent however it likes.
    """

    always_accept = ("_NL",)

    def process(self, stream):
        levels = [0]
        recipe_level = None
        previous = (None, None)
        for token in stream:
            yield token
            if token.type != "_NL":
                previous = (previous[1], token.type)
                continue
            opens_recipe = previous == ("RUN", "COLON")
            previous = (None, None)
            tail = token.value.rsplit("\n", 1)[1]
            width = len(tail.expandtabs(8))
            if recipe_level is not None:
                if width >= recipe_level:
                    continue
                recipe_level = None
            line, column = token.end_line, len(tail) + 1
            while width < levels[-1]:
                levels.pop()
                yield Token("_DEDENT", "", token.end_pos, line, column, line, column, token.end_pos)
            if width > levels[-1]:
                levels.append(width)
                recipe_level = width if opens_recipe else None
                yield Token("_INDENT", tail, token.end_pos, line, column, line, column, token.end_pos)
        while len(levels) > 1:
            levels.pop()
            yield Token("_DEDENT", "")


@functools.cache
def _lark() -> Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", postlex=IndentationLexer(),
                propagate_positions=True, maybe_placeholders=False)


def parse_tree(text: str, display_name: str) -> Tree:
    """The lark tree of one file; syntax errors become a located `LoadError`."""
    text = text.replace("\r\n", "\n")
    if not text.endswith("\n"):
        text += "\n"
    try:
        return _lark().parse(text)
    except UnexpectedInput as error:
        raise _syntax_error(error, display_name) from None


def _syntax_error(error: UnexpectedInput, display_name: str) -> LoadError:
    line, column = max(getattr(error, "line", 1) or 1, 1), max(getattr(error, "column", 1) or 1, 1)
    if isinstance(error, UnexpectedCharacters):
        message = f"unexpected character {error.char!r}"
    elif isinstance(error, (UnexpectedToken, UnexpectedEOF)):
        token = getattr(error, "token", None)
        if token is not None and token.type in ("_INDENT", "_DEDENT", "$END"):
            found = _TOKEN_NAMES[token.type]
            line, column = (token.line or line), (token.column or column)
        elif token is not None and token.type == "_NL":
            found = "end of line"
        elif token is not None:
            found = repr(str(token).strip())
        else:
            found = "end of file"
        expected = sorted({_TOKEN_NAMES.get(name, name) for name in error.expected})
        message = f"unexpected {found}; expected {' or '.join(expected)}" if expected else f"unexpected {found}"
        if token is not None and token.type == "_INDENT" and "a name" in expected:
            message = "unexpected indentation (fields belong inside a 'stage NAME:' block)"
    else:
        message = str(error).splitlines()[0]
    return LoadError(f"syntax error: {message}", Location(display_name, line, column))


class _FileLoader:
    """Walks the statements of a Pipefile and its includes, in order, into a `Pipeline`."""

    def __init__(self, overrides: dict[str, str]):
        self.overrides = overrides
        self.variables: dict[str, str] = dict(overrides)
        self.pools: dict[str, int] = {}
        self.stages: list[Stage] = []
        self.stage_locations: dict[str, Location] = {}
        self.default: tuple[PathSpec, ...] = ()
        self.default_location: Location | None = None
        self.sources: list[str] = []

    def load_file(self, path: str, display_name: str, including: tuple[str, ...] = (), at: Location | None = None):
        real = os.path.realpath(path)
        if real in including:
            raise LoadError(f"'{display_name}' includes itself", at)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise LoadError(f"'{display_name}' is not valid UTF-8 text ({error.reason} at byte {error.start})",
                            at) from None
        except OSError as error:
            raise LoadError(f"cannot read '{display_name}': {error.strerror}", at) from None
        self.sources.append(path)
        lines = text.replace("\r\n", "\n").split("\n")
        tree = parse_tree(text, display_name)
        for statement in tree.children:
            handler = getattr(self, "_" + statement.data)
            handler(statement, display_name, lines, including + (real,), path)

    def _text(self, token: Token | None, display_name: str, after: Token) -> Text:
        if token is None:
            return Text("", Location(display_name, after.end_line, after.end_column))
        stripped = token.value.lstrip()
        column = token.column + len(token.value) - len(stripped)
        return Text(stripped.rstrip(), Location(display_name, token.line, column))

    def _var_def(self, node: Tree, display_name: str, *_):
        name, value = node.children[0], (node.children[1] if len(node.children) > 1 else None)
        location = Location(display_name, name.line, name.column)
        check_variable_name(str(name), location)
        if str(name) not in self.overrides:
            self.variables[str(name)] = expand_string(self._text(value, display_name, name), self.variables)

    def _pool_def(self, node: Tree, display_name: str, *_):
        name, value = node.children[0], (node.children[1] if len(node.children) > 1 else None)
        text = self._text(value, display_name, name)
        self.pools[str(name)] = parse_int(expand_string(text, self.variables), text.location, f"pool {name}", 1)

    def _include(self, node: Tree, display_name: str, lines, including, path: str):
        keyword_location = Location(display_name, node.meta.line, node.meta.column)
        value = node.children[0] if node.children else None
        if value is None:
            raise LoadError("'include' needs a file name", keyword_location)
        text = self._text(value, display_name, value)
        relative = expand_string(text, self.variables)
        target = os.path.join(os.path.dirname(path), relative)
        shown = os.path.normpath(os.path.join(os.path.dirname(display_name), relative))
        if not os.path.isfile(target):
            raise LoadError(f"included file '{relative}' not found", text.location)
        self.load_file(target, shown, including, text.location)

    def _top_field(self, node: Tree, display_name: str, *_):
        name, value = node.children[0], (node.children[1] if len(node.children) > 1 else None)
        location = Location(display_name, name.line, name.column)
        if str(name) not in TOP_LEVEL_FIELDS:
            hint = did_you_mean(str(name), TOP_LEVEL_FIELDS + ("stage", "include", "pool"))
            raise LoadError(f"unknown statement '{name}:'{hint}", location)
        if self.default_location is not None:
            raise LoadError(f"'default:' given twice (first at {self.default_location})", location)
        self.default_location = location
        text = self._text(value, display_name, name)
        self.default = tuple(PathSpec(expand_string(word, self.variables), word.location) for word in text.words())

    def _stage(self, node: Tree, display_name: str, lines: list[str], *_):
        name_token = node.children[0]
        name = str(name_token)
        location = Location(display_name, name_token.line, name_token.column)
        if name in self.stage_locations:
            raise LoadError(f"stage '{name}' is already defined at {self.stage_locations[name]}", location)
        self.stage_locations[name] = location
        builder = StageBuilder(name, location, self.variables, self.pools)
        for item in node.children[1:]:
            field_token = item.children[0]
            if item.data == "run_field":
                text = self._recipe(item, display_name, lines)
            else:
                value = item.children[1] if len(item.children) > 1 else None
                text = self._text(value, display_name, item.children[0])
            field_location = Location(display_name, field_token.line, field_token.column)
            if not text.value and str(field_token) in ("run", "in", "out"):
                text = Text("", field_location)
            builder.add(str(field_token), [text] if text.value or str(field_token) != "run" else [])
        self.stages.append(builder.build())

    def _recipe(self, item: Tree, display_name: str, lines: list[str]) -> Text:
        """A one-line recipe, or the block's source lines with their common indentation removed."""
        one_line = item.children[1] if len(item.children) > 1 and isinstance(item.children[1], Token) else None
        block = item.children[-1] if isinstance(item.children[-1], Tree) else None
        if block is None:
            return self._text(one_line, display_name, item.children[0])
        if one_line is not None and one_line.value.strip():
            raise LoadError("'run:' has both a one-line recipe and an indented block",
                            Location(display_name, block.meta.line, block.meta.column))
        tokens = [token for token in block.children if isinstance(token, Token)]
        first, last = tokens[0].line, tokens[-1].line
        indent = min(token.column for token in tokens) - 1
        body = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[first - 1:last]]
        starts = tuple(Location(display_name, number, indent + 1) for number in range(first + 1, last + 1))
        return Text("\n".join(line.rstrip() for line in body), Location(display_name, first, indent + 1), starts)


def load_pipefile(path: str, display_name: str, overrides: dict[str, str]) -> Pipeline:
    """Parse a Pipefile (and what it includes) into a validated `Pipeline`."""
    loader = _FileLoader(overrides)
    loader.load_file(path, display_name)
    return Pipeline(stages=tuple(loader.stages), default=loader.default, pools=loader.pools,
                    variables=loader.variables, sources=tuple(loader.sources))
