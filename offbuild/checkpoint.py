"""A small helper for Python recipes of `checkpoint: true` stages.

    state = Checkpoint.load(default={"done": 0})
    for i in range(state.value["done"], n):
        ...
        state.save({"done": i + 1})

The value is JSON, saved atomically (temp file + rename) so a kill mid-save keeps the last one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

ENV = "OFFBUILD_CHECKPOINT"


@dataclass(slots=True)
class Checkpoint:
    """The recipe's checkpoint file and its current value."""

    path: str | None
    value: Any

    @classmethod
    def load(cls, default: Any = None, path: str | None = None) -> "Checkpoint":
        """The saved value, or `default` when there is none (first attempt, or no offbuild)."""
        path = path or os.environ.get(ENV)
        if path:
            try:
                with open(path, encoding="utf-8") as handle:
                    return cls(path, json.load(handle))
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        return cls(path, default)

    def save(self, value: Any) -> None:
        """Replace the saved value atomically; a no-op outside offbuild."""
        self.value = value
        if not self.path:
            return
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(value, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
