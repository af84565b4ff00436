"""offbuild/fields.py's shortcuts (a value without `$`, words on one line) against the plain
way they replace, kept here as the reference: same values, same locations."""
from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from offbuild.fields import StageBuilder, Text, expand
from offbuild.model import Location

VARIABLES = {"a": "x y", "b": "", "c": " $$ "}


def reference_words(text: Text) -> list[Text]:
    return [Text(m.group(), text.locate(m.start())) for m in re.finditer(r"\S+", text.value)]


def reference_split(text: Text, variables: dict[str, str]) -> list[tuple[str, Location]]:
    """StageBuilder._words for one text: each word expanded, then split again."""
    return [(piece, word.location) for word in reference_words(text)
            for piece in "".join(expand(word, variables)).split()]


VALUES = st.text(alphabet="ab $\t\u00a0\u2003\x1c/.é{}\n", max_size=12)
LOCATIONS = st.builds(Location, st.just("Pipefile"), st.integers(0, 3), st.integers(1, 9), st.just("/p/Pipefile"))


@given(value=VALUES, location=LOCATIONS)
def test_words_are_located_as_before(value, location):
    text = Text(value, location)
    expected = reference_words(text)
    assert text.words() == expected
    assert text.located_words() == [(word.value, word.location) for word in expected]


@given(value=VALUES.filter(lambda value: "\n" not in value), location=LOCATIONS)
def test_split_words_are_located_as_before(value, location):
    builder = StageBuilder("s", location, VARIABLES, {})
    try:
        expected = reference_split(Text(value, location), VARIABLES)
    except Exception as error:  # a bad reference: the same error either way
        try:
            list(builder._words([Text(value, location)], True))
        except type(error) as same:
            assert str(same) == str(error)
            return
        raise AssertionError("no error") from None
    assert list(builder._words([Text(value, location)], True)) == expected


@given(value=st.text(alphabet="ab \n\t#%*/", max_size=12), location=LOCATIONS)
def test_values_without_dollars_expand_to_themselves(value, location):
    assert expand(Text(value, location), VARIABLES, True) == ([value] if value else [])
