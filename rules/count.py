"""Count the lines and words of a text file."""
import sys

source, destination = sys.argv[1], sys.argv[2]
with open(source, encoding="utf-8") as reader:
    text = reader.read()
with open(destination, "w", encoding="utf-8") as writer:
    writer.write(f"{source}\t{len(text.splitlines())} lines\t{len(text.split())} words\n")
