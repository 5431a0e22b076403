"""Real servers for tests: a private redis-server and the service as deployed.

The HTTP tests start the service exactly as it is deployed (``python -m service.serve``,
uvicorn configured by ``RECSERVE_*`` variables), and a redis-server of
their own when they stop, break or flood it, so nothing they do touches the Redis other
work uses. The benchmarks start them through this module too: bench/processes.py adds
what they measure of a running service (its processes, their CPU and memory).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    condition: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"
):
    """Poll ``condition`` until it returns something truthy, and return that; TimeoutError
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class RedisProcess:
    """A private redis-server on one port that its owner may stop and start again.

    ``persistent`` keeps an append-only file fsynced on every write in ``workdir``, so a
    stop and start (SIGTERM) keeps every acknowledged write, as a production Redis with
    AOF would; otherwise it keeps nothing, like the machine's shared Redis.
    """

    def __init__(self, port: int, workdir: Path, persistent: bool = False):
        self.port = port
        self.workdir = Path(workdir)
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        import redis

        durability = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *durability,
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                return bool(probe.ping())
            except redis.exceptions.ConnectionError:
                return False

        try:
            wait_until(answers, timeout=timeout, what=f"redis-server on port {self.port}")
        finally:
            probe.close()

    def stop(self, graceful: bool = False) -> None:
        """Kill it (``graceful``: SIGTERM, which flushes the append-only file first)."""
        if self.process is not None and self.process.poll() is None:
            if graceful:
                self.process.terminate()
            else:
                self.process.kill()
            self.process.wait(timeout=30)
        self.process = None


class UvicornService:
    """``python -m service.serve`` (uvicorn with the service's HTTP limits) in a subprocess,
    configured by env."""

    def __init__(
        self,
        settings: dict[str, str],
        *,
        port: int | None = None,
        workers: int = 1,
        log_path: Path | None = None,
        access_log: bool = False,
    ):
        self.port = port or free_port()
        self.workers = workers
        self.log_path = log_path
        self.access_log = access_log
        # The caller's RECSERVE_* variables must not leak into a deliberately configured run.
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RECSERVE_")},
            **settings,
        }
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The start command: the deployed entry point on 127.0.0.1."""
        command = [
            sys.executable,
            "-m",
            "service.serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--log-level",
            "warning",
        ]
        if not self.access_log:
            command.append("--no-access-log")
        return command

    def start(self, timeout: float = 120.0) -> None:
        """Start and wait until it is ready (an exit meanwhile raises with the log)."""
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command(), env=self.env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> None:
        """Wait until /readyz answers 200."""
        import httpx

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.process.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=timeout, interval=0.2, what="uvicorn to be ready")

    def log(self) -> str:
        """What the server wrote so far (empty without a log file)."""
        if self.log_path and Path(self.log_path).exists():
            return Path(self.log_path).read_text(errors="replace")
        return ""

    def stop(self) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown), SIGKILL after 15 s; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None
        return self.process.returncode
