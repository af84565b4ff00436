"""Upper-case a text file line by line.

Written to be resumable: with a checkpoint (OFFBUILD_CHECKPOINT, set by offbuild for
`checkpoint: true` stages) it records how far it got after every line, and a rerun
continues from there instead of starting over.
"""
import os
import sys
import time

# This folder holds copy.py, which would shadow the standard library's `copy` module.
sys.path = [entry for entry in sys.path if os.path.abspath(entry or ".") != os.path.dirname(os.path.abspath(__file__))]

source, destination = sys.argv[1], sys.argv[2]
delay = float(os.environ.get("UPPER_DELAY", "0"))  # slows the demo down to watch it resume

try:
    from offbuild.checkpoint import Checkpoint
except ImportError:  # the recipe also runs without offbuild installed
    Checkpoint = None

state = Checkpoint.load(default={"lines": 0, "offset": 0}) if Checkpoint else None
done_lines = state.value["lines"] if state else 0
if done_lines:
    print(f"resuming at line {done_lines + 1}")

with open(source, encoding="utf-8") as reader, open(destination, "a+b" if done_lines else "wb") as writer:
    if done_lines:
        writer.truncate(state.value["offset"])  # drop whatever was written after the last save
        writer.seek(state.value["offset"])
    for number, line in enumerate(reader, start=1):
        if number <= done_lines:
            continue
        writer.write(line.upper().encode("utf-8"))
        if state:
            writer.flush()
            os.fsync(writer.fileno())
            state.save({"lines": number, "offset": writer.tell()})
        if delay:
            time.sleep(delay)
print(f"upper-cased {source} -> {destination}")
