"""POST /events: append behaviour to users' histories in Redis."""

from __future__ import annotations

import time
from collections import defaultdict

from fastapi import APIRouter, Depends

from service.api.access import require
from service.api.deps import CurrentSettings, State
from service.api.schemas import Event, EventsResponse
from service.errors import InvalidField, StoreUnavailable

router = APIRouter(tags=["events"], dependencies=[Depends(require("events:write"))])

FUTURE_TOLERANCE_SECONDS = 86_400  # clock skew we accept from clients


@router.post("/events", response_model=EventsResponse)
async def post_events(
    body: Event | list[Event], state: State, settings: CurrentSettings
) -> EventsResponse:
    """Store one event or a list of events; a retried event (same item and ts) adds nothing.

    Redis unreachable: 503 with Retry-After, and nothing is acknowledged that was not stored.
    """
    events = body if isinstance(body, list) else [body]
    if len(events) > settings.max_events_per_request:
        raise InvalidField(f"body: at most {settings.max_events_per_request} events per request")
    latest = time.time() + FUTURE_TOLERANCE_SECONDS
    for position, event in enumerate(events):
        if event.ts > latest:
            where = f"body[{position}].ts" if isinstance(body, list) else "body.ts"
            raise InvalidField(f"{where}: {event.ts} lies more than a day in the future")
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
    return EventsResponse(received=len(events), added=added)
