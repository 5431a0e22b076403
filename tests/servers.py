"""Real servers for tests: a private redis-server, a private Redis Cluster, and the service
as deployed.

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

    def __init__(
        self, port: int, workdir: Path, persistent: bool = False, extra_args: tuple[str, ...] = ()
    ):
        self.port = port
        self.workdir = Path(workdir)
        self.persistent = persistent
        self.extra_args = tuple(extra_args)
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
                *self.extra_args,
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


class RedisClusterProcesses:
    """A Redis Cluster of private redis-servers on loopback ports: ``primaries`` primaries,
    each with ``replicas`` replicas, formed by ``redis-cli --cluster create``.

    ``node_timeout_ms`` is the cluster's failure-detection time: a primary unreachable for
    that long is marked failed and its replica promoted. Replicas are always eligible
    (``cluster-replica-validity-factor 0``), so a test's failover never waits on how long
    ago a replica last heard its primary; ``cluster-require-full-coverage no`` as in
    production (docs/DEPLOYMENT.md).
    """

    def __init__(
        self, workdir: Path, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
    ):
        self.workdir = Path(workdir)
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisProcess] = []

    @property
    def url(self) -> str:
        """The service's URL of the cluster: any running node seeds the client's view of it
        (a client started later cannot learn the cluster from a node that is down)."""
        return f"redis+cluster://127.0.0.1:{self.running()[0].port}/0"

    def _node(self, index: int) -> RedisProcess:
        port = free_port()
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # Bus ports of their own: port + 10000 (the default) may not exist.
            "--cluster-port",
            str(free_port()),
            "--cluster-replica-validity-factor",
            "0",
            # The other slots keep serving while one range has no primary (by default
            # the whole cluster refuses every command from the failure until the
            # promotion: docs/DEPLOYMENT.md recommends this setting).
            "--cluster-require-full-coverage",
            "no",
            # A replica's first sync at once, not after the default 5 s of waiting for more.
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        )
        return RedisProcess(port, self.workdir / f"node{index}", extra_args=args)

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, form the cluster, and wait until every slot is served and
        every replica is in sync with its primary."""
        self.nodes = [self._node(i) for i in range(self.primaries * (1 + self.replicas))]
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            wait_until(self.healthy, timeout=timeout, interval=0.1, what="the cluster to form")
        except BaseException:
            self.stop()
            raise

    def _client(self, node: RedisProcess):
        import redis

        return redis.Redis(port=node.port, socket_connect_timeout=0.5, socket_timeout=2)

    def _ask(self, node: RedisProcess, *command):
        """A command's answer from one node (None when the node does not answer)."""
        import redis

        client = self._client(node)
        try:
            return client.execute_command(*command)
        except redis.exceptions.ConnectionError:
            return None
        finally:
            client.close()

    def running(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.process is not None]

    def healthy(self) -> bool:
        """Every running node sees the cluster ok, and every running replica is linked."""
        for node in self.running():
            info = self._ask(node, "CLUSTER", "INFO")
            if info is None or b"cluster_state:ok" not in info:
                return False
            replication = self._ask(node, "INFO", "replication") or {}
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def primary_of(self, key: str) -> RedisProcess:
        """The node that serves ``key``'s slot now."""
        return self.by_port(self._slot_owner(key)[0])

    def replica_of(self, primary: RedisProcess) -> RedisProcess:
        """A running replica of ``primary``."""
        info = self._ask(primary, "INFO", "replication")
        return self.by_port(int(info["slave0"]["port"]))

    def holds(self, node: RedisProcess, key: str) -> bool:
        """Whether ``node`` itself (a replica too: READONLY) holds ``key``."""
        client = self._client(node)
        try:
            client.execute_command("READONLY")  # the pool's one connection, reused below
            return bool(client.exists(key))
        finally:
            client.close()

    def by_port(self, port: int) -> RedisProcess:
        return next(node for node in self.nodes if node.port == port)

    def _slot_owner(self, key: str) -> tuple[int, bytes]:
        """(port, node id) of the primary serving ``key``'s slot, as a running node says."""
        node = self.running()[0]
        slot = self._ask(node, "CLUSTER", "KEYSLOT", key)
        for start, end, primary, *_ in self._ask(node, "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1]), primary[2]
        raise LookupError(f"no node serves slot {slot}")

    def kill(self, node: RedisProcess) -> None:
        """SIGKILL one node: whatever it had not yet sent its replica is gone."""
        node.stop()

    def wait_for_failover(self, key: str, dead: RedisProcess, timeout: float = 30.0) -> float:
        """Wait until another node serves ``key``'s slot and the cluster is ok again; the
        seconds it took."""
        started = time.monotonic()

        def promoted() -> bool:
            return self._slot_owner(key)[0] != dead.port and self.healthy()

        wait_until(promoted, timeout=timeout, interval=0.05, what="a replica's promotion")
        return time.monotonic() - started

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
