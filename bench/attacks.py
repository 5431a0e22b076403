"""Attacks on the HTTP layer, bounded in time and on loopback only: what the service does
while one client misbehaves, and what its HTTP limits cost.

    .venv/bin/python -m bench.attacks --out docs/attacks.json --markdown
    .venv/bin/python -m bench.attacks --start uvicorn      # the same, the old way

(from the repository root). A small bundle is trained and exported first (the tests' tiny
synthetic data; ``--models-dir`` serves an existing one instead), then the service is
started on 127.0.0.1 (bench/processes.py ``ServiceProcess``): ``--start serve`` is
``python -m service.serve``, every start path since the HTTP limits; ``--start uvicorn``
is the bare ``uvicorn --factory service.main:create_app`` of before, httptools without
bounds, for the comparison. A thread times /recommend throughout, one request at a time;
each attack runs for at most ``--seconds`` (slow clients: until their timeout has passed,
plus a margin), then stops by itself:

- ``endless-header``: a client sends ``POST /recommend`` with a header line ``X-big:``
  that never ends, in 1 MiB chunks (the probe's attack), and starts again on a new
  connection whenever the server cuts one off.
- ``many-headers``: a client sends requests of 5,000 header fields, one after another,
  reconnecting whenever the server closes the connection.
- ``slow-clients``: ``--connections`` connections held open, a third sending nothing, a
  third half a head, a third a head and half a body.

Recorded per attack: what the server answered the attacker, how long it took to cut an
attacking connection off (``cut_off_s``: the median from its opening; slow clients: from the
attack's start until the last was closed; null if the server still held one when the attack
stopped), the concurrent /recommend requests that failed, their latency (p50, p99, max)
against the baseline before the attack, how long they stayed slow (``slow_until_s``: the
end of the last one slower than 10x the baseline median, or 50 ms, from the attack's
start) and the uvicorn worker's resident memory (its compute process apart; before, peak,
2 s after). ``--throughput`` adds /recommend throughput under wrk (one thread, concurrency
8, fresh histories) of both start commands, alternated.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import select
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.processes import ServiceProcess  # noqa: E402
from tests.servers import RedisProcess, free_port  # noqa: E402

LOG = logging.getLogger("bench.attacks")
ATTACKS = ("endless-header", "many-headers", "slow-clients")
HISTORY = [{"item_id": str(i), "ts": 1_700_000_000 + 600 * i} for i in range(1, 21)]
SLOW_FLOOR_S = 0.05


class LegacyUvicorn(ServiceProcess):
    """The service started as before the HTTP limits: bare uvicorn, httptools unbounded."""

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "service.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]


def build_bundle(workdir: Path) -> Path:
    """The tests' tiny data (300 users, 120 items), one SASRec-kind model, one bundle."""
    from training.data import build_sequences
    from training.export import export_bundle
    from training.synthetic import SyntheticConfig, generate
    from training.trainer import TrainConfig, train

    data = build_sequences(generate(SyntheticConfig(users=300, items=120, mean_length=20, seed=1)))
    config = TrainConfig(epochs=2, lr=3e-3, model_options={"max_len": 16, "dim": 16})
    run = train(data, config, workdir / "run")
    models = workdir / "models"
    export_bundle([run.checkpoint], data, models, name="attacks")
    return models


@contextmanager
def running(start: str, models_dir: Path, workdir: Path, **settings):
    """The service started the ``start`` way on a private redis-server, until the block ends."""
    redis = RedisProcess(free_port(), workdir / "redis")
    redis.start()
    env = {
        "RECSERVE_MODELS_DIR": str(models_dir),
        "RECSERVE_REDIS_URL": redis.url,
        "RECSERVE_ADMIN_TOKEN": secrets.token_hex(16),
        "RECSERVE_KEY_PREFIX": f"attacks{secrets.token_hex(4)}",
        "RECSERVE_RELOAD_POLL_SECONDS": "0",
        "RECSERVE_DEVICE": "cpu",
        **{f"RECSERVE_{k.upper()}": str(v) for k, v in settings.items()},
    }
    kind = ServiceProcess if start == "serve" else LegacyUvicorn
    service = kind(env, log_path=workdir / f"{start}.log")
    try:
        service.start(timeout=120)
        yield service
    finally:
        service.stop()
        redis.stop()


class Observer:
    """/recommend one at a time in a thread (latency, failures) and the worker's memory."""

    def __init__(self, service: ServiceProcess):
        import httpx

        self.service = service
        self.client = httpx.Client(base_url=service.url, timeout=60)
        self.samples: list[tuple[float, float, bool]] = []  # (sent at, seconds, ok)
        self.memory: list[tuple[float, int]] = []  # (at, bytes)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._requests, daemon=True),
            threading.Thread(target=self._rss, daemon=True),
        ]

    def _requests(self) -> None:
        body = {"history": HISTORY, "k": 10}
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                ok = self.client.post("/recommend", json=body).status_code == 200
            except Exception:  # a transport error is a failed request, recorded as such
                ok = False
            self.samples.append((sent, time.monotonic() - sent, ok))
            time.sleep(0.02)

    def _rss(self) -> None:
        while not self._stop.is_set():
            self.memory.append((time.monotonic(), self.service.rss_by_role()["workers"]))
            time.sleep(0.1)

    def __enter__(self) -> Observer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        self.client.close()

    def window(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        return [s for s in self.samples if start <= s[0] < end]

    def rss_at(self, start: float, end: float) -> list[int]:
        return [rss for at, rss in self.memory if start <= at < end]


def latency_summary(samples) -> dict:
    seconds = sorted(s[1] for s in samples) or [float("nan")]
    return {
        "requests": len(samples),
        "failed": sum(not s[2] for s in samples),
        "p50_ms": 1000 * statistics.median(seconds),
        "p99_ms": 1000 * seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))],
        "max_ms": 1000 * seconds[-1],
    }


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_answer(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What the server sends until it closes (True) or ``timeout`` passes (False)."""
    data, deadline = b"", time.monotonic() + timeout
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """One response (head and a Content-Length body); what came if the server closed."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def status_line(answer: bytes) -> str | None:
    return answer.split(b"\r\n", 1)[0].decode("latin-1") if answer else None


def endless_header(port: int, seconds: float) -> dict:
    """The probe's attack for ``seconds``: a header line that never ends, in 1 MiB chunks,
    on a new connection each time the server cuts one off."""
    chunk = b"a" * (1 << 20)
    started = time.monotonic()
    sent, connections, cut_offs, answers = 0, 0, [], {}
    while time.monotonic() - started < seconds:
        sock = connect(port)
        sock.settimeout(2)
        connections += 1
        opened = time.monotonic()
        try:
            sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nX-big: ")
            while time.monotonic() - started < seconds:
                if select.select([sock], [], [], 0)[0]:
                    break
                try:
                    sock.sendall(chunk)
                except OSError:  # reset, or the server stopped reading (a timeout)
                    break
                sent += len(chunk)
            answer, closed = read_answer(sock, timeout=1.0)
        finally:
            sock.close()
        line = status_line(answer) or ("closed" if closed else "nothing")
        answers[line] = answers.get(line, 0) + 1
        if not (closed or answer):
            break  # the server neither answered nor closed: still holding it
        cut_offs.append(time.monotonic() - opened)
    return {
        "sent_bytes": sent,
        "connections": connections,
        "answers": answers,
        "cut_off_s": statistics.median(cut_offs) if cut_offs else None,
    }


def many_headers(port: int, seconds: float, fields: int = 5000) -> dict:
    """Requests of ``fields`` header fields, one after another for ``seconds`` (a new
    connection whenever the server closes one)."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    request = head + b"".join(b"X-%d: v\r\n" % i for i in range(fields)) + b"\r\n"
    answers: dict[str, int] = {}
    started, cut_offs, connections = time.monotonic(), [], 0
    sock = None
    while time.monotonic() - started < seconds:
        if sock is None:
            sock = connect(port)
            connections += 1
            opened = time.monotonic()
        try:
            sock.sendall(request)
            answer = read_response(sock, timeout=5)
        except OSError:
            answer = b""
        line = status_line(answer) or "closed"
        answers[line] = answers.get(line, 0) + 1
        if not answer or b" 431 " in answer.split(b"\r\n", 1)[0]:
            cut_offs.append(time.monotonic() - opened)
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return {
        "fields": fields,
        "connections": connections,
        "answers": answers,
        "cut_off_s": statistics.median(cut_offs) if cut_offs else None,
    }


def slow_clients(port: int, seconds: float, connections: int) -> dict:
    head = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    kinds = {"idle": b"", "half-head": head + b"X-slow: ", "half-body": head}
    kinds["half-body"] += b"Content-Length: 1000\r\n\r\n" + b'{"history": ['
    socks: dict[socket.socket, str] = {}
    started = time.monotonic()
    for index in range(connections):
        kind = list(kinds)[index % len(kinds)]
        try:
            sock = connect(port)
            if kinds[kind]:
                sock.sendall(kinds[kind])
        except OSError:
            continue
        sock.setblocking(False)
        socks[sock] = kind
    opened = len(socks)
    closed_at: dict[socket.socket, float] = {}
    answers: dict[str, int] = {}
    while len(closed_at) < opened and time.monotonic() - started < seconds:
        readable, _, _ = select.select([s for s in socks if s not in closed_at], [], [], 0.1)
        for sock in readable:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                line = f"{socks[sock]}: {status_line(chunk)}"
                answers[line] = answers.get(line, 0) + 1
                continue
            closed_at[sock] = time.monotonic() - started
    for sock in socks:
        sock.close()
    return {
        "connections": opened,
        "closed_by_server": len(closed_at),
        "answers": answers,
        "cut_off_s": max(closed_at.values()) if len(closed_at) == opened else None,
    }


def run_attack(name: str, service: ServiceProcess, args) -> dict:
    with Observer(service) as observer:
        time.sleep(2.0)  # baseline
        before = time.monotonic()
        if name == "endless-header":
            result = endless_header(service.port, args.seconds)
        elif name == "many-headers":
            result = many_headers(service.port, args.seconds)
        else:
            timeout = max(args.header_timeout, args.body_timeout)
            result = slow_clients(service.port, timeout + args.seconds, args.connections)
        after = time.monotonic()
        time.sleep(2.0)  # recovery
        end = time.monotonic()
    base = latency_summary(observer.window(before - 2.0, before))
    during = latency_summary(observer.window(before, after))
    threshold = max(10 * base["p50_ms"] / 1000, SLOW_FLOOR_S)
    slow = [s for s in observer.window(before, end) if s[1] > threshold or not s[2]]
    rss_before = observer.rss_at(before - 2.0, before)
    rss_during = observer.rss_at(before, after) or rss_before
    rss_after = observer.rss_at(after + 1.5, end) or observer.rss_at(after, end)
    mib = 1 << 20
    return {
        "attack": name,
        "start": args.start,
        "duration_s": after - before,
        **result,
        "recommend_baseline": base,
        "recommend_during": during,
        "recommend_failed": during["failed"]
        + latency_summary(observer.window(after, end))["failed"],
        "slow_until_s": (max(s[0] + s[1] for s in slow) - before) if slow else 0.0,
        "worker_rss_mib": {
            "before": round(statistics.median(rss_before) / mib, 1),
            "peak": round(max(rss_during) / mib, 1),
            "after": round(statistics.median(rss_after) / mib, 1) if rss_after else None,
        },
    }


def throughput(models_dir: Path, workdir: Path, rounds: int, duration: int) -> list[dict]:
    """/recommend under wrk (one thread, 8 connections, fresh histories: cache misses) for
    both start commands, alternated ``rounds`` times."""
    from bench.serving import LUA, run_wrk

    lua = workdir / "bodies.lua"
    runs = []
    for round_ in range(rounds):
        for start in ("uvicorn", "serve"):
            values = {"bodies": "", "n_items": 120, "repeat_share": 0.0, "seed": round_ + 1}
            lua.write_text(LUA % values)
            with running(start, models_dir, workdir) as service:
                run_wrk(service.url + "/recommend", 8, 2, lua)  # warm-up
                result = run_wrk(service.url + "/recommend", 8, duration, lua)
            runs.append({"start": start, "round": round_, **result})
            LOG.info("%s round %d: %.0f requests/s", start, round_, result["rps"])
    return runs


def markdown(rows: list[dict]) -> str:
    lines = [
        "| attack | start | attacker got | cut off after | /recommend p50 / p99 / max during "
        "(baseline p50) | failed | slow until | worker RSS before / peak / after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        got = ", ".join(f"{k} x{v}" for k, v in row.get("answers", {}).items())
        if "sent_bytes" in row:
            got = f"{got or 'nothing'} ({row['sent_bytes'] / (1 << 20):.0f} MiB sent)"
        if "connections" in row and row["attack"] != "slow-clients":
            got += f"; {row['connections']} connection(s)"
        cut = f"{row['cut_off_s']:.2f} s" if row["cut_off_s"] is not None else "not cut off"
        during, base, rss = (
            row["recommend_during"],
            row["recommend_baseline"],
            row["worker_rss_mib"],
        )
        lines.append(
            f"| {row['attack']} | {row['start']} | {got or 'nothing'} | {cut} | "
            f"{during['p50_ms']:.1f} / {during['p99_ms']:.1f} / {during['max_ms']:.1f} ms "
            f"({base['p50_ms']:.1f} ms) | {row['recommend_failed']} | "
            f"{row['slow_until_s']:.1f} s | {rss['before']} / {rss['peak']} / {rss['after']} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attack", choices=[*ATTACKS, "all"], default="all")
    parser.add_argument("--start", choices=["serve", "uvicorn", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=5.0, help="the longest an attack runs")
    parser.add_argument("--connections", type=int, default=300, help="slow clients")
    parser.add_argument("--header-timeout", type=float, default=2.0)
    parser.add_argument("--body-timeout", type=float, default=2.0)
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--throughput-rounds", type=int, default=2)
    parser.add_argument("--throughput-seconds", type=int, default=10)
    parser.add_argument("--models-dir", type=Path, help="serve this models dir's CURRENT")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    workdir = Path(tempfile.mkdtemp(prefix="recserve-attacks-"))
    try:
        models_dir = args.models_dir or build_bundle(workdir)
        attacks = ATTACKS if args.attack == "all" else (args.attack,)
        starts = ("uvicorn", "serve") if args.start == "both" else (args.start,)
        rows = []
        for start in starts:
            args.start = start
            settings = {
                "header_timeout_seconds": args.header_timeout,
                "body_timeout_seconds": args.body_timeout,
            }
            for attack in attacks:
                # A fresh server per attack: one attack's leftovers do not weigh on the next.
                with running(start, models_dir, workdir, **settings) as service:
                    LOG.info("%s against %s ...", attack, start)
                    row = run_attack(attack, service, args)
                    row["server_alive"] = service.process.poll() is None
                LOG.info("%s", json.dumps(row))
                rows.append(row)
        result = {
            "settings": {
                "header_timeout_seconds": args.header_timeout,
                "body_timeout_seconds": args.body_timeout,
                "other HTTP limits": "defaults (service/settings.py)",
            },
            "attacks": rows,
        }
        if args.throughput:
            result["throughput"] = throughput(
                models_dir, workdir, args.throughput_rounds, args.throughput_seconds
            )
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        if args.markdown:
            print(markdown(rows))
            for run in result.get("throughput", []):
                print(
                    f"throughput {run['start']} round {run['round']}: {run['rps']:.0f} req/s, "
                    f"p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms"
                )
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
