"""The training package's exceptions, in one place so the CLI reports them once.

TrainingError
├── DataError            interaction data cannot be read
│   ├── DataFormatError  a file is malformed (names the file, the line and the problem)
│   └── DataSpecError    a ``--data`` spec cannot be understood or points at nothing
├── ConfigError          a training setting is wrong (unknown model, loss or option);
│                        also a ValueError, as these were before the tree existed
├── CheckpointError      a checkpoint is missing, unreadable, of another format, or does
│                        not fit the data it is used with (names the file)
├── ExportError          an exported artifact does not behave like the trained model
└── CtrError             the CTR head cannot be trained as asked

``python -m training`` prints any of them as one ``error: ...`` line and exits with 2, as it
does the service's own errors (``service.errors.RecserveError``: BundleError, DeviceError).
"""

from __future__ import annotations

from pathlib import Path


class TrainingError(Exception):
    """Base class of everything the training package raises on purpose."""


class DataError(TrainingError):
    """Base class of the errors raised while reading interaction data."""


class DataFormatError(DataError):
    """A file is malformed; the message names the file, the line and the problem."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class DataSpecError(DataError):
    """A ``--data`` spec cannot be understood or points at nothing."""


class ConfigError(TrainingError, ValueError):
    """A training setting is wrong: an unknown model, loss or option, or a bad value."""


class CheckpointError(TrainingError):
    """A checkpoint cannot be used; the message names the file and the problem."""


class ExportError(TrainingError):
    """The exported artifact does not behave like the trained model."""


class CtrError(TrainingError):
    """The CTR head cannot be trained as asked (too few users, no usable group, other items)."""
