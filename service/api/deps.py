"""Dependencies the routes declare: the worker state, its recommender, settings, admin.

Every one is a coroutine: FastAPI runs a plain ``def`` dependency in its thread pool, one
thread hop per dependency per request, which cost /recommend much of its throughput
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from service.api.access import identify
from service.errors import (
    AdminDisabled,
    AdminTokenRequired,
    ApiKeyRequired,
    CatalogueTokenRequired,
    MetricsTokenRequired,
)
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


def bearer_matches(authorization: str | None, expected: str) -> bool:
    """``Authorization: Bearer <expected>``, compared in constant time; never for an empty
    ``expected``."""
    scheme, _, given = (authorization or "").partition(" ")
    return (
        bool(expected)
        and scheme.lower() == "bearer"
        and hmac.compare_digest(
            given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
        )
    )


def admin_authorized(
    settings: Settings, authorization: str | None, api_key: str | None = None
) -> bool:
    """Whether ``authorization`` (the admin token) or ``api_key`` (a key with the "admin"
    scope) opens the admin endpoints (never while they are off).

    Without a token the service only starts in dev mode, and then admin is open.
    """
    if not settings.admin_enabled:
        return False
    if settings.api_keys and api_key:
        try:
            if identify(settings, api_key).may("admin"):
                return True
        except ApiKeyRequired:
            pass  # not a key: the admin token decides
    expected = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not expected and settings.dev_mode:
        return True
    return bearer_matches(authorization, expected)


async def require_admin(
    settings: CurrentSettings,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """The admin token or an admin API key, compared in constant time; admin disabled
    answers 404."""
    if not settings.admin_enabled:
        raise AdminDisabled()
    if not admin_authorized(settings, authorization, x_api_key):
        raise AdminTokenRequired()


async def is_admin(
    settings: CurrentSettings,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> bool:
    """For answers that add details for the operator: whether the admin came."""
    return admin_authorized(settings, authorization, x_api_key)


async def require_catalogue_write(
    settings: CurrentSettings,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """Catalogue writes: the catalogue token, the admin token (or an admin key), or an
    API key with the ``catalogue:write`` scope; never open to anyone, with or without
    keys, unless admin is (dev mode without a token)."""
    if admin_authorized(settings, authorization, x_api_key):
        return
    token = settings.catalogue_token.get_secret_value() if settings.catalogue_token else ""
    if bearer_matches(authorization, token):
        return
    if settings.api_keys and x_api_key:
        identify(settings, x_api_key).require("catalogue:write")
        return
    raise CatalogueTokenRequired()


async def require_metrics_access(
    settings: CurrentSettings,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """With ``RECSERVE_METRICS_TOKEN`` set, /metrics needs it as a bearer token."""
    if settings.metrics_token is not None and not bearer_matches(
        authorization, settings.metrics_token.get_secret_value()
    ):
        raise MetricsTokenRequired()


Admin = Depends(require_admin)
CatalogueWrite = Depends(require_catalogue_write)
IsAdmin = Annotated[bool, Depends(is_admin)]
MetricsAccess = Depends(require_metrics_access)
