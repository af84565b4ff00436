"""Error types users can cause, and their `file:line:col: error: ...` rendering."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import Location


class OffbuildError(Exception):
    """An error the user can fix; the CLI prints it and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, message: str, location: Location | None = None, notes: tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        self.location = location
        self.notes = notes

    def render(self) -> str:
        """The full message: `file:L:C: error: msg`, the source line and a caret, then notes."""
        head = f"{self.location}: error: {self.message}" if self.location else f"error: {self.message}"
        lines = [head]
        snippet = source_snippet(self.location) if self.location else None
        if snippet:
            lines.append(snippet)
        lines.extend(self.notes)
        return "\n".join(lines)


class LoadError(OffbuildError):
    """The Pipefile (or its JSON form) cannot be loaded: syntax, names, graph shape."""


class UsageError(OffbuildError):
    """The command line asks for something impossible (unknown target, bad flag value)."""


def source_snippet(location: Location) -> str | None:
    """The offending source line followed by a caret under the column, or None if unreadable."""
    try:
        with open(location.path or location.file, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    # Split as the loaders do: str.splitlines() would also break at form feeds and U+2028.
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
    if not 1 <= location.line <= len(lines):
        return None
    line = lines[location.line - 1].replace("\t", " ")
    return f"{line}\n{' ' * (max(location.column, 1) - 1)}^"


def did_you_mean(word: str, choices) -> str:
    """` (did you mean 'x'?)` for the closest choice, or an empty string."""
    import difflib  # only for a message: a no-op build never loads it

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
