#!/usr/bin/env python3
"""Write one benchmark pipeline three times over: a Pipefile (offbuild), a Makefile (GNU make)
and a build.ninja (ninja), plus the source files they read, into one directory.

Every stage is spelled out explicitly (no offbuild pattern stages, no make pattern rules, no
ninja rule per kind) and every tool runs the very same shell command for a stage, so what differs
between the tools is only the tool.

Shapes (N = --size, the number of stages, roughly):

  wide     N independent stages `cp src/iK.txt out/oK.txt`, then one stage `final` over all N
           outputs: `xargs cat < src/outputs.list > out/final.txt` (a file list instead of `$in`,
           so the command line stays short at 100k).
  chain    N stages in a line: stage 1 copies src/seed.txt, stage K copies stage K-1's output;
           out/final.txt is a copy of the last link.
  diamond  layers of fan-out/fan-in: W = ceil(sqrt(N)) stages per layer, each
           `cat <previous join> src/dL_K.txt > out/dL_K.txt`, then one join per layer
           `cat <the layer's W outputs> | md5sum > out/jL.txt`; about N/(W+1) layers;
           out/final.txt is a copy of the last join.

Usage: python benchmarks/generate.py SHAPE N DIR
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from dataclasses import dataclass, field

SHAPES = ("wide", "chain", "diamond")
FINAL = "out/final.txt"


@dataclass
class Pipeline:
    """The stages of one benchmark in tool-neutral form: (name, inputs, outputs, command)."""

    shape: str
    size: int
    stages: list[tuple[str, list[str], list[str], str]] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # path -> content
    edit_source: str = ""  # the source the 'edit' scenario changes
    untouched_output: str = ""  # an output that editing `edit_source` must NOT rebuild ("" = none)

    @property
    def stage_count(self) -> int:
        return len(self.stages)


def source_line(path: str, version: int = 0) -> str:
    """The content of a source file; `version` > 0 is the n-th edit."""
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name}\n" if version == 0 else f"{name} edit {version}\n"


def build_wide(n: int) -> Pipeline:
    p = Pipeline("wide", n)
    outs = []
    for k in range(n):
        src, out = f"src/i{k}.txt", f"out/o{k}.txt"
        p.sources[src] = source_line(src)
        p.stages.append((f"c{k}", [src], [out], f"cp {src} {out}"))
        outs.append(out)
    p.sources["src/outputs.list"] = "\n".join(outs) + "\n"
    p.stages.append(("final", outs + ["src/outputs.list"], [FINAL], f"xargs cat < src/outputs.list > {FINAL}"))
    p.edit_source = f"src/i{n // 2}.txt"
    p.untouched_output = "out/o0.txt" if n > 1 else ""
    return p


def build_chain(n: int) -> Pipeline:
    p = Pipeline("chain", n)
    p.sources["src/seed.txt"] = source_line("src/seed.txt")
    prev = "src/seed.txt"
    for k in range(1, n + 1):
        out = f"out/s{k}.txt"
        p.stages.append((f"s{k}", [prev], [out], f"cp {prev} {out}"))
        prev = out
    p.stages.append(("final", [prev], [FINAL], f"cp {prev} {FINAL}"))
    p.edit_source = "src/seed.txt"  # the only source: an edit reruns the whole chain
    return p


def diamond_dims(n: int) -> tuple[int, int]:
    width = max(2, math.ceil(math.sqrt(n)))
    layers = max(1, round(n / (width + 1)))
    return width, layers


def build_diamond(n: int) -> Pipeline:
    p = Pipeline("diamond", n)
    width, layers = diamond_dims(n)
    p.sources["src/seed.txt"] = source_line("src/seed.txt")
    prev = "src/seed.txt"
    for layer in range(layers):
        outs = []
        for k in range(width):
            src, out = f"src/d{layer}_{k}.txt", f"out/d{layer}_{k}.txt"
            p.sources[src] = source_line(src)
            p.stages.append((f"d{layer}_{k}", [prev, src], [out], f"cat {prev} {src} > {out}"))
            outs.append(out)
        join = f"out/j{layer}.txt"
        p.stages.append((f"j{layer}", outs, [join], f"cat {' '.join(outs)} | md5sum > {join}"))
        prev = join
    p.stages.append(("final", [prev], [FINAL], f"cp {prev} {FINAL}"))
    # Edit the middle layer: that fan-out stage, its join, and every layer after it rerun.
    mid = layers // 2
    p.edit_source = f"src/d{mid}_0.txt"
    p.untouched_output = f"out/d{mid}_1.txt"
    return p


def build(shape: str, n: int) -> Pipeline:
    if n < 1:
        raise ValueError("size must be at least 1")
    return {"wide": build_wide, "chain": build_chain, "diamond": build_diamond}[shape](n)


def expected_final(p: Pipeline, sources: dict[str, str] | None = None) -> bytes:
    """What out/final.txt must contain, computed in Python from the sources."""
    sources = p.sources if sources is None else sources
    if p.shape == "wide":
        return "".join(sources[f"src/i{k}.txt"] for k in range(p.size)).encode()
    if p.shape == "chain":
        return sources["src/seed.txt"].encode()
    width, layers = diamond_dims(p.size)
    prev = sources["src/seed.txt"].encode()
    for layer in range(layers):
        joined = b"".join(prev + sources[f"src/d{layer}_{k}.txt"].encode() for k in range(width))
        prev = (hashlib.md5(joined).hexdigest() + "  -\n").encode()
    return prev


def expected_output(p: Pipeline, path: str, sources: dict[str, str] | None = None) -> bytes | None:
    """Content of a non-final output where it is cheap to know (for spot checks), else None."""
    sources = p.sources if sources is None else sources
    if p.shape == "wide" and path.startswith("out/o"):
        return sources["src/i" + path[len("out/o"):]].encode()
    if p.shape == "chain" and path.startswith("out/s"):
        return sources["src/seed.txt"].encode()
    return None


# --- writers -------------------------------------------------------------------------------

def pipefile_text(p: Pipeline) -> str:
    parts = [f"# offbuild benchmark: {p.shape}, {p.stage_count} stages (generated)\n"]
    for name, ins, outs, cmd in p.stages:
        parts.append(f"\nstage {name}:\n    in: {' '.join(ins)}\n    out: {' '.join(outs)}\n    run: {cmd}\n")
    parts.append("\ndefault: final\n")
    return "".join(parts)


def makefile_text(p: Pipeline) -> str:
    parts = [f"# make benchmark: {p.shape}, {p.stage_count} stages (generated)\n",
             "MAKEFLAGS += --no-builtin-rules --no-builtin-variables\n.SUFFIXES:\n",
             f".PHONY: all\nall: {FINAL}\n"]
    for _name, ins, outs, cmd in p.stages:
        parts.append(f"\n{' '.join(outs)}: {' '.join(ins)}\n\t{cmd}\n")
    return "".join(parts)


def ninja_text(p: Pipeline) -> str:
    parts = [f"# ninja benchmark: {p.shape}, {p.stage_count} stages (generated)\n",
             "rule run\n  command = $cmd\n"]
    for _name, ins, outs, cmd in p.stages:
        # Paths here never contain ' ', ':' or '$', so no ninja escaping is needed.
        parts.append(f"\nbuild {' '.join(outs)}: run {' '.join(ins)}\n  cmd = {cmd}\n")
    parts.append(f"\ndefault {FINAL}\n")
    return "".join(parts)


def write_sources(p: Pipeline, directory: str) -> None:
    made: set[str] = set()
    for path, content in p.sources.items():
        full = os.path.join(directory, path)
        parent = os.path.dirname(full)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, content.encode())
        finally:
            os.close(fd)
    os.makedirs(os.path.join(directory, "out"), exist_ok=True)  # make does not create folders


def write(p: Pipeline, directory: str, tools: tuple[str, ...] = ("offbuild", "make", "ninja"),
          sources: bool = True) -> None:
    """Write the pipeline files for `tools` (and the sources) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    files = {"offbuild": ("Pipefile", pipefile_text), "make": ("Makefile", makefile_text),
             "ninja": ("build.ninja", ninja_text)}
    for tool in tools:
        name, render = files[tool]
        with open(os.path.join(directory, name), "w") as handle:
            handle.write(render(p))
    if sources:
        write_sources(p, directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write equivalent offbuild/make/ninja benchmark pipelines.")
    parser.add_argument("shape", choices=SHAPES)
    parser.add_argument("size", type=int, help="number of stages (roughly, for diamond)")
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    p = build(args.shape, args.size)
    write(p, args.directory)
    print(f"{args.directory}: {p.shape}, {p.stage_count} stages, {len(p.sources)} source files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
