"""The command line: argparse → load → build / dry run / list / graph / clean / explain / watch."""
from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import sys

from . import __version__
from .errors import OffbuildError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
GRAPH_FORMATS = ("dot", "mermaid", "json")
_OVERRIDE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)\Z", re.S)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offbuild", usage="offbuild [options] [TARGET...] [NAME=VALUE...]",
        description="Bring the outputs of a Pipefile up to date, deciding by content, offline.",
        epilog="Exit codes: 0 up to date, 1 a stage failed, 2 usage or Pipefile error, 130 interrupted.")
    parser.add_argument("items", nargs="*", metavar="TARGET | NAME=VALUE",
                        help="stage names, job names or output paths to build; NAME=VALUE overrides a variable")
    parser.add_argument("-f", dest="file", default="Pipefile", metavar="FILE",
                        help="the pipeline file (default ./Pipefile; *.json for the JSON form); another"
                             " name keeps its state in .offbuild/pipefiles/NAME/")
    parser.add_argument("-C", dest="directory", metavar="DIR", help="run as if started in DIR")
    parser.add_argument("-j", dest="jobs", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                        help="parallel jobs (default: CPU count)")
    parser.add_argument("-k", dest="keep_going", action="store_true", help="keep going past failures")
    parser.add_argument("-n", dest="dry_run", action="store_true", help="dry run: print what would run and why")
    parser.add_argument("-B", dest="force", action="store_true", help="rerun everything selected")
    parser.add_argument("--explain", metavar="T", help="why T and each stage it needs would run or skip")
    parser.add_argument("--watch", action="store_true", help="build, then rebuild what a change affects")
    parser.add_argument("--list", action="store_true", help="stages with their doc lines")
    parser.add_argument("--graph", nargs="?", const="dot", metavar="dot|mermaid|json",
                        help="print the DAG of what the targets need (default DOT)")
    parser.add_argument("--clean", action="store_true", help="delete declared outputs of the targets")
    parser.add_argument("--json", action="store_true", help="print the run record as JSON")
    parser.add_argument("--run-id", metavar="ID", help="name this run")
    parser.add_argument("--offline", choices=("auto", "strict", "off"), default="auto",
                        help="network isolation of recipes: auto (default; warn if impossible), strict, off")
    parser.add_argument("--executor", choices=("local", "dask"), default="local",
                        help="where recipes run: local processes (default) or a Dask cluster (needs --scheduler)")
    parser.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                        help="the Dask scheduler for --executor dask (default: $OFFBUILD_SCHEDULER); its workers"
                             " must see this project's files at the same paths")
    parser.add_argument("--cache", metavar="DIR_OR_URL",
                        help="a shared cache of outputs by stage key: a folder or an fsspec URL (s3://...);"
                             " also $OFFBUILD_CACHE or `cache = ...` in the Pipefile")
    parser.add_argument("--no-cache", action="store_true", help="use no cache, whatever is configured")
    parser.add_argument("--cache-prune", metavar="SIZE",
                        help="delete least-recently-used cache entries until the cache fits SIZE (500M, 2G)")
    parser.add_argument("--lint", action="store_true",
                        help="list Python recipe scripts that import networking modules")
    parser.add_argument("-q", dest="quiet", action="count", default=0, help="less output")
    parser.add_argument("-v", dest="verbose", action="count", default=0, help="more output")
    parser.add_argument("--version", action="version", version=f"offbuild {__version__}")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not '{text}'")
    return value


def run() -> None:
    """The `offbuild` command: `main`, then exit without the interpreter's teardown, which would
    free a big build's millions of objects one by one (a tenth of a second at 10,000 stages).
    Everything offbuild writes is closed by then; an unexpected error still exits the usual way."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # the reader went away (`offbuild --list | head`)
        pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `offbuild` command; returns the exit code."""
    args = make_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    collecting = gc.isenabled()
    if not args.watch:
        # A build's millions of small objects (model, graph, records) live until it ends, and it makes
        # next to no cyclic garbage: the collector's walks over them cost a fifth of loading a big
        # Pipefile. Watch mode, which lives on, keeps the collector.
        gc.disable()
    try:
        return _main(args)
    finally:
        if collecting:
            gc.enable()


def _main(args) -> int:
    start = os.getcwd()
    args.invocation_dir = start  # error messages name files relative to where the user stands
    try:
        if args.directory:
            try:
                os.chdir(args.directory)
            except OSError as error:
                raise OffbuildError(f"cannot enter '{args.directory}': {error.strerror}") from None
        return _dispatch(args)
    except OffbuildError as error:
        os.chdir(start)  # locations in messages are relative to where the user stands
        print(f"offbuild: {error.render()}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("offbuild: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_executor(args) -> None:
    """`--executor dask` needs a scheduler (flag or OFFBUILD_SCHEDULER); `--scheduler` needs dask."""
    if args.executor == "dask":
        args.scheduler = args.scheduler or os.environ.get("OFFBUILD_SCHEDULER") or None
        if not args.scheduler:
            raise UsageError("--executor dask needs --scheduler tcp://HOST:PORT (or OFFBUILD_SCHEDULER)")
    elif args.scheduler:
        raise UsageError("--scheduler is for --executor dask")


def _dispatch(args) -> int:
    # Imported here so `--version` and `--help` stay instant.
    from .cachesetting import cache_location
    from .fastpath import fast_build
    from .records import RUN_ID

    overrides, targets = {}, []
    if args.graph and args.graph not in GRAPH_FORMATS:  # `--graph report`: a target, not a format
        args.items.insert(0, args.graph)
        args.graph = "dot"
    for item in args.items:
        match = _OVERRIDE.match(item)
        if match:
            overrides[match.group(1)] = match.group(2)
        else:
            targets.append(item)
    if args.run_id is not None and not RUN_ID.match(args.run_id):
        raise OffbuildError(f"bad run id '{args.run_id}' (letters, digits, '.', '_' and '-')")
    _check_executor(args)
    # --cache and $OFFBUILD_CACHE are paths from where the user stands, so resolve them before any chdir.
    args.user_cache = None if args.no_cache else cache_location(args.cache, os.environ, None, os.getcwd(), "")
    exit_code = fast_build(args, targets, overrides)
    if exit_code is not None:
        return exit_code
    from .commands import run_command  # the full path: parser, graph, planner

    return run_command(args, targets, overrides)
