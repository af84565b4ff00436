"""A line-at-a-time lexer for lark: the token stream of the contextual lexer plus
`parser.IndentationLexer`, several times faster on big Pipefiles.

It knows only the line shapes a well-formed Pipefile uses. On anything else it raises
`Unsupported` and the caller parses again with lark's contextual lexer, which stays the
reference: it alone produces syntax errors, so messages cannot depend on which lexer ran.
tests/test_lexer.py checks that both lexers give the same tokens.
"""
from __future__ import annotations

import re

from lark import Token
from lark.lexer import Lexer

# _NL as in grammar.lark: a newline with the blank and comment-only lines after it.
_NEWLINES = re.compile(r"(?:\n[\t ]*(?:#[^\n]*)?)+")
# Whitespace and a comment before the first newline: lark ignores them.
_LEADING = re.compile(r"[\t ]*(?:#[^\n]*)?")
# The line shapes, each matched from the line's first character to its end. Where lark's
# contextual lexer would try VALUE (/[^\n#]+/) it wins over whitespace, so a value keeps its
# leading blanks; _FileLoader strips them.
_TOP = re.compile(
    r"stage[\t ]+(?P<stage>[A-Za-z0-9_.-]+)[\t ]*(?P<stage_colon>:)[\t ]*(?:#[^\n]*)?\Z"
    r"|include(?![A-Za-z0-9_])(?P<include>[^\n#]+)?(?:#[^\n]*)?\Z"
    r"|pool[\t ]+(?P<pool>[A-Za-z_][A-Za-z0-9_]*)[\t ]*(?P<pool_eq>=)(?P<pool_value>[^\n#]+)?(?:#[^\n]*)?\Z"
    r"|(?!(?:stage|pool|include)(?![A-Za-z0-9_]))"
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)[\t ]*(?P<sign>[=:])(?P<value>[^\n#]+)?(?:#[^\n]*)?\Z"
)
# Inside a stage. RUN outranks FIELD (priority 2) when `run` is a whole word; after `run:` a
# RECIPE takes the rest of the line, comment included, unless '#' follows the colon at once.
_ITEM = re.compile(
    r"(?P<run>run)(?![A-Za-z0-9_-])[\t ]*(?P<run_colon>:)(?:#[^\n]*|(?P<recipe>[^\n]+))?\Z"
    r"|(?P<field>[A-Za-z_][A-Za-z0-9_-]*)[\t ]*(?P<colon>:)(?P<value>[^\n#]+)?(?:#[^\n]*)?\Z"
)
_TOP_TYPES = {"=": "EQUAL", ":": "COLON"}
_new_str = str.__new__


class Unsupported(Exception):
    """The text has a shape this lexer does not handle; lex it with lark's contextual lexer."""


class PipefileLexer(Lexer):
    """The tokens of a whole Pipefile (text normalised by `parser.parse_tree`), indentation included."""

    __future_interface__ = 2  # lex(lexer_state, parser_state), given the text itself

    def __init__(self, lexer_conf):
        pass

    def lex(self, lexer_state, parser_state):
        text = lexer_state.text
        return iter(tokens(text.text if hasattr(text, "text") else text))


def tokens(text: str) -> list[Token]:
    """The tokens of `text`, which ends with a newline.

    Tokens that the tree leaves out (punctuation, keywords, newlines, indentation) are one shared
    token per type, without positions: the parser only reads their type, and a syntax error is
    reported from the contextual lexer's run, never from these. Making 18 tokens per stage
    instead of 7 was a third of the time.
    """
    result: list[Token] = []
    append = result.append
    shared = {name: Token(name, "") for name in ("_NL", "_INDENT", "_DEDENT", "COLON", "EQUAL", "STAGE", "POOL")}
    newline, indent, dedent, colon = shared["_NL"], shared["_INDENT"], shared["_DEDENT"], shared["COLON"]
    end = len(text)
    pos = _LEADING.match(text).end()
    if pos and text[pos] != "\n":
        raise Unsupported("an indented first line")  # lark's error: unexpected indentation
    line, line_start = 1, 0
    levels = [0]
    recipe_level = None  # the block's indentation while inside a `run:` block, as IndentationLexer
    while True:
        opens_recipe = False
        if text[pos] != "\n":  # a line's content, from `pos` to the newline
            eol = text.index("\n", pos)
            if recipe_level is not None:
                append(_token("RECIPE", text, (pos, eol), line, line_start))
            elif len(levels) == 2:
                match = _ITEM.match(text, pos, eol)
                if match is None:
                    raise Unsupported(f"line {line}")
                field, value = match.span("field"), match.span("value")
                if field[0] < 0:  # `run:`
                    opens_recipe = True
                    field, value = match.span("run"), match.span("recipe")
                    append(_token("RUN", text, field, line, line_start))
                else:
                    append(_token("FIELD", text, field, line, line_start))
                append(colon)
                if value[0] >= 0:
                    append(_token("RECIPE" if opens_recipe else "VALUE", text, value, line, line_start))
            elif len(levels) == 1:
                _top_level(text, pos, eol, line, line_start, append, shared)
            else:
                raise Unsupported(f"line {line}")  # nested deeper than a stage: a syntax error
            pos = eol
        # The newline token, then what the new line's indentation means (IndentationLexer.process).
        nl_end = _NEWLINES.match(text, pos).end()
        append(newline)
        line += text.count("\n", pos, nl_end)
        line_start = text.rindex("\n", pos, nl_end) + 1
        pos = nl_end
        width = nl_end - line_start
        if text.find("\t", line_start, nl_end) >= 0:
            width = len(text[line_start:nl_end].expandtabs(8))
        if recipe_level is not None and width >= recipe_level:
            continue  # a deeper line of the block: the script's own indentation
        recipe_level = None
        while width < levels[-1]:
            levels.pop()
            append(dedent)
        if width > levels[-1]:
            levels.append(width)
            recipe_level = width if opens_recipe else None
            append(indent)
        if pos == end:
            return result


def _token(type_: str, text: str, span: tuple[int, int], line: int, line_start: int) -> Token:
    """The token for `text[start:stop]` on one line.

    Made as lark's Token.__new__ makes it, less its three calls: a fifth of the lexer's time.
    """
    start, stop = span
    value = text[start:stop]
    token = _new_str(Token, value)
    token.type, token.value, token.start_pos, token.end_pos = type_, value, start, stop
    token.line = token.end_line = line
    token.column, token.end_column = start - line_start + 1, stop - line_start + 1
    return token


def _top_level(text: str, pos: int, eol: int, line: int, line_start: int, append, shared: dict) -> None:
    """Append the tokens of a top-level line."""
    match = _TOP.match(text, pos, eol)
    if match is None:
        raise Unsupported(f"line {line}")
    if match.start("stage_colon") >= 0:
        append(shared["STAGE"])
        append(_token("STAGE_NAME", text, match.span("stage"), line, line_start))
        append(shared["COLON"])
    elif match.start("sign") >= 0:
        append(_token("NAME", text, match.span("name"), line, line_start))
        append(shared[_TOP_TYPES[match.group("sign")]])
        if match.start("value") >= 0:
            append(_token("VALUE", text, match.span("value"), line, line_start))
    elif match.start("pool_eq") >= 0:
        append(shared["POOL"])
        append(_token("NAME", text, match.span("pool"), line, line_start))
        append(shared["EQUAL"])
        if match.start("pool_value") >= 0:
            append(_token("VALUE", text, match.span("pool_value"), line, line_start))
    else:
        append(_token("INCLUDE", text, (pos, pos + 7), line, line_start))
        if match.start("include") >= 0:
            append(_token("VALUE", text, match.span("include"), line, line_start))
