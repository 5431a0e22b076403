"""The one way the service is started: uvicorn, with the HTTP limits of ``Settings``.

    python -m service.serve [--host H] [--port P] [--workers N] [--log-level L] [--no-access-log]

scripts/start.sh, both Dockerfiles (and so docker-compose.yml) and the tests' and
benchmarks' servers (tests/servers.py) all start it, so the limits below cannot differ
between them. Host, port and workers come from ``RECSERVE_HOST``, ``RECSERVE_PORT`` and
``RECSERVE_WORKERS`` unless given as flags; the limits only from settings:

- httptools' protocol bounded by ``service.http_protocol.LimitedHttpTools``: request line
  and headers (``RECSERVE_MAX_HEADER_BYTES``, ``RECSERVE_MAX_HEADERS``), the time to send
  them and the body (``RECSERVE_HEADER_TIMEOUT_SECONDS``, ``RECSERVE_BODY_TIMEOUT_SECONDS``);
- uvicorn's keep-alive timeout (``RECSERVE_KEEPALIVE_TIMEOUT_SECONDS``);
- no WebSocket upgrade (the service has none) and no ``server`` header;
- an access log whose lines copy at most a bounded excerpt of the request's path.

The environment is validated before uvicorn starts: a bad setting ends the start with one
line naming it. The app itself is built by ``service.main:create_app`` in each worker.
With several workers (or ``RECSERVE_COMPUTE=shared``) this process also keeps the host's
shared compute process running (``service.compute_host.ComputeServer``), which all the
workers compute in, and gives the workers a directory to keep their metrics in together
(``metrics_across``), so that /metrics reports the whole server.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from service.errors import EXCERPT_CHARS, ExperimentError, excerpt
from service.experiments import load_experiment
from service.settings import Settings

APP = "service.main:create_app"


class BoundedArgs(logging.Filter):
    """Cut the string arguments of a log record (an access log line's path) to an excerpt."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and len(arg) > EXCERPT_CHARS for arg in record.args
        ):
            record.args = tuple(
                excerpt(arg, quote=False) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def log_config() -> dict:
    """uvicorn's logging configuration with ``BoundedArgs`` on its access log."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["bounded"] = {"()": "service.serve.BoundedArgs"}
    config["handlers"]["access"]["filters"] = ["bounded"]
    return config


def uvicorn_options(settings: Settings) -> dict:
    """Keyword arguments of ``uvicorn.run`` that bound what a connection may hold."""
    from service.http_protocol import HttpLimits, LimitedHttpTools

    limits = HttpLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout=settings.header_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
    )
    return {
        "http": functools.partial(LimitedHttpTools, limits=limits),
        "ws": "none",
        "timeout_keep_alive": settings.keepalive_timeout_seconds,
        "server_header": False,
        "log_config": log_config(),
    }


def parse_args(argv: list[str] | None, settings: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default=settings.host, help="default: RECSERVE_HOST")
    parser.add_argument("--port", type=int, default=settings.port, help="default: RECSERVE_PORT")
    parser.add_argument(
        "--workers", type=int, default=settings.workers, help="default: RECSERVE_WORKERS"
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = Settings()
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            sys.stderr.write(f"recserve: invalid setting {where}: {error['msg']}\n")
        raise SystemExit(2) from None
    try:
        load_experiment(settings.experiment_file)
    except ExperimentError as exc:
        sys.stderr.write(f"recserve: {exc}\n")
        raise SystemExit(2) from None
    args = parse_args(argv, settings)
    import uvicorn

    with shared_compute(settings, args.workers), metrics_across(args.workers):
        uvicorn.run(
            APP,
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            access_log=args.access_log,
            **uvicorn_options(settings),
        )


@contextlib.contextmanager
def shared_compute(settings: Settings, workers: int):
    """The host's shared compute process, for the duration of the server, where the
    workers compute in one (``RECSERVE_COMPUTE=shared``, or ``auto`` with several
    workers): its socket reaches the workers as ``RECSERVE_COMPUTE_SOCKET``."""
    wanted = settings.compute == "shared" or (settings.compute == "auto" and workers > 1)
    if not wanted or settings.compute_socket is not None:
        yield None
        return
    from service.compute_host import ComputeServer

    with _scratch_directory("recserve-compute-") as directory:
        server = ComputeServer(directory / "compute.sock")
        server.start()
        try:
            with _environment("RECSERVE_COMPUTE_SOCKET", str(server.path)):
                yield server
        finally:
            server.stop()


@contextlib.contextmanager
def metrics_across(workers: int):
    """For several workers, a directory where each keeps its metrics, so /metrics answers
    for all of them (``service.metrics``); one set beforehand in ``PROMETHEUS_MULTIPROC_DIR``
    is used as it is (prometheus_client asks for it to be emptied between runs)."""
    from service.metrics import MULTIPROCESS_DIR

    if workers <= 1 or os.environ.get(MULTIPROCESS_DIR):
        yield
        return
    with (
        _scratch_directory("recserve-metrics-") as directory,
        _environment(MULTIPROCESS_DIR, str(directory)),
    ):
        yield


@contextlib.contextmanager
def _scratch_directory(prefix: str):
    """A private temporary directory (0700) for the server's lifetime, removed after it."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _environment(variable: str, value: str):
    """``variable`` set to ``value`` for the server's lifetime, its earlier value (or its
    absence) back after it: the workers uvicorn starts inherit this process's environment,
    which is how they learn the value."""
    earlier = os.environ.get(variable)
    os.environ[variable] = value
    try:
        yield
    finally:
        if earlier is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = earlier


if __name__ == "__main__":
    main()
