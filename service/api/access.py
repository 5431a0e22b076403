"""Who may call what: optional API keys with scopes (``RECSERVE_API_KEYS``).

Without keys every endpoint but /admin is open: the service then trusts the network it
sits in, typically behind an application that authenticates its users. With keys, a
request carries ``X-API-Key``; the key is compared in constant time against each
configured one, and each route asks for the scope it needs (``service.settings.Scope``).
The trust model is in docs/RELIABILITY.md.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from service.errors import ApiKeyRequired, Forbidden
from service.settings import Settings

HEADER = "x-api-key"


@dataclass(frozen=True)
class Caller:
    """The client behind a request: a named key's scopes, or anyone (no keys configured)."""

    name: str | None  # None: keys are not configured
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        """Forbidden unless this caller may use ``scope``."""
        if self.name is not None and scope not in self.scopes:
            raise Forbidden(f"X-API-Key: key {self.name!r} lacks the scope {scope!r}")

    def may(self, scope: str) -> bool:
        return self.name is None or scope in self.scopes


ANYONE = Caller(None, frozenset())


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def identify(settings: Settings, given: str | None) -> Caller:
    """The caller that ``given`` (the X-API-Key header) identifies; ApiKeyRequired when
    keys are configured and it matches none. Every key is compared, so the time taken
    does not say which key came close."""
    if not settings.api_keys:
        return ANYONE
    found = None
    for key in settings.api_keys:
        if _equal(given or "", key.key.get_secret_value()) and given:
            found = key
    if found is None:
        raise ApiKeyRequired()
    return Caller(found.name, frozenset(found.scopes))


async def get_caller(request: Request) -> Caller:
    """The request's caller (a coroutine of the Request alone: LeanRoute can await it)."""
    return identify(request.app.state.recserve.settings, request.headers.get(HEADER))


def require(scope: str):
    """A dependency that admits only callers with ``scope``."""

    async def check(request: Request) -> None:
        (await get_caller(request)).require(scope)

    check.__name__ = f"require_{scope.replace(':', '_')}"
    return check
