"""Pipefile text → `Pipeline`, with a source location on everything a user can get wrong."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .errors import LoadError, did_you_mean
from .fields import StageBuilder, Text, source_stat, check_overrides, check_variable_name, expand_string, parse_int
from .lexer import PipefileLexer, Unsupported
from .model import Location, PathSpec, Pipeline, Stage

_TOKEN_NAMES = {
    "_NL": "end of line", "_INDENT": "indented block", "_DEDENT": "end of block", "$END": "end of file",
    "NAME": "a name", "FIELD": "a field name", "STAGE_NAME": "a stage name", "VALUE": "a value",
    "RECIPE": "a recipe", "COLON": "':'", "EQUAL": "'='", "RUN": "'run'", "STAGE": "'stage'",
    "INCLUDE": "'include'", "POOL": "'pool'",
}
MAX_INCLUDE_DEPTH = 50  # deeper is surely a mistake, and recursion has limits
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
        line_types: list[str] = []  # token types since the last newline
        first = True
        for token in stream:
            if first and token.type != "_NL" and token.column > 1:
                # An indented first line has no newline before it to measure; flag it like any other.
                yield Token("_INDENT", "", token.start_pos, 1, token.column, 1, token.column, token.start_pos)
            first = False
            yield token
            if token.type != "_NL":
                line_types.append(token.type)
                continue
            # `run:` (even with text after it) opens a block; _FileLoader._recipe sorts out the text.
            opens_recipe = line_types[:2] == ["RUN", "COLON"]
            line_types = []
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


def _grammar() -> str:
    return (Path(__file__).parent / "grammar.lark").read_text()


@functools.cache
def _lark() -> Lark:
    """The parser as normally used: lark's LALR parser fed by the fast `PipefileLexer`."""
    return Lark(_grammar(), parser="lalr", lexer=PipefileLexer, maybe_placeholders=False)


@functools.cache
def _contextual_lark() -> Lark:
    """The same parser with lark's contextual lexer: the reference, and the source of every syntax error."""
    return Lark(_grammar(), parser="lalr", lexer="contextual", postlex=IndentationLexer(),
                maybe_placeholders=False)


def parse_tree(text: str, origin: Location | str) -> Tree:
    """The lark tree of one file; syntax errors become a `LoadError` located in `origin`'s file."""
    origin = origin if isinstance(origin, Location) else Location(origin, 0, 0)
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text.endswith("\n"):
        text += "\n"
    try:
        return _lark().parse(text)
    except (Unsupported, UnexpectedInput):
        pass  # parse again below, so the error (or the tree) is exactly the contextual lexer's
    try:
        return _contextual_lark().parse(text)
    except UnexpectedInput as error:
        raise _syntax_error(error, origin) from None


def _syntax_error(error: UnexpectedInput, origin: Location) -> LoadError:
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
        parser_state = getattr(error, "interactive_parser", None)
        # The lexer's own "expected" set is that of its state, which may lag the parser's.
        accepted = parser_state.accepts() if parser_state is not None else error.expected
        expected = sorted({_TOKEN_NAMES.get(name, name) for name in accepted})
        message = f"unexpected {found}; expected {' or '.join(expected)}" if expected else f"unexpected {found}"
        if token is not None and token.type == "_INDENT" and "a name" in expected:
            message = "unexpected indentation (fields belong inside a 'stage NAME:' block)"
        elif expected == ["indented block"]:
            message = f"unexpected {found}; expected the stage's fields, indented"
    else:
        message = str(error).splitlines()[0]
    return LoadError(f"syntax error: {message}", origin.at(line, column))


def _decode(raw: bytes, origin: Location, included_at: Location | None) -> str:
    """UTF-8 text, or a load error pointing at the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        line_start = raw.rfind(b"\n", 0, error.start) + 1
        if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
            line_start = 3  # a byte-order mark is not a column
        column = len(raw[line_start:error.start].decode("utf-8", errors="replace")) + 1
        notes = (f"included at {included_at}",) if included_at else ()
        raise LoadError(f"'{origin.file}' is not valid UTF-8 text ({error.reason} 0x{raw[error.start]:02x})",
                        origin.at(line, column), notes) from None


class _FileLoader:
    """Walks the statements of a Pipefile and its includes, in order, into a `Pipeline`.

    Handlers get `origin`, a `Location` naming the file being read (as shown, and its real path).
    """

    def __init__(self, overrides: dict[str, str]):
        check_overrides(overrides)
        self.overrides = overrides
        self.variables: dict[str, str] = dict(overrides)
        self.pools: dict[str, int] = {}
        self.stages: list[Stage] = []
        self.stage_locations: dict[str, Location] = {}
        self.default: tuple[PathSpec, ...] = ()
        self.default_location: Location | None = None
        self.sources: list[str] = []
        self.source_stats: list[tuple] = []

    def load_file(self, path: str, display_name: str, including: tuple[Location, ...] = (),
                  at: Location | None = None):
        """Load one file; `including` is the chain of files that include it, outermost first."""
        if len(including) >= MAX_INCLUDE_DEPTH:
            raise LoadError(f"includes nested more than {MAX_INCLUDE_DEPTH} deep", at)
        real = os.path.realpath(path)
        origin = Location(display_name, 0, 0, real)
        chain = [outer.path for outer in including]
        if real in chain:
            names = [outer.file for outer in including[chain.index(real):]] + [display_name]
            raise LoadError("include cycle: " + " → ".join(names), at)
        try:
            self.source_stats.append(source_stat(path))
            raw = Path(path).read_bytes()
        except OSError as error:
            raise LoadError(f"cannot read '{display_name}': {error.strerror}", at) from None
        text = _decode(raw, origin, at)
        self.sources.append(path)
        lines = text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
        tree = parse_tree(text, origin)
        for statement in tree.children:
            handler = getattr(self, "_" + statement.data)
            handler(statement, origin, lines, including + (origin,), path)

    def _text(self, token: Token | None, origin: Location, after: Token) -> Text:
        if token is None:
            return Text("", origin.at(after.end_line, after.end_column))
        value = token.value
        stripped = value.lstrip()
        column = token.column + len(value) - len(stripped)
        return Text(stripped.rstrip(), Location(origin.file, token.line, column, origin.path))

    def _var_def(self, node: Tree, origin: Location, *_):
        name, value = node.children[0], (node.children[1] if len(node.children) > 1 else None)
        check_variable_name(str(name), origin.at(name.line, name.column))
        if str(name) not in self.overrides:
            self.variables[str(name)] = expand_string(self._text(value, origin, name), self.variables)

    def _pool_def(self, node: Tree, origin: Location, *_):
        name, value = node.children[0], (node.children[1] if len(node.children) > 1 else None)
        text = self._text(value, origin, name)
        self.pools[str(name)] = parse_int(expand_string(text, self.variables), text.location,
                                          f"the size of pool '{name}'", 1)

    def _include(self, node: Tree, origin: Location, lines, including, path: str):
        keyword = node.children[0]
        value = node.children[1] if len(node.children) > 1 else None
        if value is None:
            raise LoadError("'include' needs a file name", origin.at(keyword.line, keyword.column))
        text = self._text(value, origin, value)
        relative = expand_string(text, self.variables)
        target = os.path.join(os.path.dirname(path), relative)
        shown = os.path.normpath(os.path.join(os.path.dirname(origin.file), relative))
        if not os.path.isfile(target):
            raise LoadError(f"included file '{relative}' not found", text.location)
        self.load_file(target, shown, including, text.location)

    def _top_field(self, node: Tree, origin: Location, *_):
        name, value = node.children[0], (node.children[1] if len(node.children) > 1 else None)
        location = origin.at(name.line, name.column)
        if str(name) not in TOP_LEVEL_FIELDS:
            hint = did_you_mean(str(name), TOP_LEVEL_FIELDS + ("stage", "include", "pool"))
            raise LoadError(f"unknown statement '{name}:'{hint}", location)
        if self.default_location is not None:
            raise LoadError(f"'default:' given twice (first at {self.default_location})", location)
        self.default_location = location
        text = self._text(value, origin, name)
        self.default = tuple(PathSpec(expand_string(word, self.variables), word.location) for word in text.words())

    def _stage(self, node: Tree, origin: Location, lines: list[str], *_):
        name_token = node.children[0]
        name = str(name_token)
        location = origin.at(name_token.line, name_token.column)
        if name in self.stage_locations:
            raise LoadError(f"stage '{name}' is already defined at {self.stage_locations[name]}", location)
        self.stage_locations[name] = location
        builder = StageBuilder(name, location, self.variables, self.pools)
        for item in node.children[1:]:
            field_token = item.children[0]
            field_location = Location(origin.file, field_token.line, field_token.column, origin.path)
            if field_token.type == "RUN":  # a run_field; FIELD is never `run`
                text = self._recipe(item, origin, lines)
                builder.add("run", [text] if text.value else [], field_location)
            else:
                text = self._text(item.children[1] if len(item.children) > 1 else None, origin, field_token)
                builder.add(field_token.value, [text], field_location)
        self.stages.append(builder.build())

    def _recipe(self, item: Tree, origin: Location, lines: list[str]) -> Text:
        """A one-line recipe, or the block's source lines with their common indentation removed."""
        one_line = item.children[1] if len(item.children) > 1 and isinstance(item.children[1], Token) else None
        block = item.children[-1] if isinstance(item.children[-1], Tree) else None
        if block is None:
            return self._text(one_line, origin, item.children[0])
        # `run:  # comment` above a block: the comment is offbuild's, as after any other field.
        if one_line is not None and one_line.value.strip() and not one_line.value.lstrip().startswith("#"):
            raise LoadError("'run:' has both a one-line recipe and an indented block",
                            origin.at(block.children[0].line, block.children[0].column))
        tokens = [token for token in block.children if isinstance(token, Token)]
        first, last = tokens[0].line, tokens[-1].line
        indent = min(token.column for token in tokens) - 1
        body = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[first - 1:last]]
        starts = tuple(origin.at(number, indent + 1) for number in range(first + 1, last + 1))
        return Text("\n".join(line.rstrip() for line in body), origin.at(first, indent + 1), starts)


def load_pipefile(path: str, display_name: str, overrides: dict[str, str]) -> Pipeline:
    """Parse a Pipefile (and what it includes) into a validated `Pipeline`."""
    loader = _FileLoader(overrides)
    loader.load_file(path, display_name)
    return Pipeline(stages=tuple(loader.stages), default=loader.default, pools=loader.pools,
                    variables=loader.variables, sources=tuple(loader.sources),
                    source_stats=tuple(loader.source_stats))
