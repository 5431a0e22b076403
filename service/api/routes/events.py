"""POST /events: append behaviour to users' histories in Redis, and attribute it to the
impressions it answers (``service.attribution``)."""

from __future__ import annotations

import time
from collections import defaultdict

from fastapi import APIRouter, Depends

from service.api.access import require
from service.api.deps import CurrentSettings, State
from service.api.schemas import Event, EventsResponse
from service.attribution import Feedback, attribute
from service.errors import InvalidField, StoreUnavailable, excerpt

router = APIRouter(tags=["events"], dependencies=[Depends(require("events:write"))])

FUTURE_TOLERANCE_SECONDS = 86_400  # clock skew we accept from clients


@router.post("/events", response_model=EventsResponse)
async def post_events(
    body: Event | list[Event], state: State, settings: CurrentSettings
) -> EventsResponse:
    """Store one event or a list of events; a retried event (same item and ts) adds nothing.

    A typed event (``type``) is also attributed to the impression that showed its item,
    named by ``request_id`` or found in the user's recent impressions; every event may
    make an impression a hit. Attribution is idempotent too: a retry counts nothing twice.

    Redis unreachable: 503 with Retry-After, and nothing is acknowledged that was not stored.
    """
    events = body if isinstance(body, list) else [body]
    if len(events) > settings.max_events_per_request:
        raise InvalidField(f"body: at most {settings.max_events_per_request} events per request")
    latest = time.time() + FUTURE_TOLERANCE_SECONDS
    for position, event in enumerate(events):
        where = f"body[{position}]" if isinstance(body, list) else "body"
        if event.ts > latest:
            raise InvalidField(f"{where}.ts: {event.ts} lies more than a day in the future")
        if event.type is not None and event.type not in settings.event_types:
            known = ", ".join(settings.event_types)
            raise InvalidField(
                f"{where}.type: {excerpt(event.type)} is not one of {known} (RECSERVE_EVENT_TYPES)"
            )
    if state.cache is None:
        raise StoreUnavailable("no behaviour store configured")
    per_user: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for event in events:
        per_user[event.user_id].append((event.item_id, event.ts))
    added = 0
    for user_id, user_events in per_user.items():
        added += await state.cache.append_events(user_id, user_events)
    state.metrics.events.labels(outcome="added").inc(added)
    state.metrics.events.labels(outcome="duplicate").inc(len(events) - added)
    attributed = 0
    if state.feedback is not None:
        if state.impressions is not None:
            # An impression this worker still holds (lingering for company) is written
            # first, so that an event that follows its answer quickly still finds it.
            await state.impressions.flush()
        feedback = [
            Feedback(e.user_id, e.item_id, e.ts, type=e.type, request_id=e.request_id)
            for e in events
        ]
        attributed = await attribute(state.feedback, feedback, state.attribution, state.metrics)
    return EventsResponse(received=len(events), added=added, attributed=attributed)
