"""Which impression an event answers, and what the impression earns by it.

An event with a ``request_id`` answers that request's impression, if it belongs to the same
user (or to no user) and is still within the attribution window. Another worker may still
hold that impression (impressions are written behind the answers, lingering for company up
to ``RECSERVE_WRITE_LINGER_MS``), so a request id not found is looked up once more after
``AttributionRules.unwritten_seconds``; only recent events naming an unknown request pay
that wait.
An event without one answers the user's impressions shown from
``attribution_window_seconds`` before its time up to ``attribution_clock_skew_seconds``
after it (client clocks drift from the server's).

What an impression earns, each at most once (``service.feedback_store`` keeps the marks):

- for a typed event (``click``, ``purchase``, ... ) whose item it showed: its first event of
  the type (the impression was clicked: the numerator of the click-through rate) and one
  attributed event per distinct item. Without a request id the most recent impression that
  showed the item takes it, so one click never counts for two impressions;
- for any event whose item is among its first ``hit_k`` items: a hit (the numerator of hit
  rate at k, the online twin of the offline Recall@k of a next-item evaluation). Every
  impression in the window that showed the item earns it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from service.feedback_store import HIT, FeedbackStore, Mark, Shown
from service.metrics import Metrics


@dataclass(frozen=True)
class Feedback:
    """One event as attribution reads it."""

    user: str
    item: str
    ts: int
    type: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class AttributionRules:
    window: int  # seconds an impression stays attributable
    skew: int  # seconds an event's time may lie before the impression it answers
    hit_k: int
    # How long an impression may still be on its way to Redis from the worker that answered
    # (its linger and the write itself): a named request not found is read again after it.
    unwritten_seconds: float = 0.0


def marks_for(event: Feedback, candidates: list[Shown], rules: AttributionRules) -> list[Mark]:
    """The marks ``event`` earns among ``candidates`` (the impressions it may answer)."""
    showing = sorted(
        (shown for shown in candidates if event.item in shown.items),
        key=lambda shown: shown.time,
        reverse=True,
    )
    marks = []
    if event.type is not None and showing:
        latest = showing[0]
        marks += [Mark(latest, event.type), Mark(latest, event.type, event.item)]
    marks += [Mark(shown, HIT) for shown in showing if shown.items.index(event.item) < rules.hit_k]
    return marks


async def attribute(
    store: FeedbackStore, events: list[Feedback], rules: AttributionRules, metrics: Metrics
) -> int:
    """Attribute ``events`` to the impressions they answer and count what is new; how many
    typed events found an impression."""
    named = sorted({e.request_id for e in events if e.request_id is not None})
    by_id = dict(zip(named, await store.shown(named), strict=True))
    # Only an impression shown in the last unwritten_seconds can still be on its way, and
    # an event answering it is no older than that (its clock up to the skew behind ours):
    # late events, expired impressions and unknown ids do not wait.
    fresh = time.time() - rules.skew - rules.unwritten_seconds
    unwritten = sorted(
        {
            e.request_id
            for e in events
            if e.request_id is not None and by_id[e.request_id] is None and e.ts >= fresh
        }
    )
    if unwritten and rules.unwritten_seconds > 0:
        await asyncio.sleep(rules.unwritten_seconds)
        by_id.update(zip(unwritten, await store.shown(unwritten), strict=True))
    unnamed = [e for e in events if e.request_id is None]
    recent: dict[str, list[Shown]] = {}
    if unnamed:
        users = sorted({e.user for e in unnamed})
        since = min(e.ts for e in unnamed) - rules.window
        until = max(e.ts for e in unnamed) + rules.skew
        ids = await store.recent(users, since, until)
        flat = sorted({rid for row in ids for rid in row})
        found = dict(zip(flat, await store.shown(flat), strict=True))
        recent = {
            user: [found[rid] for rid in row if found[rid] is not None]
            for user, row in zip(users, ids, strict=True)
        }
    marks: list[Mark] = []
    attributed = 0
    for event in events:
        if event.request_id is not None:
            shown = by_id[event.request_id]
            candidates = [shown] if shown is not None and shown.user in ("", event.user) else []
        else:
            candidates = [
                shown
                for shown in recent[event.user]
                if event.ts - rules.window <= shown.time <= event.ts + rules.skew
            ]
        earned = marks_for(event, candidates, rules)
        attributed += any(mark.outcome == event.type for mark in earned)
        marks += earned
    for mark, new in zip(marks, await store.mark(marks), strict=True):
        if new and mark.count is not None:
            labels = {"experiment": mark.shown.experiment, "arm": mark.shown.arm}
            if mark.item is None:
                metrics.outcomes.labels(outcome=mark.outcome, **labels).inc()
            else:
                metrics.attributed_events.labels(type=mark.outcome, **labels).inc()
    return attributed
