"""What the benchmarks measure of a running service: its processes, their CPU and memory.

The service is started as the tests start it (tests/servers.py: ``python -m
service.serve``, configured by ``RECSERVE_*`` variables), and the fault runs
(``bench/faults.py``) take their private redis-server from there. ``ServiceProcess``
adds the service's processes by role, the uvicorn workers and their compute processes
(service.compute), with their resident memory and CPU seconds (Linux /proc).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.servers import UvicornService, wait_until


class ServiceProcess(UvicornService):
    """The service under uvicorn, measured by process: workers and compute processes."""

    def wait_ready(self, timeout: float) -> None:
        """Ready, and with several workers each of them started, so that all are measured."""
        super().wait_ready(timeout)
        if self.workers > 1:
            wait_until(
                lambda: len(self.worker_pids()) >= self.workers,
                timeout=timeout,
                what=f"{self.workers} uvicorn workers",
            )

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the children with several workers, else itself."""
        if self.process is None:
            return []
        if self.workers == 1:
            return [self.process.pid]
        # uvicorn spawns its workers with multiprocessing; its resource tracker and the
        # shared compute process are children too, and serve no request.
        return [pid for pid in _children(self.process.pid) if b"spawn_main" in _cmdline(pid)]

    def pids_by_role(self) -> dict[str, list[int]]:
        """The workers, and the compute processes (service.compute_host): each worker's
        own, or the host's shared one (a child of the server process beside the workers)."""
        workers = self.worker_pids()
        shared = []
        if self.workers > 1 and self.process is not None:
            shared = [pid for pid in _children(self.process.pid) if _is_compute(pid)]
        return {
            "workers": workers,
            "compute": shared + [child for worker in workers for child in _children(worker)],
        }

    def serving_pids(self) -> list[int]:
        """The workers and their compute processes."""
        return [pid for pids in self.pids_by_role().values() for pid in pids]

    def rss_bytes(self) -> int:
        """Resident memory of the serving processes together (Linux /proc)."""
        return sum(self.rss_by_role().values())

    def rss_by_role(self) -> dict[str, int]:
        """Resident memory of the workers together and of their compute processes together."""
        return {role: sum(map(_rss, pids)) for role, pids in self.pids_by_role().items()}

    def pss_by_role(self) -> dict[str, int]:
        """Proportional set size per role: each page shared by n processes counts 1/n in
        each, so the roles add up to what the server costs the host (resident memory counts
        the memory-mapped item vectors once in every process that maps them)."""
        return {role: sum(map(_pss, pids)) for role, pids in self.pids_by_role().items()}

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server, its workers and their compute processes
        (Linux /proc; a process that exits meanwhile takes its seconds with it)."""
        return sum(_cpu(pid) for pid in {self.process.pid, *self.serving_pids()})

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of the workers together and of their compute processes together."""
        return {role: sum(map(_cpu, pids)) for role, pids in self.pids_by_role().items()}


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _is_compute(pid: int) -> bool:
    return b"service.compute_host" in _cmdline(pid)


def _kib_field(path: str, field: str) -> int:
    """Bytes of a ``field: N kB`` line of a /proc file (0 once the process is gone)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss(pid: int) -> int:
    return _kib_field(f"/proc/{pid}/status", "VmRSS:")


def _pss(pid: int) -> int:
    return _kib_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class PeerProcess(ServiceProcess):
    """bench/plain_peer.py (the plain server a user would write) over ``bundle`` of
    ``models_dir``, measured as the service is."""

    def __init__(self, models_dir: Path, bundle: str, **kwargs):
        super().__init__({}, **kwargs)
        self.models_dir = Path(models_dir)
        self.bundle = bundle

    def command(self) -> list[str]:
        """``python -m bench.plain_peer`` on 127.0.0.1."""
        return [
            sys.executable,
            "-m",
            "bench.plain_peer",
            "--models-dir",
            str(self.models_dir),
            "--bundle",
            self.bundle,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
