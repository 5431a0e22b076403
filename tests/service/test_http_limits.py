"""HTTP limits of the server (service/http_protocol.py, started by service/serve.py): a
client that sends an endless head, too many headers, or sends slowly is cut off, and
other requests stay fast meanwhile.

The first tests run the protocol in an in-process uvicorn with a trivial app (exact bounds,
in a second); the last ones the service as deployed (``python -m service.serve``, the tiny
bundle) under attack, with /recommend timed beside it.
"""

from __future__ import annotations

import asyncio
import functools
import select
import selectors
import socket
import statistics
import threading
import time
import uuid

import httpx
import pytest
import uvicorn

from tests.servers import UvicornService, free_port, wait_until
from tests.service.conftest import delete_prefix, history_events, server_settings

# The in-process server's limits (service.http_protocol.HttpLimits).
LIMITS = dict(max_header_bytes=4096, max_headers=20, header_timeout=0.6, body_timeout=0.6)
TIMEOUT = 0.6
SLACK_SECONDS = 1.5  # on top of a timeout, for a busy two-core machine
REQUEST_LINE = b"POST /echo HTTP/1.1\r\nHost: x\r\n"


# --------------------------------------------------------------------------- raw sockets


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What the server sends until it closes (True) or ``timeout`` passes (False)."""
    sock.settimeout(0.1)
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer[9:12])


def wait_all_closed(socks: list[socket.socket], timeout: float) -> dict:
    """Read every socket until it is closed or ``timeout`` passes: {sock: (answer, closed,
    seconds until closed)}."""
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    results = {sock: [b"", False, None] for sock in socks}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    open_count = len(socks)
    while open_count and time.monotonic() - started < timeout:
        for key, _ in selector.select(timeout=0.1):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                chunk = b""
            if chunk:
                results[sock][0] += chunk
                continue
            results[sock][1:] = [True, time.monotonic() - started]
            selector.unregister(sock)
            open_count -= 1
    selector.close()
    return {sock: tuple(value) for sock, value in results.items()}


def send_endless_header(
    port: int, seconds: float, chunk_bytes: int = 65536, max_bytes: int = 64 << 20
) -> tuple[bytes, int]:
    """The probe's attack, bounded: a header line that never ends, sent until the server
    answers (or closes), ``seconds`` pass or ``max_bytes`` went; (the answer, bytes sent)."""
    sock = connect(port)
    sock.settimeout(2)
    sent = 0
    chunk = b"a" * chunk_bytes
    deadline = time.monotonic() + seconds
    try:
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nX-big: ")
        while time.monotonic() < deadline and sent < max_bytes:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sent += len(chunk)
        answer, _ = read_until_closed(sock, timeout=2)
        return answer, sent
    finally:
        sock.close()


# --------------------------------------------------------------------------- in-process server


async def echo_app(scope, receive, send):
    """Answers with the length of the body it read."""
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    answer = str(size).encode()
    headers = [(b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture(scope="module")
def protocol_port():
    """uvicorn in a thread of this process, with ``LimitedHttpTools`` bound to LIMITS."""
    from service.http_protocol import HttpLimits, LimitedHttpTools

    config = uvicorn.Config(
        echo_app,
        host="127.0.0.1",
        port=free_port(),
        http=functools.partial(LimitedHttpTools, limits=HttpLimits(**LIMITS)),
        ws="none",
        lifespan="off",
        timeout_keep_alive=TIMEOUT,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=10, what="the in-process uvicorn")
    yield config.port
    server.should_exit = True
    thread.join(10)


def request_with_head_of(size: int, body: bytes = b"{}") -> bytes:
    """A request whose line and headers (blank line included) are exactly ``size`` bytes."""
    fixed = REQUEST_LINE + b"Content-Length: %d\r\nX-pad: \r\n\r\n" % len(body)
    return fixed[: -len(b"\r\n\r\n")] + b"p" * (size - len(fixed)) + b"\r\n\r\n" + body


def exchange(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    sock = connect(port)
    try:
        sock.sendall(data)
        answer, _ = read_until_closed(sock, timeout=timeout)
        return answer
    finally:
        sock.close()


def test_a_head_at_the_limit_is_served_and_one_byte_more_is_431(protocol_port):
    limit = LIMITS["max_header_bytes"]
    at_limit = request_with_head_of(limit)
    assert len(at_limit.split(b"\r\n\r\n")[0]) + 4 == limit
    sock = connect(protocol_port)
    sock.sendall(at_limit)
    sock.settimeout(3)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()

    answer = exchange(protocol_port, request_with_head_of(limit + 1))
    assert status_of(answer) == 431
    assert b"larger than the limit of 4096 bytes" in answer
    assert b"x-content-type-options: nosniff" in answer


def test_a_large_body_arriving_with_the_head_is_not_counted_as_head(protocol_port):
    body = b"x" * (LIMITS["max_header_bytes"] * 20)
    request = REQUEST_LINE + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    answer = exchange(protocol_port, request)
    assert status_of(answer) == 200 and answer.endswith(str(len(body)).encode())


def test_more_header_fields_than_the_limit_is_431(protocol_port):
    def request(fields: int) -> bytes:
        # Host, Connection and Content-Length, and X- fields for the rest.
        lines = b"".join(b"X-%d: v\r\n" % i for i in range(fields - 3))
        return REQUEST_LINE + lines + b"Connection: close\r\nContent-Length: 0\r\n\r\n"

    assert status_of(exchange(protocol_port, request(LIMITS["max_headers"]))) == 200
    answer = exchange(protocol_port, request(LIMITS["max_headers"] + 1))
    assert status_of(answer) == 431 and b"more than the limit of 20 fields" in answer


def test_an_endless_header_line_is_refused_after_the_limit(protocol_port):
    answer, sent = send_endless_header(protocol_port, seconds=3.0, chunk_bytes=1024)
    assert status_of(answer) == 431, answer[:200]
    # The server read the limit, answered, and drained the rest; what the client got out
    # before it saw the answer is the loopback's buffers, not the server's memory.
    assert sent < 8 * 1024 * 1024


def test_slow_heads_bodies_and_idle_connections_are_closed_in_time(protocol_port):
    idle = connect(protocol_port)
    slow_head = connect(protocol_port)
    slow_head.sendall(REQUEST_LINE + b"X-slow: ")
    slow_body = connect(protocol_port)
    slow_body.sendall(REQUEST_LINE + b"Content-Length: 100\r\n\r\n" + b"x" * 10)
    kept_alive = connect(protocol_port)
    kept_alive.sendall(REQUEST_LINE + b"Content-Length: 0\r\n\r\n")
    results = wait_all_closed(
        [idle, slow_head, slow_body, kept_alive], timeout=TIMEOUT + SLACK_SECONDS
    )
    for sock in (idle, slow_head, slow_body, kept_alive):
        sock.close()
    assert results[idle][:2] == (b"", True)  # nothing asked, nothing answered
    assert status_of(results[slow_head][0]) == 408 and results[slow_head][1]
    assert b"request line and headers: not received within 0.6 s" in results[slow_head][0]
    assert status_of(results[slow_body][0]) == 408 and results[slow_body][1]
    assert b"body: not received within 0.6 s" in results[slow_body][0]
    answer, closed, _ = results[kept_alive]
    assert status_of(answer) == 200 and closed  # answered, then idle past keep-alive
    for sock in (idle, slow_head, slow_body, kept_alive):
        assert results[sock][2] < TIMEOUT + SLACK_SECONDS


def test_a_client_dribbling_its_head_is_timed_from_its_first_byte(protocol_port):
    sock = connect(protocol_port)
    started = time.monotonic()
    answer = b""
    for piece in REQUEST_LINE + b"X-slow: dribble":
        try:
            sock.sendall(bytes([piece]))
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.05)
        if select.select([sock], [], [], 0)[0]:
            break
    answer, closed = read_until_closed(sock, timeout=SLACK_SECONDS)
    sock.close()
    assert status_of(answer) == 408 and closed
    assert time.monotonic() - started < TIMEOUT + SLACK_SECONDS


# --------------------------------------------------------------------------- the service


class RecommendTimer:
    """/recommend with a history, sent one after another in a thread; their latencies."""

    def __init__(self, url: str, history: list[dict]):
        self.url = url
        self.body = {"history": history, "k": 5}
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.post("/recommend", json=self.body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - started)
                self.failures += not ok
                time.sleep(0.02)

    def __enter__(self) -> RecommendTimer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture(scope="module")
def service(exported_bundle, shared_redis, tmp_path_factory):
    """The service as deployed (python -m service.serve) with short timeouts."""
    models_dir, _ = exported_bundle
    prefix = f"t{uuid.uuid4().hex[:20]}"
    settings = {
        **server_settings(models_dir, prefix),
        "RECSERVE_HEADER_TIMEOUT_SECONDS": "1.5",
        "RECSERVE_BODY_TIMEOUT_SECONDS": "1.5",
        "RECSERVE_KEEPALIVE_TIMEOUT_SECONDS": "1",
    }
    server = UvicornService(settings, log_path=tmp_path_factory.mktemp("limits") / "uvicorn.log")
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()
        delete_prefix(shared_redis, prefix)
    assert "Traceback" not in server.log(), server.log()


def baseline(url: str, history: list[dict]) -> float:
    with httpx.Client(base_url=url, timeout=30) as client:
        latencies = []
        for _ in range(10):
            started = time.perf_counter()
            client.post("/recommend", json={"history": history, "k": 5}).raise_for_status()
            latencies.append(time.perf_counter() - started)
    return statistics.median(latencies)


def test_an_endless_header_is_refused_while_recommendations_stay_fast(service, tiny_data):
    history = history_events(tiny_data, 2)
    usual = baseline(service.url, history)
    with RecommendTimer(service.url, history) as timer:
        time.sleep(0.3)
        answer, sent = send_endless_header(service.port, seconds=6.0)
        time.sleep(0.3)
    assert status_of(answer) == 431, (sent, answer[:200])
    assert b"16384 bytes" in answer
    assert timer.failures == 0 and timer.latencies
    assert max(timer.latencies) < max(1.0, 50 * usual), (usual, max(timer.latencies))


def test_too_many_header_fields_are_refused(service):
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(150))
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"Connection: close\r\n\r\n"
    answer = exchange(service.port, request)
    assert status_of(answer) == 431, answer[:200]


def test_slow_clients_are_cut_off_while_recommendations_stay_fast(service, tiny_data):
    """Many connections that never finish their head or body, or send nothing: each is
    closed once its timeout passes, and /recommend answers meanwhile as usual."""
    history = history_events(tiny_data, 2)
    usual = baseline(service.url, history)
    per_kind = 40
    head = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with RecommendTimer(service.url, history) as timer:
        idle = [connect(service.port) for _ in range(per_kind)]
        slow_heads = [connect(service.port) for _ in range(per_kind)]
        slow_bodies = [connect(service.port) for _ in range(per_kind)]
        for sock in slow_heads:
            sock.sendall(head + b"X-slow: ")
        for sock in slow_bodies:
            sock.sendall(head + b"Content-Length: 1000\r\n\r\n" + b'{"history": [')
        results = wait_all_closed(idle + slow_heads + slow_bodies, timeout=1.5 + 4 * SLACK_SECONDS)
    for sock in results:
        sock.close()
    assert all(closed for _, closed, _ in results.values())
    assert {status_of(results[s][0]) for s in slow_heads} == {408}
    assert {status_of(results[s][0]) for s in slow_bodies} == {408}
    assert {results[s][0] for s in idle} == {b""}
    assert timer.failures == 0 and timer.latencies
    assert max(timer.latencies) < max(1.0, 50 * usual), (usual, max(timer.latencies))


def test_an_idle_keep_alive_connection_is_closed(service):
    sock = connect(service.port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    answer, closed = read_until_closed(sock, timeout=1 + 2 * SLACK_SECONDS)
    sock.close()
    assert status_of(answer) == 200 and closed
    assert time.monotonic() - started < 1 + 2 * SLACK_SECONDS


def test_the_server_hides_its_name(service):
    response = httpx.get(f"{service.url}/healthz")
    assert "server" not in response.headers
