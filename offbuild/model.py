"""The pipeline model: frozen values produced by the loaders, consumed by everything else."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from operator import attrgetter


def _pickled_as_arguments(cls):
    """Pickle as `cls(*fields)`: the default for slotted dataclasses looks the fields up again for
    every object, which made a 10,000-stage pipeline (80,000 objects) take 0.3 s each way."""
    values = attrgetter(*(item.name for item in fields(cls)))
    cls.__reduce__ = lambda self: (cls, values(self))
    return cls


@_pickled_as_arguments
@dataclass(frozen=True, slots=True)
class Location:
    """A place in a Pipefile: file as shown to the user, 1-based line and column."""

    file: str
    line: int
    column: int = 1
    # The file's absolute path, so the snippet is read from the right file whatever the working
    # directory is by the time the error is shown (`-C`, and the chdir to the project root).
    path: str | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def at(self, line: int, column: int) -> "Location":
        """Another place in the same file."""
        return Location(self.file, line, column, self.path)


# Per-job names a recipe may use; they cannot be defined as variables.
JOB_VARIABLES = ("in", "out", "stage", "stem")


@_pickled_as_arguments
@dataclass(frozen=True, slots=True)
class JobVar:
    """A reference to a per-job variable (`$in`, `$out3`, `$stem`...) left in a recipe template."""

    name: str
    location: Location


@_pickled_as_arguments
@dataclass(frozen=True, slots=True)
class PathSpec:
    """One word of an `in:` or `out:` field after variable expansion: a path, glob or pattern."""

    text: str
    location: Location

    @property
    def is_pattern(self) -> bool:
        return "%" in self.text

    @property
    def is_glob(self) -> bool:
        return "*" in self.text or "?" in self.text or "[" in self.text


@_pickled_as_arguments
@dataclass(frozen=True, slots=True)
class Stage:
    """One `stage NAME:` block, variables expanded except the per-job ones in `recipe`."""

    name: str
    location: Location
    inputs: tuple[PathSpec, ...] = ()
    outputs: tuple[PathSpec, ...] = ()
    recipe: tuple[str | JobVar, ...] = ()
    doc: str = ""
    after: tuple[PathSpec, ...] = ()
    env: tuple[str, ...] = ()
    checkpoint: bool = False
    retries: int = 0
    backoff: float = 1.0
    retry_on: tuple[int, ...] = ()
    timeout: float | None = None
    pool: str | None = None
    network: bool = False
    always: bool = False
    cache: bool = True  # False: never stored in nor restored from a shared cache (SPEC section 7)

    @property
    def pattern_input(self) -> PathSpec | None:
        """The first `%` input, which drives a pattern stage's jobs, or None."""
        return next((spec for spec in self.inputs if spec.is_pattern), None)


@_pickled_as_arguments
@dataclass(frozen=True, slots=True)
class Pipeline:
    """A loaded Pipefile: stages in declaration order, pools, the default targets."""

    stages: tuple[Stage, ...]
    default: tuple[PathSpec, ...] = ()
    pools: dict[str, int] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ()  # the Pipefile and every included file
    # (path, size, mtime_ns, ino, ctime_ns, when taken) of each source, taken before reading it
    source_stats: tuple[tuple[str, int, int, int, int, int], ...] = ()


@_pickled_as_arguments
@dataclass(frozen=True, slots=True)
class Job:
    """One concrete unit of work: a stage, or one stem of a pattern stage."""

    name: str
    stage: Stage
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    recipe: str
    stem: str | None = None
    input_locations: tuple[Location, ...] = ()

    @property
    def is_check(self) -> bool:
        return not self.outputs
