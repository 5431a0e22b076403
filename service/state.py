"""The state of one worker: the served bundle, the behaviour cache, metrics, and reloads.

A reload loads and verifies the new bundle off the event loop, then swaps one reference.
Requests in flight keep the ``Recommender`` they started with, so none fails during a swap.
A bundle that fails to load is refused: the old one keeps serving and ``/readyz`` says why.

Every worker follows ``models/CURRENT`` two ways: it polls the file, and it listens on its
deployment's Redis reload channel, where ``POST /admin/reload`` publishes a signed signal,
so all workers swap promptly. A signal names no bundle: a worker that accepts one re-reads
CURRENT, at most once per ``reload_signal_interval_seconds`` (``service.reload_signals``
says what is accepted). Whatever starts it, a reload that finds CURRENT naming the served
bundle clears the last error: none is left standing while CURRENT is fine.

Every worker also follows the catalogue API's writes in Redis (``service.catalogue_store``):
it hears each write's announcement and asks for the version every
``catalogue_poll_seconds`` besides, reads the records written since the version it holds,
and applies them to the served recommender. It keeps every record it has read, so a
reloaded bundle starts from all of them, and while Redis is unreachable it serves the last
catalogue it read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from starlette.concurrency import run_in_threadpool

from service.attribution import AttributionRules
from service.bundle import current_name, load_bundle, settle_heap
from service.cache import BehaviourCache
from service.catalogue import ItemRecord
from service.catalogue_store import CatalogueStore
from service.compute import (
    ComputeConfig,
    LoneInWorker,
    ProcessCompute,
    SharedCompute,
    ThreadCompute,
    compute_mode,
    lone_in_worker,
)
from service.devices import limit_native_threads
from service.errors import (
    BundleError,
    CatalogueUnavailable,
    ComputeError,
    ExperimentError,
    NotReady,
    StoreUnavailable,
)
from service.experiments import Arm, Experiment, check_arm, load_experiment
from service.feedback_store import FeedbackStore
from service.impressions import ImpressionLog
from service.metrics import Metrics
from service.pipeline import warm_up
from service.recommender import Recommender
from service.reload_signals import ReloadSignals, deployment_id
from service.settings import Settings

LOG = logging.getLogger(__name__)

STOP_ATTEMPTS = 5  # cancellations sent to a background task at shutdown
STOP_WAIT_SECONDS = 1.0  # how long each one is given
IGNORED_LOG_SECONDS = 60.0  # at most one warning per this long about ignored signals
# Beyond its linger, how long a batch of impressions of another worker may take to reach
# Redis (one script call), with room for a loaded machine.
IMPRESSION_WRITE_SECONDS = 0.05


def check_experiment(
    experiment: Experiment | None, recommenders: dict[str, Recommender], current: str
) -> None:
    """ExperimentError naming the experiment and arm if an arm's bundle (``current`` for
    an arm that names none; ``recommenders`` by bundle name) cannot serve it."""
    if experiment is None:
        return
    for arm in experiment.arms:
        recommender = recommenders[arm.bundle or current]
        heads = {
            name: "ctr_head" in retriever.paths
            for name, retriever in recommender.bundle.retrievers.items()
        }
        try:
            check_arm(arm, heads, recommender.default_encoder)
        except ExperimentError as exc:
            raise ExperimentError(
                f"experiment {experiment.name}, {exc} {recommender.bundle.name}"
            ) from None


class AppState:
    def __init__(self, settings: Settings, cache: BehaviourCache | None, metrics: Metrics):
        self.settings = settings
        self.cache = cache
        self.metrics = metrics
        self.recommender: Recommender | None = None
        # The bundles the experiment's arms name besides CURRENT's, by name.
        self.arm_recommenders: dict[str, Recommender] = {}
        self.last_error: str | None = None
        self._failed_name: str | None = None
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._retiring: set[asyncio.Task] = set()
        self.signals = ReloadSignals.from_settings(settings)
        self._reread = asyncio.Event()  # an accepted signal asks for a re-read of CURRENT
        self._ignored_logged = float("-inf")
        client = getattr(cache, "client", None)
        self.catalogue = (
            CatalogueStore(client, settings.key_prefix, deployment_id(settings))
            if client is not None
            else None
        )
        # The running experiment (ExperimentError here stops the start-up; on a reload it
        # refuses the reload), and where impressions and their outcomes go.
        self.experiment: Experiment | None = load_experiment(settings.experiment_file)
        # Marks and lookups outlive the window by the clock skew an event may have.
        kept = settings.attribution_window_seconds + settings.attribution_clock_skew_seconds
        self.feedback = (
            FeedbackStore(
                client,
                settings.key_prefix,
                deployment_id(settings),
                window=kept,
                stream_cap=settings.impressions_stream_cap,
            )
            if client is not None and settings.impressions_enabled
            else None
        )
        self.impressions = (
            ImpressionLog(
                self.feedback,
                capacity=settings.impressions_queue,
                metrics=metrics,
                linger_seconds=settings.write_linger_ms / 1000,
            )
            if self.feedback is not None
            else None
        )
        self.attribution = AttributionRules(
            window=settings.attribution_window_seconds,
            skew=settings.attribution_clock_skew_seconds,
            hit_k=settings.hit_k,
            unwritten_seconds=settings.write_linger_ms / 1000 + IMPRESSION_WRITE_SECONDS,
        )
        # Every catalogue record read from Redis, and the version they make up.
        self.catalogue_version = 0
        self.catalogue_records: dict[str, ItemRecord] = {}
        self._catalogue_heard = asyncio.Event()
        # Applying writes and swapping bundles exclude each other, so that a new bundle's
        # recommender starts from every record read and misses none read meanwhile.
        self._catalogue_lock = asyncio.Lock()
        # One thread computes every batch (ONNX, faiss, the head): on a small machine a
        # second one only contends with the event loop for the cores and the GIL.
        self.executor = ThreadPoolExecutor(
            max_workers=settings.compute_threads,
            thread_name_prefix="recserve-compute",
            initializer=limit_native_threads,
            initargs=(settings.native_threads,),
        )

    def require_recommender(self, arm: Arm | None = None) -> Recommender:
        """What serves a request of ``arm`` (None: CURRENT's bundle); NotReady before the
        first bundle."""
        recommender = self.recommender
        if recommender is None:
            raise NotReady(self.last_error or "no bundle loaded")
        if arm is not None and arm.bundle is not None and arm.bundle != recommender.bundle.name:
            # The experiment and these are swapped together, so its arms' bundles are here.
            return self.arm_recommenders[arm.bundle]
        return recommender

    def serving(self) -> list[Recommender]:
        """Every recommender serving requests: CURRENT's and the arms' bundles'."""
        main = [self.recommender] if self.recommender is not None else []
        return main + list(self.arm_recommenders.values())

    @property
    def bundle_name(self) -> str | None:
        return self.recommender.bundle.name if self.recommender else None

    async def reload(self, name: str | None = None) -> str:
        """Serve bundle ``name`` (default: CURRENT) and the experiment's file as they are
        now; BundleError if refused, and then everything served before keeps serving.

        Every reload re-reads the experiment: editing the file, then a reload, is how an
        experiment starts, changes or ends. The bundles its arms name are loaded beside
        CURRENT's (kept where already served) and swapped in with it."""
        async with self._lock:
            opened: list[Recommender] = []
            try:
                experiment = load_experiment(self.settings.experiment_file)
                name = name or current_name(self.settings.models_dir)
                wanted = [name] + (experiment.bundles() if experiment is not None else [])
                held = {r.bundle.name: r for r in self.serving()}
                fresh: dict[str, Recommender] = {}
                for bundle_name in dict.fromkeys(wanted):
                    if bundle_name not in held:
                        opened.append(await self._open(bundle_name))
                    fresh[bundle_name] = held.get(bundle_name) or opened[-1]
                check_experiment(experiment, fresh, name)
                if opened:
                    await self._catalogue_lock.acquire()
                    try:
                        if self.catalogue_records:
                            for recommender in opened:
                                await recommender.apply_catalogue(
                                    self.catalogue_version, dict(self.catalogue_records)
                                )
                    except BaseException:
                        self._catalogue_lock.release()
                        raise
            except BaseException as exc:
                for recommender in opened:
                    await recommender.close()
                if not isinstance(exc, Exception):
                    raise  # cancelled: nothing to report
                self.last_error = f"reload refused: {exc}"
                self._failed_name = name
                self.metrics.reloads.labels(outcome="refused").inc()
                LOG.error("%s; still serving %s", self.last_error, self.bundle_name)
                if isinstance(exc, BundleError):
                    raise
                raise BundleError(str(exc)) from exc
            retired = [r for r in self.serving() if r not in fresh.values()]
            changed = self.bundle_name != name
            self.recommender = fresh.pop(name)
            self.arm_recommenders = fresh
            self.experiment = experiment
            if opened:
                self._catalogue_lock.release()
            for recommender in retired:
                # Requests that took it just before the swap still finish on it; once they
                # have, its bundle is collected with the heap settled anew.
                closing = asyncio.create_task(recommender.close())
                closing.add_done_callback(lambda _: settle_heap())
                self._retiring.add(closing)
            self._retiring = {task for task in self._retiring if not task.done()}
            # A refusal before no longer applies: what is named is what is served.
            self.last_error = None
            self._failed_name = None
            if changed:
                settle_heap()
                self.metrics.reloads.labels(outcome="loaded").inc()
                self.metrics.serving(name)
                LOG.info("serving bundle %s", name)
            return name

    async def _open(self, name: str) -> Recommender:
        """Bundle ``name`` loaded, verified, warmed up and started (not yet serving)."""
        settings = self.settings
        mode = compute_mode(settings)
        lone = lone_in_worker(settings, mode)
        here = mode == "thread" or lone
        # With a compute process the models are loaded there, and here only where this
        # worker computes too.
        bundle = await run_in_threadpool(
            partial(
                load_bundle,
                settings.models_dir,
                name,
                device=settings.device,
                threads=settings.onnx_threads,
                models=here,
                index_device=settings.index_device,
            )
        )
        if here:
            # On the executor that computes the batches, under its native-thread limits.
            await asyncio.get_running_loop().run_in_executor(
                self.executor, warm_up, bundle, settings.max_batch, settings.candidates
            )
        limits = {
            "call_timeout": settings.compute_timeout_seconds,
            "stall_seconds": settings.compute_stall_seconds,
        }
        config = ComputeConfig.from_settings(settings, name)
        if mode == "shared":
            compute = SharedCompute(config, settings.compute_socket, **limits)
        elif mode == "process":
            compute = ProcessCompute(config, **limits)
        else:
            compute = ThreadCompute(bundle, self.executor)
        if lone:
            compute = LoneInWorker(ThreadCompute(bundle, self.executor), compute)
        recommender = Recommender.from_settings(
            bundle, settings, compute=compute, on_batch=self.metrics.batch_size.observe
        )
        # Refuse a bundle that lacks the configured default encoder up front.
        recommender.retriever(None)
        await recommender.start()
        return recommender

    async def _poll_current(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_poll_seconds)
            try:
                name = current_name(self.settings.models_dir)
            except BundleError as exc:
                self.last_error = str(exc)
                continue
            # A bundle that was refused is retried only once CURRENT names another one.
            if name not in (self.bundle_name, self._failed_name):
                with contextlib.suppress(BundleError):
                    await self.reload(name)
            elif name == self.bundle_name and self.last_error is not None:
                # CURRENT is back on what is served: the error no longer applies. (A re-read
                # under the reload lock, in case CURRENT moved on meanwhile.)
                with contextlib.suppress(BundleError):
                    await self.reload()

    async def announce_reload(self) -> int | None:
        """Signal this deployment's other workers to re-read CURRENT; how many listeners
        got the signal (None: Redis unreachable, or no token to sign with)."""
        if self.cache is None or not self.signals.enabled:
            return None
        try:
            return await self.cache.publish_reload(self.signals.channel, self.signals.sign())
        except StoreUnavailable:
            return None  # the other workers still pick it up by polling CURRENT

    def on_signal(self, data: bytes | str | None) -> str:
        """A message heard on the reload channel: counted by outcome; an accepted signal
        asks for a re-read of CURRENT, anything else is ignored."""
        outcome = self.signals.check(data)
        self.metrics.reload_signals.labels(outcome=outcome).inc()
        if outcome == "accepted":
            self._reread.set()
            return outcome
        now = asyncio.get_running_loop().time()
        if now - self._ignored_logged >= IGNORED_LOG_SECONDS:
            self._ignored_logged = now
            LOG.warning(
                "ignored a message on %s (%s); only signed signals of this deployment "
                "trigger a re-read of CURRENT (recserve_reload_signals_total counts them)",
                self.signals.channel,
                outcome,
            )
        return outcome

    async def _listen(self) -> None:
        """Hear the reload channel; reconnect on failure."""
        client = getattr(self.cache, "client", None)
        if client is None or not self.signals.enabled:
            return
        while True:
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.signals.channel)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.on_signal(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: try again shortly, polling covers us
                LOG.debug("reload channel unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _reread_current(self) -> None:
        """Re-read CURRENT when signalled: the signals that arrive while one re-read runs,
        and for ``reload_signal_interval_seconds`` after it, make one more, so a flood of
        them costs at most one re-read per interval."""
        while True:
            await self._reread.wait()
            self._reread.clear()
            with contextlib.suppress(BundleError):
                await self.reload()
            await asyncio.sleep(self.settings.reload_signal_interval_seconds)

    async def follow_catalogue(self) -> bool:
        """Read the catalogue writes made since the version held and serve them; False
        while Redis cannot be reached (the last catalogue read keeps serving)."""
        if self.catalogue is None:
            return False
        async with self._catalogue_lock:
            try:
                version, records = await self.catalogue.changes_since(self.catalogue_version)
            except StoreUnavailable:
                return False
            if version < self.catalogue_version:
                # Redis lost the catalogue (flushed, or a new server): keep what was read,
                # apply whatever it holds now, and follow its versions from here.
                LOG.error(
                    "the catalogue's version went back from %d to %d; re-reading it",
                    self.catalogue_version,
                    version,
                )
                version, records = await self.catalogue.changes_since(0)
            elif not records:
                self.catalogue_version = version
                return True
            # Before the version moves on: if this fails, the next read returns them.
            for recommender in self.serving():
                await recommender.apply_catalogue(version, records)
            self.catalogue_records.update(records)
            self.catalogue_version = version
            self.metrics.catalogue_version.set(version)
            return True

    async def write_catalogue(self, records: dict[str, ItemRecord]) -> int:
        """Store ``records`` as one catalogue write and serve it here before returning
        (the other workers hear of it); the new version. CatalogueUnavailable when Redis
        cannot take it: then nothing was written."""
        if self.catalogue is None:
            raise CatalogueUnavailable("no catalogue store configured")
        try:
            version = await self.catalogue.write(records)
        except StoreUnavailable as exc:
            raise CatalogueUnavailable(str(exc)) from exc
        try:
            await self.follow_catalogue()
        except ComputeError as exc:
            # Stored all the same: the follower applies it once the compute process is back.
            LOG.warning("catalogue version %d stored, not yet served here: %s", version, exc)
        return version

    def on_catalogue_version(self, version: int) -> None:
        """An announcement heard: a version past the one held wakes the follower."""
        if version > self.catalogue_version:
            self._catalogue_heard.set()

    async def _follow_catalogue(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._catalogue_heard.wait(), self.settings.catalogue_poll_seconds
                )
            self._catalogue_heard.clear()
            try:
                await self.follow_catalogue()
            except asyncio.CancelledError:
                raise
            except Exception:  # a record this version cannot serve: logged, retried
                LOG.exception("applying the catalogue's writes failed; retrying")
                await asyncio.sleep(1.0)

    async def _hear_catalogue(self) -> None:
        while True:
            try:
                await self.catalogue.listen(self.on_catalogue_version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: the poll covers us meanwhile
                LOG.debug("catalogue channel unavailable (%s); retrying", exc)
            await asyncio.sleep(1.0)

    def start_background(self) -> None:
        if self.settings.reload_poll_seconds > 0:
            self._tasks.append(asyncio.create_task(self._poll_current()))
        self._tasks.append(asyncio.create_task(self._listen()))
        self._tasks.append(asyncio.create_task(self._reread_current()))
        if self.catalogue is not None:
            self._tasks.append(asyncio.create_task(self._follow_catalogue()))
            self._tasks.append(asyncio.create_task(self._hear_catalogue()))

    async def close(self) -> None:
        """Stop serving: the current and the retiring recommenders finish what they have in
        flight and stop their compute; then the compute thread goes."""
        for recommender in self.serving():
            await recommender.close()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        self.executor.shutdown(cancel_futures=True)

    async def stop_background(self) -> None:
        # A cancellation can be lost inside a library: on Python 3.11, asyncio.wait_for (which
        # redis-py uses to send commands) swallows one that races with the send completing,
        # and the listener then blocks for ever. So cancel again while a task is still running
        # and never wait unboundedly: shutdown must not hang.
        if self.impressions is not None:
            await self.impressions.close()  # bounded: what Redis cannot take is dropped
        pending = set(self._tasks)
        for _ in range(STOP_ATTEMPTS):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=STOP_WAIT_SECONDS)
        if pending:
            LOG.warning("%d background task(s) did not stop; abandoning them", len(pending))
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                LOG.debug("background task ended with %r", task.exception())
        self._tasks.clear()
