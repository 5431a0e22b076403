"""What each answer showed, logged to Redis behind the answer, never in its way.

``/recommend`` hands each answer to :meth:`ImpressionLog.record`, which only queues it;
one background task per worker writes what has queued in batches, one script per batch
(``service.feedback_store``), lingering briefly for company when traffic is light
(``service.write_behind``). An answer never waits for Redis and never fails for it: a
full queue (Redis slower than the traffic) or a failed batch (Redis down) drops those
impressions and counts them in ``recserve_impressions_dropped_total``. The cost on the
serving path is measured in docs/BENCHMARKS.md ("Impression logging").
"""

from __future__ import annotations

import logging
import time

from pydantic_core import to_json

from service.errors import StoreUnavailable
from service.experiments import Assignment
from service.feedback_store import FeedbackStore, LoggedImpression
from service.metrics import Metrics
from service.write_behind import WriteBehind

LOG = logging.getLogger(__name__)

BATCH = 256  # impressions per script call, at most
FLUSH_SECONDS = 1.0  # how long shutdown waits for the queue to drain


class ImpressionLog:
    """The queue of one worker's impressions and the task that writes them."""

    def __init__(
        self, store: FeedbackStore, *, capacity: int, metrics: Metrics, linger_seconds: float
    ):
        self.store = store
        self.metrics = metrics
        self._queue = WriteBehind(
            self._write, capacity=capacity, max_batch=BATCH, linger_seconds=linger_seconds
        )

    def record(
        self,
        *,
        request_id: str,
        user: str | None,
        assignment: Assignment,
        answer: dict,
    ) -> None:
        """Queue what ``answer`` (the /recommend payload) showed; drop it if the queue is
        full."""
        items = answer["items"]
        impression = LoggedImpression(
            request_id=request_id,
            user=user or "",
            experiment=assignment.experiment,
            arm=assignment.arm_name,
            forced=assignment.forced,
            time=time.time(),
            bundle=answer["bundle"],
            encoder=answer["encoder"],
            reranked=answer["reranked"],
            items=to_json([[item["item_id"], item["score"]] for item in items]).decode(),
            item_ids=to_json([item["item_id"] for item in items]).decode(),
        )
        if not self._queue.put(impression):
            self.metrics.impressions_dropped.labels(reason="queue_full").inc()

    async def _write(self, batch: list[LoggedImpression]) -> None:
        try:
            await self.store.log(batch)
        except StoreUnavailable as exc:
            self.metrics.impressions_dropped.labels(reason="redis").inc(len(batch))
            LOG.debug("dropped %d impressions: %s", len(batch), exc)
        except Exception:  # never let one bad batch stop the log
            self.metrics.impressions_dropped.labels(reason="error").inc(len(batch))
            LOG.exception("dropped %d impressions", len(batch))
        else:
            for imp in batch:
                if not imp.forced:
                    self.metrics.impressions.labels(experiment=imp.experiment, arm=imp.arm).inc()

    async def flush(self, timeout: float = FLUSH_SECONDS) -> bool:
        """Write every impression queued so far without lingering and wait until each is
        written or dropped; False if ``timeout`` passed first."""
        return await self._queue.flush(timeout)

    async def close(self, timeout: float = FLUSH_SECONDS) -> None:
        """Write what is queued (at most ``timeout``; the rest is dropped), then stop."""
        left = await self._queue.close(timeout)
        if left:
            self.metrics.impressions_dropped.labels(reason="shutdown").inc(left)
