"""What a command-line run shows on the console, and where the rest of its output goes.

Progress: a long loop shows a tqdm bar only when stderr is a terminal (piped into a file or
a CI log, the bar's carriage returns would make one huge line); a training run reports
one line per epoch either way, through the ``training.progress`` logger, which the console
always shows::

    for batch in progress_bar(batches, total=n, desc="epoch 3/10"):
        ...
    report_epoch("sasrec", record, epochs=10)

Detail: ``configure_logging`` sends log records (INFO and up, Python warnings included)
to an optional log file and, with ``verbose``, to the console; without it the console
gets the progress lines and, where ``console_warnings`` says so, warnings.
``output_to_file`` also moves what libraries write straight to file descriptors 1 and 2
(the ONNX exporter's print calls, onnxruntime's C++ warnings) into that file, and gives
back a stream that still reaches the console.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

PROGRESS = logging.getLogger("training.progress")

DETAIL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or fd-less stream is not)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Iterable, *, total: int | None = None, desc: str, unit: str = "it"):
    """``iterable`` behind a tqdm bar on stderr, drawn only when stderr is a terminal.

    The bar is a tqdm object either way, so ``set_postfix`` works whether it is drawn."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        mininterval=1.0,
        disable=not is_terminal(sys.stderr),
    )


def report_epoch(model: str, record: dict, epochs: int) -> None:
    """One line for a finished epoch: model, epoch, mean loss, valid NDCG@10, seconds so far."""
    valid = record.get("valid")
    PROGRESS.info(
        "%s epoch %d/%d  loss %.4f  valid NDCG@10 %s  %.1fs",
        model,
        record["epoch"],
        epochs,
        record["loss"],
        f"{valid['ndcg@10']:.4f}" if valid else "-",
        record["seconds"],
    )


class _ConsoleFilter(logging.Filter):
    """Progress lines always; other records as verbosity and ``warnings`` allow."""

    def __init__(self, verbose: bool, warnings: bool):
        super().__init__()
        self.verbose = verbose
        self.warnings = warnings

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == PROGRESS.name or self.verbose:
            return True
        return self.warnings and record.levelno >= logging.WARNING


class _ConsoleFormatter(logging.Formatter):
    """Progress lines bare, other records with time, level and logger."""

    def __init__(self):
        super().__init__(DETAIL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if record.name == PROGRESS.name else super().format(record)


# Handlers this module installed, replaced by the next call (tests call main() repeatedly).
_installed: list[logging.Handler] = []


def configure_logging(
    *, verbose: bool, log_file: Path | None = None, console_warnings: bool = True
) -> None:
    """Route log records and Python warnings: the console shows progress lines, warnings
    (``console_warnings``) and, with ``verbose``, every INFO record; ``log_file`` (appended
    to) gets every INFO record and warning whatever the console shows."""
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_ConsoleFilter(verbose, console_warnings))
    console.setFormatter(_ConsoleFormatter())
    _installed.append(console)
    if log_file is not None:
        detail = logging.FileHandler(log_file, encoding="utf-8")
        detail.setFormatter(logging.Formatter(DETAIL_FORMAT))
        _installed.append(detail)
    for handler in _installed:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


@contextmanager
def output_to_file(path: Path, *, enabled: bool = True) -> Iterator[TextIO]:
    """Yield a stream that reaches the console's stdout; meanwhile, when ``enabled``, file
    descriptors 1 and 2 write to ``path`` (appended to), while ``sys.stderr`` (the
    progress bars and log records of ``configure_logging`` called inside) stays on the
    console. Disabled, it yields ``sys.stdout`` and moves nothing."""
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console_out = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8")
    console_err = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8")
    previous_stderr = sys.stderr
    with open(path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stderr = console_err
        try:
            yield console_out
        finally:
            sys.stdout.flush()
            sys.stderr = previous_stderr
            for handler in _installed:  # a console handler set up inside keeps working
                if isinstance(handler, logging.StreamHandler) and handler.stream is console_err:
                    handler.setStream(previous_stderr)
            for fd, original in saved.items():
                os.dup2(original, fd)
                os.close(original)
            console_out.close()
            console_err.close()


def text_table(header: list[str], rows: list[list]) -> str:
    """Rows under a header, the first column left-aligned and the rest right-aligned;
    floats with four decimals, ``None`` as ``-``."""
    cells = [header] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    )


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
