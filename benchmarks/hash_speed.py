"""How fast offbuild hashes a large changed file, next to the usual yardsticks.

    python benchmarks/hash_speed.py                 # a 1 GiB file in a temporary folder, 3 repeats
    python benchmarks/hash_speed.py --size 4096 --repeat 5 --dir /some/disk

Every contender reads the same file, already in the page cache (one `cat` first), so the numbers
compare hashing, not the disk: `cat f > /dev/null` (reading alone), hashlib's sha256, BLAKE3 with
memory mapping and threads (what `b3sum` does), xxh3_128 when the `xxhash` package is installed
(non-cryptographic, for scale), and offbuild's own stat-cache miss (`FileHasher.digest`). Prints
the median GB/s of each. Standard library plus blake3 (an offbuild dependency) only.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import tempfile
import time

import blake3

from offbuild.hashing import FileHasher

CHUNK = 1 << 20


def read_into(digest, path: str) -> str:
    """Feed the file to `digest` a chunk at a time, as a streaming hasher would."""
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256(path: str) -> str:
    return read_into(hashlib.sha256(), path)


def blake3_mmap_threads(path: str) -> str:
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()


def offbuild_hasher(path: str) -> str:
    return FileHasher({}).digest(path)  # an empty stat cache: a changed file is read and hashed


def cat(path: str) -> str:
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    return ""


def contenders() -> dict:
    found = {"cat > /dev/null": cat, "hashlib sha256": sha256, "blake3 mmap+threads": blake3_mmap_threads}
    try:
        import xxhash

        def xxh3(path: str) -> str:
            return read_into(xxhash.xxh3_128(), path)

        found["xxh3_128 (not cryptographic)"] = xxh3
    except ImportError:
        pass
    found["offbuild FileHasher"] = offbuild_hasher
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the file goes (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="offbuild-hash-") as folder:
        path = os.path.join(folder, "big.bin")
        with open(path, "wb") as handle:
            block = os.urandom(CHUNK)
            for _ in range(args.size):
                handle.write(block)
        cat(path)  # into the page cache
        size = args.size * CHUNK
        print(f"file: {args.size} MiB, {os.cpu_count()} CPUs, median of {args.repeat}")
        results = {}
        for name, function in contenders().items():
            times = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                function(path)
                times.append(time.perf_counter() - started)
            results[name] = size / statistics.median(times) / 1e9
            print(f"  {name:30s} {results[name]:6.2f} GB/s")
        ratio = results["offbuild FileHasher"] / results["blake3 mmap+threads"]
        print(f"offbuild / blake3 mmap+threads: {ratio:.2f}x")


if __name__ == "__main__":
    main()
