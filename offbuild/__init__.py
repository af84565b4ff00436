"""offbuild: a content-hashed, offline, crash-proof successor to make."""
import os

__version__ = "0.1.0"
STATE_DIR = ".offbuild"  # beside the Pipefile: the store, logs, locks, checkpoints, run records, snapshot


def state_dir_for(pipefile: str) -> str:
    """Where a pipeline file keeps its state, relative to its folder: `.offbuild/` for `Pipefile`, and a
    folder of its own inside it for any other file (`-f ci.pipe`), so two pipelines side by side never
    take each other's jobs for removed ones (and delete their outputs) nor share job records."""
    name = os.path.basename(pipefile)
    return STATE_DIR if name == "Pipefile" else os.path.join(STATE_DIR, "pipefiles", name)
