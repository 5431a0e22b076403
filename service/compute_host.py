"""The compute process: where batches are computed, for one worker or for every worker of
a host.

Two ways it runs, one loop (:class:`ComputeHost`):

- **per worker** (``python -m service.compute_host --fd N``): a worker's child over a
  socket pair (``service.compute.ProcessCompute``); it exits when its worker closes the
  socket.
- **shared** (``python -m service.compute_host --listen-fd N``): one process for all the
  HTTP workers of a host (``service.compute.SharedCompute``), started and restarted by
  :class:`ComputeServer` in ``python -m service.serve``, which owns the listening Unix
  socket: a worker that connects while the process is being replaced waits in the
  socket's backlog instead of failing. One copy of each bundle's models serves every
  worker, and the batches of all workers that queue up meanwhile are computed together,
  the shape of Triton's one server per GPU. A bundle is loaded (in a thread, while the
  others keep computing) when the first worker asks for it and dropped when the last one
  lets it go.

Merged computations run on a pool of ``RECSERVE_COMPUTE_HOST_THREADS`` threads (the
encoder's and the index's kernels release the GIL, so more than one core computes); a
computation starts only when a thread is free, so what queues meanwhile still merges.

Every connection sends its :class:`service.compute.ComputeConfig` first; once the bundle is
loaded and warmed up it gets where each stage runs, or why the bundle could not be loaded.
Then requests ``(id, op, args)`` get answers ``(id, ok, value)``: ``batch`` and
``catalogue`` (the catalogue API's writes, with the ids that connection's worker gave the
added items). Each connection computes with the catalogue its worker applied; workers that
applied the same writes share one, so their batches merge. Replies and heartbeats go out
per connection (heartbeats from a thread, so a worker can tell a long batch from a stopped
process).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from service.bundle import Bundle, load_bundle, placement, settle_heap
from service.compute import BEAT_FRAME, NO_FRAME, ComputeConfig, frame, take_frame
from service.devices import limit_native_threads
from service.errors import ComputeError
from service.live_catalogue import CatalogueChange, ServedCatalogue
from service.pipeline import compute_batch, warm_up

LOG = logging.getLogger(__name__)

SHARED_CATALOGUES = 4  # catalogue versions of one bundle kept for workers to share
RESTART_BACKOFF_SECONDS = (0.1, 0.5, 2.0)  # between restarts of a shared process that died


class _Outbox:
    """Writes to one worker: replies from the host's loop and heartbeats from a thread of
    their own, one whole frame group at a time.

    The heartbeat goes on while a batch computes (its native kernels release the GIL), so
    the worker can tell a slow batch from a process that is stopped or wedged.
    """

    def __init__(self, connection: socket.socket, beat_seconds: float):
        self.connection = connection
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._beats = threading.Thread(
            target=self._beat, args=(beat_seconds,), name="recserve-heartbeat", daemon=True
        )
        self._beats.start()

    def send(self, payload: bytes) -> None:
        """Send ``payload`` whole; OSError once the worker is gone or the outbox closed."""
        with self._lock:
            if self._stopped.is_set():
                raise OSError("the worker's connection is closed")
            self.connection.sendall(payload)

    def _beat(self, seconds: float) -> None:
        while not self._stopped.wait(seconds):
            try:
                self.send(BEAT_FRAME)
            except OSError:  # the worker went away: the host's loop drops the connection
                return

    def close(self) -> None:
        """Stop the heartbeat and close the connection, never in the middle of a send (a
        computing thread may be answering on it): its descriptor cannot be reused under a
        send that is still to come."""
        with self._lock:
            self._stopped.set()
            self.connection.close()


class _Inbox:
    """Whole frames from one worker, as far as they have arrived."""

    def __init__(self, connection: socket.socket):
        self.connection = connection
        self._buffer = bytearray()

    def take(self):
        """The next frame; None when it has not fully arrived. EOFError once the worker
        has closed its end."""
        # The socket stays blocking (the heartbeat thread writes to it too); the read
        # must not wait, and says so.
        while (value := take_frame(self._buffer)) is NO_FRAME:
            try:
                data = self.connection.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            if not data:
                raise EOFError
            self._buffer += data
        return value


@dataclass(eq=False)
class _Loaded:
    """One bundle's models as loaded here, and the connections that compute with them."""

    config: ComputeConfig
    bundle: Bundle | None = None
    failure: str | None = None
    users: int = 0
    # Served catalogues by (version, added ids): workers that applied the same writes
    # compute with one object, so their batches merge.
    catalogues: OrderedDict = field(default_factory=OrderedDict)


@dataclass(eq=False)
class _Link:
    """One worker's connection."""

    connection: socket.socket
    inbox: _Inbox
    outbox: _Outbox | None = None
    loaded: _Loaded | None = None
    served: ServedCatalogue | None = None  # set when the worker is told its bundle is loaded

    @property
    def ready(self) -> bool:
        """The worker has been told its bundle is loaded: it may ask for work."""
        return self.served is not None


class ComputeHost:
    """The compute loop over any number of workers' connections (see the module's doc).

    ``listener``: accept workers on it until stopped (shared); without one the loop ends
    when its last connection closes (per worker).
    """

    def __init__(self, listener: socket.socket | None = None):
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.links: dict[socket.socket, _Link] = {}
        self.bundles: dict[str, _Loaded] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="recserve-load")
        self._wake_read, self._wake_write = socket.socketpair()
        self._loads: list[tuple[_Loaded, Future]] = []
        # Merged computations run in a pool (made with the first configuration): at most
        # one per thread at once, the rest pending, so what queues meanwhile merges.
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 1
        self._running = 0
        self._pending: dict[tuple, _Group] = {}
        self._finished: deque[tuple[list, Future]] = deque()  # appended by the pool's threads
        self.selector.register(self._wake_read, selectors.EVENT_READ)
        if listener is not None:
            self.selector.register(listener, selectors.EVENT_READ)

    def add(self, connection: socket.socket) -> None:
        """Serve one more worker."""
        connection.setblocking(True)
        self.links[connection] = _Link(connection, _Inbox(connection))
        self.selector.register(connection, selectors.EVENT_READ)

    def run(self) -> None:
        """Compute until there is nothing left to serve (per worker) or forever (shared)."""
        try:
            while self.links or self.listener is not None:
                arrived: list[tuple[_Link, object]] = []
                for key, _ in self.selector.select():
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self._wake_read:
                        self._wake_read.recv(4096)
                        self._finish_loads()
                        self._finish_runs()
                    else:
                        arrived += self._read(self.links.get(key.fileobj))
                self._answer(arrived)
        finally:
            for link in list(self.links.values()):
                self._drop(link)
            self._loader.shutdown(wait=False, cancel_futures=True)
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    def _accept(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except BlockingIOError:
            return
        self.add(connection)

    def _read(self, link: _Link | None) -> list[tuple[_Link, object]]:
        """Every whole frame this worker has sent; the link is dropped on EOF or error."""
        if link is None:
            return []
        frames = []
        try:
            while (value := link.inbox.take()) is not None:
                frames.append((link, value))
        except (EOFError, OSError):
            self._drop(link)
            return [(lnk, value) for lnk, value in frames if lnk is not link]
        return frames

    def _answer(self, arrived: list[tuple[_Link, object]]) -> None:
        """Configurations start loads; catalogue writes apply before the batches that
        arrived with them (ids of added items only ever gain meaning, so a batch formed
        before a write is served right after it too); the batches of every worker are
        merged per bundle, retriever and catalogue, computed, and answered per connection
        (``_dispatch``)."""
        replies: dict[_Link, list] = {}
        batches = []
        for link, value in arrived:
            if link.connection not in self.links:
                continue
            if link.loaded is None:
                self._configure(link, value)
                continue
            call_id, op, call_args = value
            if op == "batch" and link.ready:
                batches.append((link, call_id, call_args))
            elif op == "catalogue" and link.ready:
                replies.setdefault(link, []).append(_reply(call_id, self._apply, link, *call_args))
            else:
                replies.setdefault(link, []).append(_reply(call_id, _unknown, op))
        self._send_all(replies)
        for link, call_id, (retriever, queries) in batches:
            key = (id(link.loaded), retriever, id(link.served))
            group = self._pending.get(key)
            if group is None:
                group = self._pending[key] = _Group(link.loaded, link.served, retriever)
            group.requests.append((link, call_id, queries))
        self._dispatch()

    def _dispatch(self) -> None:
        """Start a merged computation on every free thread, the groups taken in turn."""
        while self._running < self._threads and self._pending:
            key, group = next(iter(self._pending.items()))
            run = merge_runs(group.requests, group.loaded.config.merge_limit)[0]
            del self._pending[key]
            if len(run) < len(group.requests):
                group.requests = group.requests[len(run) :]
                self._pending[key] = group  # behind the other groups
            self._running += 1
            future = self._pool.submit(_compute_run, group, run)
            future.add_done_callback(partial(self._run_done, run))

    def _run_done(self, run: list, future: Future) -> None:
        self._finished.append((run, future))
        self._wake_write.send(b".")

    def _finish_runs(self) -> None:
        while self._finished:
            run, future = self._finished.popleft()
            self._running -= 1
            failure = future.exception()
            if failure is not None:
                # Every error of a request is answered by _compute_run; this one came
                # after (framing, say): its requests get it now rather than a timeout.
                LOG.error("a computation failed outside its requests", exc_info=failure)
                for link, call_id, _ in run:
                    if link.connection in self.links:
                        self._send(link, frame(_reply(call_id, _raise, failure)))
        self._dispatch()

    def _send_all(self, replies: dict[_Link, list]) -> None:
        for link, answers in replies.items():
            self._send(link, b"".join(frame(answer) for answer in answers))

    def _configure(self, link: _Link, text) -> None:
        """A worker's first frame: its configuration; its bundle is loaded unless it is
        already (or being) loaded for another worker."""
        try:
            config = ComputeConfig.model_validate_json(text)
        except Exception as exc:  # a configuration it cannot read: the worker says why
            self._send(link, frame((False, f"compute configuration refused: {exc}")))
            self._drop(link)
            return
        if self._pool is None:
            limit_native_threads(config.native_threads)
            self._threads = config.host_threads or len(os.sched_getaffinity(0))
            self._pool = ThreadPoolExecutor(
                self._threads,
                thread_name_prefix="recserve-compute",
                initializer=limit_native_threads,  # OpenMP's setting is per thread
                initargs=(config.native_threads,),
            )
        link.outbox = _Outbox(link.connection, config.heartbeat_seconds)
        # Workers that differ only in how they talk to the host share its models.
        key = config.model_dump_json(exclude={"heartbeat_seconds", "host_threads"})
        loaded = self.bundles.get(key)
        if loaded is None:
            loaded = self.bundles[key] = _Loaded(config)
            future = self._loader.submit(_load, config)
            self._loads.append((loaded, future))
            future.add_done_callback(lambda _: self._wake_write.send(b"."))
        loaded.users += 1
        link.loaded = loaded
        if loaded.bundle is not None:
            self._tell_loaded(link)

    def _finish_loads(self) -> None:
        done = [(loaded, future) for loaded, future in self._loads if future.done()]
        self._loads = [pair for pair in self._loads if not pair[1].done()]
        for loaded, future in done:
            try:
                loaded.bundle = future.result()
            except Exception as exc:  # every reason goes back to the workers
                loaded.failure = str(exc)
            for link in [lnk for lnk in self.links.values() if lnk.loaded is loaded]:
                self._tell_loaded(link)

    def _tell_loaded(self, link: _Link) -> None:
        loaded = link.loaded
        if loaded.failure is not None:
            self._send(link, frame((False, loaded.failure)))
            self._drop(link)
            return
        link.served = self._shared_catalogue(loaded, ServedCatalogue.of_bundle(loaded.bundle))
        self._send(link, frame((True, {"placement": placement(loaded.bundle), "pid": os.getpid()})))

    def _apply(self, link: _Link, change: CatalogueChange) -> int:
        """Serve ``change`` (this worker's catalogue writes) from its next batch on."""
        served = link.served.applied(
            link.loaded.bundle, change, embed=True, exposure=link.loaded.config.cold_start_exposure
        )
        link.served = self._shared_catalogue(link.loaded, served)
        return link.served.version

    @staticmethod
    def _shared_catalogue(loaded: _Loaded, served: ServedCatalogue) -> ServedCatalogue:
        """The catalogue another worker of the bundle already computes with, if it is this
        one (same version, same added ids), else ``served``, remembered for the next."""
        key = (served.version, tuple(sorted(served.catalogue.added_lookup.items())))
        shared = loaded.catalogues.get(key)
        if shared is None:
            loaded.catalogues[key] = shared = served
            while len(loaded.catalogues) > SHARED_CATALOGUES:
                loaded.catalogues.popitem(last=False)
        loaded.catalogues.move_to_end(key)
        return shared

    def _send(self, link: _Link, payload: bytes) -> None:
        try:
            if link.outbox is not None:
                link.outbox.send(payload)
            else:
                link.connection.sendall(payload)
        except OSError:
            self._drop(link)

    def _drop(self, link: _Link) -> None:
        """Forget a worker's connection; its bundle goes with its last user."""
        if self.links.pop(link.connection, None) is None:
            return
        self.selector.unregister(link.connection)
        if link.outbox is not None:
            link.outbox.close()
        else:
            link.connection.close()
        for key, group in list(self._pending.items()):  # nobody is left to answer
            group.requests = [request for request in group.requests if request[0] is not link]
            if not group.requests:
                del self._pending[key]
        loaded = link.loaded
        if loaded is not None:
            loaded.users -= 1
            if loaded.users == 0:
                self.bundles = {k: v for k, v in self.bundles.items() if v is not loaded}
                if loaded.bundle is not None:
                    settle_heap()  # a retired bundle's memory goes now, not at a random GC


@dataclass(eq=False)
class _Group:
    """Batch requests that may merge: one bundle, retriever and catalogue."""

    loaded: _Loaded
    served: ServedCatalogue
    retriever: str
    requests: list = field(default_factory=list)  # (link, call_id, queries), in arrival order


def _compute_run(group: _Group, run: list) -> None:
    """One merged computation, in a thread of the pool, answered to each worker as soon as
    it is done: the workers answer these requests while other runs compute. A worker gone
    meanwhile is left to the host's loop, which drops it when it reads the closed socket."""
    parts = _batches(group.loaded.bundle, group.served, group.retriever, run)
    answered: dict[_Link, list] = {}
    for (link, call_id, _), part in zip(run, parts, strict=True):
        answered.setdefault(link, []).append(_reply(call_id, _unless_error, part))
    for link, answers in answered.items():
        with contextlib.suppress(OSError):
            link.outbox.send(b"".join(frame(answer) for answer in answers))


def _load(config: ComputeConfig) -> Bundle:
    limit_native_threads(config.native_threads)  # OpenMP's setting is per thread
    # The worker verified the checksums of these very files before connecting.
    bundle = load_bundle(
        config.models_dir,
        config.bundle,
        device=config.device,
        threads=config.onnx_threads,
        verify=False,
        index_device=config.index_device,
    )
    warm_up(bundle, config.warm_batch, config.warm_candidates)
    settle_heap()
    return bundle


def merge_runs(requests: list, limit: int) -> list[list]:
    """``requests`` (each ``(link, call_id, queries)``) cut, in order, into runs of at most
    ``limit`` queries, each run one merged computation (a request bigger than ``limit``
    is a run of its own)."""
    runs: list[list] = []
    size = limit
    for request in requests:
        if size + len(request[2]) > limit:
            runs.append([])
            size = 0
        runs[-1].append(request)
        size += len(request[2])
    return runs


def _batches(bundle: Bundle, served: ServedCatalogue, retriever: str, requests: list) -> list:
    """Each request's answers (or its exception), from one merged computation; if that
    fails, each request alone, so one bad request fails only itself."""
    merged = [query for _, _, queries in requests for query in queries]
    try:
        answers = compute_batch(bundle.retrievers[retriever], served, merged)
    except Exception as exc:
        if len(requests) == 1:
            return [exc]
        return [_batches(bundle, served, retriever, [request])[0] for request in requests]
    parts, start = [], 0
    for _, _, queries in requests:
        parts.append(answers[start : start + len(queries)])
        start += len(queries)
    return parts


def _unknown(op: str):
    raise ValueError(f"unknown compute operation {op!r} (or sent before the bundle loaded)")


def _raise(failure: Exception):
    raise failure


def _unless_error(part):
    if isinstance(part, Exception):
        raise part
    return part


def _reply(call_id: int, compute, *args) -> tuple:
    try:
        return call_id, True, compute(*args)
    except Exception as exc:  # the batcher retries a failed batch request by request
        # As a ComputeError with the original's name: any exception pickles that way.
        return call_id, False, ComputeError(f"{type(exc).__name__}: {exc}")


class ComputeServer:
    """The shared compute process of a host, kept running by ``python -m service.serve``.

    It owns the listening socket (``path``) and hands it to each process it starts, so
    workers connect whether or not a process is running at that moment; one that dies is
    started again (after a short backoff when it dies at once), and the workers retry what
    it held on the next one.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.restarts = 0
        self.process: subprocess.Popen | None = None
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Listen on ``path`` and start the process and its watcher."""
        self.path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        os.chmod(self.path, 0o600)  # the workers run as this user; nobody else computes here
        self._listener.listen(128)
        self.process = self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="recserve-compute", daemon=True)
        self._watcher.start()

    def _spawn(self) -> subprocess.Popen:
        fd = self._listener.fileno()
        return subprocess.Popen(
            [sys.executable, "-m", "service.compute_host", "--listen-fd", str(fd)],
            pass_fds=(fd,),
        )

    def _watch(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            quick = time.monotonic() - started < 5.0
            delay = RESTART_BACKOFF_SECONDS[min(self.restarts, 2)] if quick else 0.0
            LOG.error("shared compute process exited with %s; starting another", code)
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self.process = self._spawn()

    def stop(self) -> None:
        """Stop the process (workers see their connections close) and stop listening."""
        self._stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        self.path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="recserve compute process")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="the socket to the one worker it serves")
    where.add_argument("--listen-fd", type=int, help="the listening socket of all workers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    # SIGTERM from ComputeServer.stop: end the loop like a closed socket would.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.fd is not None:
        host = ComputeHost()
        host.add(socket.socket(fileno=args.fd))
    else:
        listener = socket.socket(fileno=args.listen_fd)
        listener.setblocking(False)
        host = ComputeHost(listener)
    host.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
