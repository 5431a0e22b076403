"""Where a worker's batches are computed: a thread of its own, a child process of its
own, or the host's shared compute process.

The kernel (``service.pipeline.compute_batch``: ONNX encoder, faiss search, CTR head)
runs in native code that releases the GIL, but the numpy work around it takes the GIL
back dozens of times per batch, and a busy event loop holds it for up to
``sys.getswitchinterval()`` at each of those points, so beside a busy loop a batch takes
many times its own compute time (docs/BENCHMARKS.md, "where batches are computed"). A
worker under load therefore gets most of its throughput from a compute process
(``service.compute_host``) that holds the bundle's models (the item vectors are
memory-mapped, so their pages are shared) while the worker's event loop only parses,
queues and answers:

- ``ProcessCompute``: a child of the worker, over a socket pair (one worker per host);
- ``SharedCompute``: one process for all the workers of a host, over its Unix socket
  (one copy of the models, batches merged across workers), started by
  ``python -m service.serve`` when it runs several workers (``RECSERVE_COMPUTE``).

``ThreadCompute`` keeps everything in the worker (no second copy of the models, nothing to
spawn): the choice for tests and for light load.

``LoneInWorker`` joins the two for a worker with a child of its own: a batch arriving while
nothing else computes (a lone request) runs in the worker's thread, where it pays neither
the two process hops nor the framing of its query and answer; everything else goes to the
child, so a busy worker keeps its event loop free. The worker then holds a copy of the
models too (``RECSERVE_LONE_IN_WORKER``; docs/BENCHMARKS.md, "A lone request").

The protocol is length-prefixed pickle frames over a Unix socket, both directions read and
written by the event loop itself (no helper threads that would queue for the GIL). The
worker's first frame is its :class:`ComputeConfig` (JSON, validated by the compute
process), and once the bundle is loaded the process answers with where it runs each stage
and its pid, or why it could not load the bundle. Then requests ``(id, op, args)`` get
answers ``(id, ok, value)``: ``batch`` (compute a batch of queries) and ``catalogue``
(apply the catalogue API's writes, a ``service.live_catalogue.CatalogueChange``, with the
ids the worker gave the added items; a new process gets everything applied so far first).
The process computes with one-thread native kernels, merging the batch requests that
queued up while it was busy into one computation and answering each apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from concurrent.futures import Executor
from functools import partial
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from service.bundle import Bundle, placement
from service.errors import BundleError, ComputeError, ComputeUnavailable
from service.live_catalogue import CatalogueChange, ServedCatalogue
from service.pipeline import Query, Ranked, compute_batch
from service.settings import Settings

LOG = logging.getLogger(__name__)

FRAME = struct.Struct("<Q")
START_TIMEOUT_SECONDS = 600.0  # loading a bundle's models (a 1M-item one: seconds)
STOP_TIMEOUT_SECONDS = 10.0


class ComputeConfig(BaseModel):
    """Everything a compute process needs to load and run a bundle; sent to the child as
    its first frame and validated there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models_dir: Path
    bundle: str
    device: str = Field("auto", pattern="^(auto|cpu|gpu)$")
    index_device: str | None = Field(None, pattern="^(auto|cpu|gpu)$")  # None: device
    onnx_threads: int = Field(1, ge=1)
    native_threads: int = Field(1, ge=1)
    warm_batch: int = Field(32, ge=1)  # largest batch the warm-up runs
    # Queries computed in one merged computation at most; what queued beyond waits for
    # the next, so the workers answer one while the next computes (compute_host.merge_runs).
    merge_limit: int = Field(32, ge=1)
    # Merged computations run at once, each in a thread (0: one per core); the host takes
    # the first configuration's (service/compute_host.py).
    host_threads: int = Field(1, ge=0)
    warm_candidates: int = Field(200, ge=1)
    heartbeat_seconds: float = Field(0.1, gt=0)  # how often the child says it is alive
    cold_start_exposure: float = Field(1.0, gt=0)  # scale of metadata-derived vectors

    @classmethod
    def from_settings(cls, settings: Settings, bundle: str) -> ComputeConfig:
        """The compute process of ``bundle`` as the service's settings configure it."""
        return cls(
            models_dir=settings.models_dir.resolve(),
            bundle=bundle,
            device=settings.device,
            index_device=settings.index_device,
            onnx_threads=settings.onnx_threads,
            native_threads=settings.native_threads,
            warm_batch=settings.max_batch,
            merge_limit=settings.compute_merge_limit,
            host_threads=settings.compute_host_threads,
            warm_candidates=settings.candidates,
            heartbeat_seconds=min(0.1, settings.compute_stall_seconds / 5),
            cold_start_exposure=settings.cold_start_exposure,
        )


def compute_mode(settings: Settings) -> str:
    """Where this worker's batches are computed: ``thread``, ``process`` (a child of its
    own) or ``shared`` (the host's process at ``compute_socket``). ``auto`` is shared where
    service.serve started one for its workers, else a child per worker. ComputeError for
    ``shared`` without a socket to reach it."""
    if settings.compute == "thread":
        return "thread"
    if settings.compute_socket is not None and settings.compute in ("auto", "shared"):
        return "shared"
    if settings.compute == "shared":
        raise ComputeError(
            "RECSERVE_COMPUTE=shared needs the shared compute process that "
            "python -m service.serve starts (RECSERVE_COMPUTE_SOCKET is not set)"
        )
    return "process"


def lone_in_worker(settings: Settings, mode: str) -> bool:
    """Whether a worker computing in ``mode`` (see :func:`compute_mode`) also computes lone
    batches itself (``LoneInWorker``)."""
    if mode == "thread" or settings.lone_in_worker == "off":
        return False
    return settings.lone_in_worker == "on" or mode == "process"


class ThreadCompute:
    """Batches computed in ``executor`` (default: the loop's) with this process's models."""

    embeds = True  # added items' vectors are derived with this process's models

    def __init__(self, bundle: Bundle, executor: Executor | None = None):
        self.bundle = bundle
        self.executor = executor
        self.served = ServedCatalogue.of_bundle(bundle)

    async def start(self) -> None:
        """Nothing to start: the models were loaded with the bundle."""

    @property
    def available(self) -> bool:
        """Always: the batches run in this process."""
        return True

    @property
    def placement(self) -> dict[str, dict]:
        """Where each retriever's stages run (``service.bundle.placement``)."""
        return placement(self.bundle)

    async def update_catalogue(
        self, change: CatalogueChange, everything: CatalogueChange, served: ServedCatalogue
    ) -> None:
        """Compute with ``served`` (built with the models of this very process)."""
        self.served = served

    async def batch(self, retriever: str, queries: list[Query]) -> list[Ranked]:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor,
                compute_batch,
                self.bundle.retrievers[retriever],
                self.served,
                queries,
            )
        except Exception as exc:  # as a compute process reports it: this request failed
            raise ComputeError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        """Nothing to stop."""


class _Frames(asyncio.Protocol):
    """The worker's end of the socket pair: frames in, each handed to ``on_frame``; every
    frame, heartbeats included, stamps ``heard`` (the loop's clock)."""

    def __init__(self, on_frame, on_lost):
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.heard = asyncio.get_running_loop().time()
        self._buffer = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.heard = asyncio.get_running_loop().time()
        self._buffer += data
        while (value := take_frame(self._buffer)) is not NO_FRAME:
            if value is not BEAT:
                self.on_frame(value)

    def connection_lost(self, exc) -> None:
        self.on_lost(exc)


class ProcessCompute:
    """Batches computed by a child process that loads the bundle's models itself.

    The child sends a heartbeat every ``config.heartbeat_seconds``, computing or not; a
    child not heard from for ``stall_seconds`` (stopped, wedged, swapping) is killed,
    what it held fails with ``ComputeUnavailable``, and a new one is started at once. A
    batch whose child was lost is sent once more to the new child (the computation has no
    side effects), so a crash or stall fails a request only when the replacement fails it
    too. ``call_timeout`` bounds one call whatever the heartbeat.
    """

    embeds = False  # the process derives added items' vectors with its own models

    def __init__(
        self, config: ComputeConfig, call_timeout: float = 30.0, stall_seconds: float = 1.0
    ):
        self.config = config
        self.call_timeout = call_timeout
        self.stall_seconds = stall_seconds
        self.bundle = config.bundle
        # Where the child runs each stage (service.bundle.placement), as it said when ready.
        self.placement: dict[str, dict] = {}
        self.replaced = 0  # children replaced after dying or stalling
        self.pid: int | None = None  # of the compute process, as it said when ready
        self._process: asyncio.subprocess.Process | None = None
        self._frames: _Frames | None = None
        self._ready: asyncio.Future | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._starting: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._closed = False
        self._catalogue: CatalogueChange | None = None  # every write applied so far

    @property
    def running(self) -> bool:
        return (
            self._alive()
            and self._frames is not None
            and self._ready is not None
            and self._ready.done()
            and not self._ready.cancelled()
            and self._ready.exception() is None
            and self._frames.transport is not None
            and not self._frames.transport.is_closing()
        )

    @property
    def available(self) -> bool:
        """A child is running and has been heard from within the stall bound."""
        return self.running and not self._stalled()

    def _alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def _stalled(self) -> bool:
        silent = asyncio.get_running_loop().time() - self._frames.heard
        return silent > self.stall_seconds

    async def _confirmed_stall(self) -> bool:
        """Stalled even after the loop has read what already arrived: a loop that was
        busy for a while has not yet seen the heartbeats waiting in the socket."""
        if not self._stalled():
            return False
        for _ in range(3):
            await asyncio.sleep(0)
        return self.running and self._stalled()

    async def start(self) -> None:
        """Start (or reach) the compute process and wait until its bundle is loaded;
        BundleError with its reason when it cannot load it."""
        self._closed = False
        loop = asyncio.get_running_loop()
        ours = await self._open()
        self._ready = ready = loop.create_future()
        # Each connection's callbacks know their own ready future: a retired child's
        # connection, lost after its replacement started, must not touch the new one.
        _, self._frames = await loop.create_unix_connection(
            lambda: _Frames(partial(self._on_frame, ready), partial(self._on_lost, ready)),
            sock=ours,
        )
        self._frames.transport.write(frame(self.config.model_dump_json()))
        try:
            self.placement = await asyncio.wait_for(
                asyncio.shield(self._ready), START_TIMEOUT_SECONDS
            )
        except (ComputeError, TimeoutError) as exc:
            await self._stop_child()
            raise BundleError(f"compute process for {self.bundle} did not start ({exc})") from exc
        except BundleError:
            await self._stop_child()
            raise
        if self._catalogue is not None:
            # A replacement child starts from the bundle: everything written, before any batch.
            await self._call_once("catalogue", self._catalogue, started=False)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch())
        LOG.info("compute process %d serves bundle %s", self.pid, self.bundle)

    async def _open(self) -> socket.socket:
        """This worker's end of a socket pair to a new child of its own."""
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service.compute_host",
                "--fd",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        return ours

    def _on_frame(self, ready: asyncio.Future, value) -> None:
        if not ready.done():  # the first frame: (loaded, {placement, pid} or why not)
            ok, message = value
            if ok:
                self.pid = message["pid"]
                ready.set_result(message["placement"])
            else:
                ready.set_exception(BundleError(message))
            return
        call_id, ok, result = value
        future = self._pending.get(call_id)
        if future is None or future.done():
            return
        if ok:
            future.set_result(result)
        else:
            future.set_exception(result)

    def _on_lost(self, ready: asyncio.Future, exc) -> None:
        if ready is not self._ready:
            return  # a retired child: what it held failed when it was retired
        self._fail_pending(
            ComputeUnavailable(f"compute process for {self.bundle} went away ({exc!r})")
        )

    def _fail_pending(self, failure: ComputeError) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(failure)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(failure)

    async def _watch(self) -> None:
        """Replace a child that stopped talking (or died) without waiting for a call."""
        interval = max(self.config.heartbeat_seconds, self.stall_seconds / 4)
        while not self._closed:
            await asyncio.sleep(interval)
            if self._starting is not None and not self._starting.done():
                continue
            if self.running and not await self._confirmed_stall():
                continue
            try:
                await self._ensure_running()
            except BundleError as exc:
                LOG.error("compute process for %s could not be restarted: %s", self.bundle, exc)

    async def _ensure_running(self) -> None:
        # A child that died (killed, out of memory) or stalled is replaced once, by one
        # task that every caller (and the watchdog) waits for; calls that waited on the
        # old child have failed with ComputeUnavailable.
        if self.running and not await self._confirmed_stall():
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._replace())
        await asyncio.shield(self._starting)

    async def _replace(self) -> None:
        if self.running:  # alive but silent: stopped or wedged
            silent = asyncio.get_running_loop().time() - self._frames.heard
            LOG.error(
                "compute process %d for %s silent for %.1f s; replacing it",
                self.pid,
                self.bundle,
                silent,
            )
            self._kill()
            self._fail_pending(
                ComputeUnavailable(
                    f"compute process for {self.bundle} stalled ({silent:.1f} s silent)"
                )
            )
        LOG.warning("compute process for %s is not running; starting one", self.bundle)
        await self._stop_child()
        self.replaced += 1
        await self.start()

    async def _call(self, op: str, *args):
        try:
            return await self._call_once(op, *args)
        except ComputeUnavailable as exc:
            # The child was lost under this call, not failed by it: once more, on a new one.
            LOG.warning("%s; retrying the %s on a new compute process", exc, op)
            return await self._call_once(op, *args)

    async def _call_once(self, op: str, *args, started: bool = True):
        if started:
            await self._ensure_running()
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._frames.transport.write(frame((call_id, op, args)))
            return await asyncio.wait_for(future, self.call_timeout)
        except TimeoutError:
            # A child that answers nothing for this long holds every request: it is
            # killed and replaced (the heartbeat catches a stopped one much sooner).
            LOG.error(
                "compute process for %s did not answer in %.0f s; killing it",
                self.bundle,
                self.call_timeout,
            )
            self._kill()
            raise ComputeError(
                f"compute process for {self.bundle} did not answer in {self.call_timeout:.0f} s"
            ) from None
        finally:
            self._pending.pop(call_id, None)

    async def batch(self, retriever: str, queries: list[Query]) -> list[Ranked]:
        return await self._call("batch", retriever, queries)

    async def update_catalogue(
        self, change: CatalogueChange, everything: CatalogueChange, served: ServedCatalogue
    ) -> None:
        """Have the child apply ``change``; ``everything`` (all writes applied so far) is
        what a replacement child is given first. ``served`` is the worker's (no vectors:
        the child embeds with its own models)."""
        self._catalogue = everything
        await self._call("catalogue", change)

    async def close(self) -> None:
        """Stop the child (it exits when its socket closes) and its watchdog."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        await self._stop_child()

    def _kill(self) -> None:
        """Kill a child that no longer answers (its replacement is started by the caller)."""
        if self._alive():
            self._process.kill()

    async def _stop_child(self) -> None:
        if self._frames is not None and self._frames.transport is not None:
            self._frames.transport.close()
        self._frames = None
        if self._process is not None:
            try:
                await asyncio.wait_for(self._process.wait(), STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
            self._process = None


class SharedCompute(ProcessCompute):
    """Batches computed by the host's shared compute process (``service.compute_host``,
    kept running by ``python -m service.serve``), reached over its Unix socket: one copy of
    the models for all workers, and their batches merged.

    As with a child of its own, a process that went away fails what it held with
    ``ComputeUnavailable`` and the call is retried once, on the connection to its
    successor (the socket is the server's, so the connection waits in its backlog while
    the successor starts); one that stopped talking is killed, and the server starts
    another.
    """

    def __init__(self, config: ComputeConfig, socket_path: Path, **kwargs):
        super().__init__(config, **kwargs)
        self.socket_path = Path(socket_path)

    def _alive(self) -> bool:
        # Not this worker's process: its connection and heartbeats say whether it serves.
        return True

    async def _open(self) -> socket.socket:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(connection, str(self.socket_path))
        except OSError as exc:
            connection.close()
            raise BundleError(
                f"no shared compute process at {self.socket_path} ({exc}); it is started by "
                "python -m service.serve"
            ) from exc
        return connection

    def _kill(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class LoneInWorker:
    """A batch that arrives while nothing else computes runs in the worker (``local``);
    the others go to the compute process (``remote``)."""

    embeds = True  # the worker's own models compute too: it derives the vectors itself

    def __init__(self, local: ThreadCompute, remote: ProcessCompute):
        self.local = local
        self.remote = remote
        self._computing = 0  # batches of this worker in either backend now

    async def start(self) -> None:
        """Start the compute process (the worker's models are loaded with its bundle)."""
        await self.remote.start()

    @property
    def available(self) -> bool:
        """The compute process serves (what takes the load is what readiness reports)."""
        return self.remote.available

    @property
    def placement(self) -> dict[str, dict]:
        """Where the compute process runs each stage."""
        return self.remote.placement

    async def update_catalogue(
        self, change: CatalogueChange, everything: CatalogueChange, served: ServedCatalogue
    ) -> None:
        """Both backends compute with the change, before any batch that could name it."""
        await self.local.update_catalogue(change, everything, served)
        await self.remote.update_catalogue(change, everything, served)

    async def batch(self, retriever: str, queries: list[Query]) -> list[Ranked]:
        # A lone request only: a batch of several is what the process's merging is for.
        alone = self._computing == 0 and len(queries) == 1
        backend = self.local if alone else self.remote
        self._computing += 1
        try:
            return await backend.batch(retriever, queries)
        finally:
            self._computing -= 1

    async def close(self) -> None:
        """Stop the compute process."""
        await self.remote.close()


def frame(value) -> bytes:
    """``value`` as one length-prefixed pickle frame."""
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(payload)) + payload


NO_FRAME = object()  # what take_frame returns while a frame is incomplete
BEAT = object()  # what take_frame returns for a heartbeat (an empty frame)
BEAT_FRAME = FRAME.pack(0)


def take_frame(buffer: bytearray):
    """The value of the first whole frame in ``buffer``, removed from it; ``NO_FRAME``
    while the frame has not fully arrived, ``BEAT`` for a heartbeat."""
    if len(buffer) < FRAME.size:
        return NO_FRAME
    (length,) = FRAME.unpack_from(buffer)
    end = FRAME.size + length
    if len(buffer) < end:
        return NO_FRAME
    value = pickle.loads(memoryview(buffer)[FRAME.size : end]) if length else BEAT
    del buffer[:end]
    return value
