"""Copy one file to another, byte for byte (the demo's first stage)."""
import shutil
import sys

source, destination = sys.argv[1], sys.argv[2]
shutil.copyfile(source, destination)
