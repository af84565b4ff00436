"""The fast Pipefile lexer against lark's contextual lexer, the reference (offbuild/lexer.py).

Whenever the contextual lexer's parse succeeds, the fast lexer must either give up
(`Unsupported`) or give the same token types, and the same tree down to every position of every
token in it; whenever that parse fails, the fast parse must fail too, so the error is reported
by the contextual lexer. Checked on every Pipefile text in the tests, generated benchmark
pipelines, the fuzzer's valid and damaged Pipefiles, and random lines made of the language's bits.
"""
from __future__ import annotations

import ast
import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedInput

from offbuild import lexer, parser
from test_fuzz_parser import Printer, docs, mutate, mutations

ROOT = Path(__file__).resolve().parent.parent


class _Recorder(parser.IndentationLexer):
    """The contextual lexer's tokens as the parser receives them."""

    def __init__(self):
        self.seen: list[Token] = []

    def process(self, stream):
        for token in super().process(stream):
            self.seen.append(token)
            yield token


def _normalise(text: str) -> str:
    """What `parser.parse_tree` hands to lark."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    return text if text.endswith("\n") else text + "\n"


@functools.cache
def _recording_lark() -> tuple[Lark, _Recorder]:
    recorder = _Recorder()
    return Lark(parser._grammar(), parser="lalr", lexer="contextual", postlex=recorder,
                maybe_placeholders=False), recorder


def _reference(text: str) -> tuple[Tree | None, list[Token]]:
    """The contextual lexer's tree (None on a syntax error) and token stream."""
    reference, recorder = _recording_lark()
    recorder.seen = []
    try:
        return reference.parse(text), recorder.seen
    except UnexpectedInput:
        return None, recorder.seen


def _positions(node) -> list:
    """Every token of a tree with everything the loader may read of it."""
    if isinstance(node, Token):
        return [(node.type, node.value, node.start_pos, node.line, node.column, node.end_line, node.end_column,
                 node.end_pos)]
    return [node.data, [_positions(child) for child in node.children]]


def check(text: str) -> str:
    """Compare both lexers on one text; returns what happened, for the statistics."""
    raw, text = text, _normalise(text)
    tree, stream = _reference(text)
    try:
        fast = lexer.tokens(text)
        fast_tree = parser._lark().parse(text)
    except lexer.Unsupported:
        return "unsupported"
    except UnexpectedInput:
        assert tree is None, f"fast parse failed where the contextual one succeeded:\n{text}"
        return "error"
    assert tree is not None, f"fast parse succeeded where the contextual one failed:\n{text}"
    assert [token.type for token in fast] == [token.type for token in stream], text
    assert _positions(fast_tree) == _positions(tree), text
    assert parser.parse_tree(raw, "Pipefile") == tree
    return "same"


def _test_strings() -> list[str]:
    """String constants in the test modules that look like Pipefiles, as written and dedented."""
    found = set()
    for module in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" in node.value:
                found.update({node.value, textwrap.dedent(node.value)})
    return sorted(found)


def test_every_pipefile_in_the_tests():
    outcomes = [check(text) for text in _test_strings()]
    assert outcomes.count("same") > 100  # the fast lexer takes the common shapes


def test_the_project_pipefile_and_benchmark_shapes(tmp_path):
    assert check((ROOT / "Pipefile").read_text()) == "same"
    for shape in ("wide", "chain", "diamond"):
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), shape, "50", str(tmp_path / shape)],
                       check=True, capture_output=True)
        assert check((tmp_path / shape / "Pipefile").read_text()) == "same"


@pytest.mark.parametrize("text", [
    "pool stage = 1\n", "pool include = 2\n", "include = x\n", "include-x\n", "include#x\n", "includes = 1\n",
    "stage = 1\n", "stage: x\n", "stage-x:\n    run: a\n", "stage.x:\n    run: a\n", "stagex: 1\n", "pool = 1\n",
    "stage a:\n    run:# c\n", "stage a:\n    run: # c\n", "stage a:\n    run :x\n", "stage a:\n    run-x: 1\n",
    "stage a:\n    runs: 1\n", "stage a:\n    run.x: 1\n", "stage a:\n    in:#x\n", "stage a:\n    in: a#x\n",
    "stage a:\n    run:\n        a\n      b\n    out: x\n", "stage a:\n    run:\n\tx\n\t  y\n", "  x = 1\n",
    "# c\n  x = 1\n", "  # c\nx = 1\n", "\n\n# a\n  # b\nx=1\n", "x = 1 \t# c\n", "x =\n", "x:\n",
    "stage a:\n    in: x\n        y\n", "stage a:\n  in: x\n    out: y\n", "stage a:\nin: x\n", "stage a:\n",
    "stage a:\n    run:\n        x\n  \n\t\n    # c\n        y\nx = 1\n", "stage a:\n\tin: x\n        out: y\n",
])
def test_corner_cases(text):
    check(text)


@settings(max_examples=200)
@given(doc=docs())
def test_generated_pipefiles(doc):
    printed = Printer(doc).print()
    for name in printed.files:
        text = printed.text(name, doc.style).decode()
        note(text)
        assert check(text) == "same"


@settings(max_examples=200)
@given(doc=docs(), ops=mutations())
def test_damaged_pipefiles(doc, ops):
    text = mutate(Printer(doc).print().text("Pipefile", doc.style).decode(), ops)
    note(text)
    check(text)


HEADS = ["stage", "stage a", "stage  a.b-1", "stage -x", "stagex", "pool", "pool p", "pool stage", "include",
         "includes", "include-x", "run", "runs", "run-x", "in", "out", "x", "a-b", "_1", "é", ""]
INDENTS = ["", " ", "    ", "        ", "\t", "  \t", "\t "]


def _line(indent: str, head: str, gap: str, sign: str, value: str) -> str:
    return indent + head + gap + sign + value


def _lines(indents: list[str]):
    return st.builds(_line, st.sampled_from(indents), st.sampled_from(HEADS), st.sampled_from(["", "", " ", "\t"]),
                     st.sampled_from([":", ":", "=", "", "# c", " #", ":#"]),
                     st.text(alphabet="ab $#:=\t\r\x0c", max_size=5))


# Mostly well-formed stages around the odd lines, so that many files get through both parsers.
STAGES = st.builds(lambda name, items: f"stage {name}:\n" + "\n".join(items),
                   st.sampled_from(["a", "b.c", "d-1"]),
                   st.lists(st.one_of(st.sampled_from(["    in: x", "    run:", "    run: y", "        z", "    # c", ""]),
                                      _lines(["    ", "    ", "        ", "\t"])), min_size=1, max_size=5))


@settings(max_examples=500)
@given(parts=st.lists(st.one_of(_lines(INDENTS[:2]), _lines(INDENTS), STAGES), max_size=5))
def test_random_lines(parts):
    text = "\n".join(parts)
    note(repr(text))
    check(text)
