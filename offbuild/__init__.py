"""offbuild: a content-hashed, offline, crash-proof successor to make."""

__version__ = "0.1.0"
