"""Where a worker's batches are computed: a thread of its own, or a child process.

The kernel (``service.pipeline.compute_batch``: ONNX encoder, faiss search, CTR head)
runs in native code that releases the GIL, but the numpy work around it takes the GIL
back dozens of times per batch, and a busy event loop holds it for up to
``sys.getswitchinterval()`` at each of those points, so beside a busy loop a batch takes
many times its own compute time (docs/BENCHMARKS.md, "where batches are computed"). A
worker under load therefore gets most of its throughput from ``ProcessCompute``: a child
process that holds its own copy of the bundle's models (the item vectors are
memory-mapped, so their pages are shared) and computes batches sent over a socket pair,
while the worker's event loop only parses, queues and answers. ``ThreadCompute`` keeps
everything in the worker (no second copy of the models, nothing to spawn): the choice
for tests and for light load.

The protocol is length-prefixed pickle frames over a Unix socket pair, both directions
read and written by the event loop itself (no helper threads that would queue for the
GIL). The child is started as ``python -m service.compute --fd N``; the worker's first
frame is its :class:`ComputeConfig` (JSON, validated by the child), and once the bundle is
loaded the child answers with where it runs each stage, or why it could not load the
bundle. Then requests ``(id, op, args)`` get answers ``(id, ok, value)``. The child
computes with one-thread native kernels, merging the batch requests that queued up while
it was busy into one computation and answering each apart.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import pickle
import socket
import struct
import sys
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.bundle import Bundle, load_bundle, placement, settle_heap
from service.devices import limit_native_threads
from service.errors import BundleError, ComputeError
from service.pipeline import Query, Ranked, compute_batch, warm_up
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
    warm_candidates: int = Field(200, ge=1)

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
            warm_candidates=settings.candidates,
        )


class ThreadCompute:
    """Batches computed in ``executor`` (default: the loop's) with this process's models."""

    def __init__(self, bundle: Bundle, executor: Executor | None = None):
        self.bundle = bundle
        self.executor = executor

    async def start(self) -> None:
        """Nothing to start: the models were loaded with the bundle."""

    @property
    def placement(self) -> dict[str, dict]:
        """Where each retriever's stages run (``service.bundle.placement``)."""
        return placement(self.bundle)

    async def batch(self, retriever: str, queries: list[Query]) -> list[Ranked]:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor,
            compute_batch,
            self.bundle.retrievers[retriever],
            self.bundle.item_features,
            queries,
        )

    async def search(self, retriever: str, queries: np.ndarray, k: int):
        index = self.bundle.retrievers[retriever].index
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, index.search, queries, k
        )

    async def close(self) -> None:
        """Nothing to stop."""


class _Frames(asyncio.Protocol):
    """The worker's end of the socket pair: frames in, each handed to ``on_frame``."""

    def __init__(self, on_frame, on_lost):
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (value := take_frame(self._buffer)) is not NO_FRAME:
            self.on_frame(value)

    def connection_lost(self, exc) -> None:
        self.on_lost(exc)


class ProcessCompute:
    """Batches computed by a child process that loads the bundle's models itself."""

    def __init__(self, config: ComputeConfig, call_timeout: float = 30.0):
        self.config = config
        self.call_timeout = call_timeout
        self.bundle = config.bundle
        # Where the child runs each stage (service.bundle.placement), as it said when ready.
        self.placement: dict[str, dict] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._frames: _Frames | None = None
        self._ready: asyncio.Future | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._starting: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return (
            self._process is not None
            and self._process.returncode is None
            and self._frames is not None
            and self._ready is not None
            and self._ready.done()
            and not self._ready.cancelled()
            and self._ready.exception() is None
            and self._frames.transport is not None
            and not self._frames.transport.is_closing()
        )

    async def start(self) -> None:
        """Spawn the child and wait until its bundle is loaded; BundleError with its
        reason when it cannot load it."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service.compute",
                "--fd",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        self._ready = loop.create_future()
        _, self._frames = await loop.create_unix_connection(
            lambda: _Frames(self._on_frame, self._on_lost), sock=ours
        )
        self._frames.transport.write(frame(self.config.model_dump_json()))
        try:
            self.placement = await asyncio.wait_for(
                asyncio.shield(self._ready), START_TIMEOUT_SECONDS
            )
        except (ComputeError, TimeoutError) as exc:
            await self.close()
            raise BundleError(f"compute process for {self.bundle} did not start ({exc})") from exc
        except BundleError:
            await self.close()
            raise
        LOG.info("compute process %d serves bundle %s", self._process.pid, self.bundle)

    def _on_frame(self, value) -> None:
        if not self._ready.done():  # the first frame: (loaded, its placement or why not)
            ok, message = value
            if ok:
                self._ready.set_result(message)
            else:
                self._ready.set_exception(BundleError(message))
            return
        call_id, ok, result = value
        future = self._pending.get(call_id)
        if future is None or future.done():
            return
        if ok:
            future.set_result(result)
        else:
            future.set_exception(result)

    def _on_lost(self, exc) -> None:
        failure = ComputeError(f"compute process for {self.bundle} went away ({exc!r})")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(failure)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(failure)

    async def _ensure_running(self) -> None:
        # A child that died (killed, out of memory) is replaced on the next call; calls
        # that were waiting on it have failed with ComputeError.
        if self.running:
            return
        if self._starting is None or self._starting.done():
            LOG.warning("compute process for %s is not running; starting one", self.bundle)
            await self.close()
            self._starting = asyncio.create_task(self.start())
        await asyncio.shield(self._starting)

    async def _call(self, op: str, *args):
        await self._ensure_running()
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._frames.transport.write(frame((call_id, op, args)))
            return await asyncio.wait_for(future, self.call_timeout)
        except TimeoutError:
            # A child that stops answering (stuck, or stopped) would hold every request;
            # it is killed, what waited on it fails, and the next call starts a new one.
            LOG.error(
                "compute process for %s did not answer in %.0f s; killing it",
                self.bundle,
                self.call_timeout,
            )
            if self._process is not None and self._process.returncode is None:
                self._process.kill()
            raise ComputeError(
                f"compute process for {self.bundle} did not answer in {self.call_timeout:.0f} s"
            ) from None
        finally:
            self._pending.pop(call_id, None)

    async def batch(self, retriever: str, queries: list[Query]) -> list[Ranked]:
        return await self._call("batch", retriever, queries)

    async def search(self, retriever: str, queries: np.ndarray, k: int):
        return await self._call("search", retriever, queries, k)

    async def close(self) -> None:
        """Stop the child (it exits when its socket closes) and forget what was pending."""
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


def frame(value) -> bytes:
    """``value`` as one length-prefixed pickle frame."""
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(payload)) + payload


NO_FRAME = object()  # what take_frame returns while a frame is incomplete


def take_frame(buffer: bytearray):
    """The value of the first whole frame in ``buffer``, removed from it; ``NO_FRAME``
    while the frame has not fully arrived."""
    if len(buffer) < FRAME.size:
        return NO_FRAME
    (length,) = FRAME.unpack_from(buffer)
    end = FRAME.size + length
    if len(buffer) < end:
        return NO_FRAME
    value = pickle.loads(memoryview(buffer)[FRAME.size : end])
    del buffer[:end]
    return value


class _Inbox:
    """The child's end of the socket pair: whole frames, waiting for one or taking only
    what has already arrived."""

    def __init__(self, connection: socket.socket):
        self.connection = connection
        self._buffer = bytearray()

    def take(self, wait: bool):
        """The next request; None when nothing more has arrived (``wait=False``).
        EOFError once the worker has closed its end."""
        self.connection.setblocking(wait)
        while (value := take_frame(self._buffer)) is NO_FRAME:
            try:
                data = self.connection.recv(1 << 20)
            except BlockingIOError:
                return None
            if not data:
                raise EOFError
            self._buffer += data
        return value


def serve(connection: socket.socket) -> None:
    """The child: read the configuration, load the bundle, then answer requests until the
    socket closes.

    The batches that queued up while one was computing are computed together, as one
    batch, and answered one by one: sent as soon as the worker formed them, they keep the
    process busy without a gap, and merged they cost less than one after the other.
    """
    inbox = _Inbox(connection)
    try:
        config = ComputeConfig.model_validate_json(inbox.take(wait=True))
        limit_native_threads(config.native_threads)
        # The parent verified the checksums of these very files before starting us.
        bundle = load_bundle(
            config.models_dir,
            config.bundle,
            device=config.device,
            threads=config.onnx_threads,
            verify=False,
            index_device=config.index_device,
        )
        warm_up(bundle, config.warm_batch, config.warm_candidates)
    except EOFError:
        return
    except Exception as exc:  # every reason goes back to the parent, which refuses the bundle
        connection.sendall(frame((False, str(exc))))
        return
    settle_heap()
    connection.sendall(frame((True, placement(bundle))))

    def batches(retriever: str, requests: list) -> list:
        """Each request's answers (or its exception), from one merged computation; if that
        fails, each request alone, so one bad request fails only itself."""
        merged = [query for _, (_, queries) in requests for query in queries]
        try:
            answers = compute_batch(bundle.retrievers[retriever], bundle.item_features, merged)
        except Exception as exc:
            if len(requests) == 1:
                return [exc]
            return [batches(retriever, [request])[0] for request in requests]
        parts, start = [], 0
        for _, (_, queries) in requests:
            parts.append(answers[start : start + len(queries)])
            start += len(queries)
        return parts

    while True:
        try:
            waiting = [inbox.take(wait=True)]
            while (more := inbox.take(wait=False)) is not None:
                waiting.append(more)
        except EOFError:
            return
        replies = []
        by_retriever: dict[str, list] = {}
        for call_id, op, call_args in waiting:
            if op == "batch":
                by_retriever.setdefault(call_args[0], []).append((call_id, call_args))
                continue
            replies.append(_reply(call_id, _single, bundle, op, call_args))
        for retriever, requests in by_retriever.items():
            parts = batches(retriever, requests)
            for (call_id, _), part in zip(requests, parts, strict=True):
                replies.append(_reply(call_id, _unless_error, part))
        connection.setblocking(True)
        connection.sendall(b"".join(frame(reply) for reply in replies))


def _single(bundle, op: str, call_args):
    if op == "search":
        retriever, queries, k = call_args
        return bundle.retrievers[retriever].index.search(queries, k)
    raise ValueError(f"unknown compute operation {op!r}")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="recserve compute process (started by a worker)")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    with socket.socket(fileno=args.fd) as connection:
        serve(connection)
    return 0


if __name__ == "__main__":
    sys.exit(main())
