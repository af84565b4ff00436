"""Join the per-chapter counts and the upper-cased sample into one report."""
import sys

destination, *sources = sys.argv[1:]
with open(destination, "w", encoding="utf-8") as writer:
    writer.write("# report\n")
    for source in sources:
        with open(source, encoding="utf-8") as reader:
            if source.endswith(".count"):
                writer.write(reader.read())
            else:
                first = reader.readline().strip()
                writer.write(f"{source}\tfirst line: {first}\n")
