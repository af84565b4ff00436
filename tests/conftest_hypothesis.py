"""Hypothesis profiles for the property and fuzz tests (issue 6): `default` and `thorough`.

`default` keeps the whole property/fuzz run near a minute on two cores; `thorough` is for long
runs: `python -m pytest --hypothesis-profile=thorough tests/test_properties.py tests/test_fuzz_parser.py`.
Hypothesis loads the chosen profile before test modules are imported, so the repository's
top-level `conftest.py` imports this module early; the test modules import it too.
"""
from __future__ import annotations

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,  # builds run real processes; their time says nothing about correctness
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("default", max_examples=100, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)


def budget(default: int, thorough: int) -> int:
    """Examples for a test whose examples are expensive (each runs the real offbuild)."""
    return thorough if settings.get_current_profile_name() == "thorough" else default


def report(config, line: str) -> None:
    """Print a line past pytest's output capture (how many examples a long run checked)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)
