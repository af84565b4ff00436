"""Registers the Hypothesis profiles early enough for `pytest --hypothesis-profile=NAME` (see tests/conftest_hypothesis.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tests"))
import conftest_hypothesis  # noqa: E402,F401
