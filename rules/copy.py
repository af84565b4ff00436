"""Copy one file to another, byte for byte (the demo's first stage)."""
import shutil
import sys

if __name__ == "__main__":  # this file's name shadows the stdlib `copy` for scripts beside it
    source, destination = sys.argv[1], sys.argv[2]
    shutil.copyfile(source, destination)
