"""offbuild: a content-hashed, offline, crash-proof successor to make."""

__version__ = "0.1.0"
STATE_DIR = ".offbuild"  # beside the Pipefile: the store, logs, locks, checkpoints, run records, snapshot
