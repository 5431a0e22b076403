"""Dependencies the routes declare: the worker state, its recommender, settings, admin.

Every one is a coroutine: FastAPI runs a plain ``def`` dependency in its thread pool, one
thread hop per dependency per request, which cost /recommend much of its throughput
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from service.api.access import HEADER, identify
from service.errors import AdminDisabled, AdminTokenRequired, ApiKeyRequired
from service.recommender import Recommender
from service.settings import Settings
from service.state import AppState


async def get_state(request: Request) -> AppState:
    return request.app.state.recserve


State = Annotated[AppState, Depends(get_state)]


async def get_recommender(state: State) -> Recommender:
    return state.require_recommender()


async def get_state_settings(state: State) -> Settings:
    """The settings this app was built with (not re-read from the environment)."""
    return state.settings


CurrentRecommender = Annotated[Recommender, Depends(get_recommender)]
CurrentSettings = Annotated[Settings, Depends(get_state_settings)]


async def require_admin(
    request: Request,
    settings: CurrentSettings,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """Bearer token, compared in constant time, or an API key with the "admin" scope;
    admin disabled answers 404.

    Without a token the service only starts in dev mode, and then admin is open.
    """
    if not settings.admin_enabled:
        raise AdminDisabled()
    if settings.api_keys and request.headers.get(HEADER):
        try:
            if identify(settings, request.headers.get(HEADER)).may("admin"):
                return
        except ApiKeyRequired:
            pass  # not a key: the admin token decides
    expected = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not expected and settings.dev_mode:
        return
    scheme, _, given = (authorization or "").partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )
    if not valid or not expected:
        raise AdminTokenRequired()


Admin = Depends(require_admin)
