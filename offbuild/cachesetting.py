"""Which shared cache a build uses. Kept apart from cache.py so the command line can resolve the
setting (before any chdir) without loading the cache's machinery on every no-op."""
from __future__ import annotations

import os

ENV_VARIABLE = "OFFBUILD_CACHE"
PIPEFILE_VARIABLE = "cache"


def cache_location(flag: str | None, environ, pipefile_value: str | None, invocation_dir: str,
                   project_root: str) -> str | None:
    """The cache to use: `--cache` > $OFFBUILD_CACHE > the Pipefile's `cache = …` (None: no cache).
    Relative paths count from where the user stands, or from the Pipefile's folder for its own."""
    for value, base in ((flag, invocation_dir), (environ.get(ENV_VARIABLE), invocation_dir),
                        (pipefile_value, project_root)):
        if value is not None and value.strip():
            value = value.strip()
            return value if "://" in value else os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    return None
