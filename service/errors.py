"""The service package's exceptions, in one place; ``service.api.errors`` maps them to HTTP.

RecserveError                 everything the service raises on purpose
├── BundleError               a bundle is missing, malformed or fails its checksums
│   └── ReloadRefused         /admin/reload could not serve the new bundle (409)
├── DeviceError               an accelerator was asked for but is not available
├── ExperimentError           the experiment cannot be served (no start-up; a reload is refused)
├── StoreUnavailable          the behaviour store (Redis) is unreachable (503, Retry-After)
├── NotReady                  no bundle is loaded yet (503, Retry-After)
├── ComputeError              a computation failed in the compute process (500)
│   └── ComputeUnavailable    no compute process answers: died, stalled (503, Retry-After)
└── RequestError              the request cannot be served as asked (4xx)
    ├── InvalidField          a field is well-typed but out of bounds (422)
    │   └── InvalidMetadata   an item's metadata cannot be featurized (names the field)
    ├── UnknownEncoder        the encoder named in the request is not in the bundle (422)
    ├── UnknownItem           an item id is not in the catalogue (404)
    ├── NoHistory             no history in the request and none stored (404)
    ├── UnsupportedMediaType  a body that is not declared application/json (415)
    ├── AdminDisabled         admin endpoints are switched off (404)
    ├── ApiKeyRequired        API keys are configured and none valid was sent (401)
    ├── Forbidden             the key lacks the scope, or a setting refuses the request (403)
    └── TokenRequired         no valid bearer token (401, WWW-Authenticate)
        ├── AdminTokenRequired    ... for the admin endpoints
        └── MetricsTokenRequired  ... for /metrics (RECSERVE_METRICS_TOKEN)

What a message copies from outside (a client's ids, a file's contents) goes through
``excerpt``: bounded and escaped, so no input can flood a log line, an answer or /readyz.
"""

from __future__ import annotations


class RecserveError(Exception):
    """Base class of everything the service raises on purpose."""


class BundleError(RecserveError):
    """A bundle cannot be loaded; the message names the file and the reason."""


class ReloadRefused(BundleError):
    """A reload asked for over HTTP was refused; ``serving`` is what still serves."""

    def __init__(self, message: str, serving: str | None):
        super().__init__(message)
        self.serving = serving


class DeviceError(RecserveError):
    """An accelerator was requested explicitly but cannot be used."""


class ExperimentError(RecserveError):
    """The experiment (RECSERVE_EXPERIMENT_FILE) cannot be served; the message names the
    file and the field, or the arm and what the bundle lacks."""


class StoreUnavailable(RecserveError):
    """The behaviour store (Redis) is unreachable; reads degrade, writes answer 503."""


class CatalogueUnavailable(StoreUnavailable):
    """The catalogue's store (Redis) is unreachable or not configured: a catalogue write
    answers 503 and writes nothing; reads serve the last catalogue read."""


class NotReady(RecserveError):
    """No bundle is loaded (the service answers 503)."""


class ComputeError(RecserveError):
    """A computation failed where batches are computed; only its own request fails."""


class ComputeUnavailable(ComputeError):
    """The compute process died or stalled; its replacement is being started."""


class RequestError(RecserveError):
    """The request is well-formed but cannot be served as asked."""

    status_code = 400
    headers: dict[str, str] | None = None


class InvalidField(RequestError):
    """A field passed validation of its type but breaks a limit of this service; the
    message starts with the field's location (``body[3].ts: ...``)."""

    status_code = 422


class InvalidMetadata(InvalidField):
    """An item's metadata cannot be turned into the metadata encoder's inputs; the message
    names the item and the field (``metadata[3].genres: expected a list of strings``)."""


class UnknownEncoder(RequestError):
    status_code = 422


class UnknownItem(RequestError):
    status_code = 404


class NoHistory(RequestError):
    status_code = 404


class AdminDisabled(RequestError):
    status_code = 404

    def __init__(self) -> None:
        super().__init__("Not Found")


class UnsupportedMediaType(RequestError):
    """A request with a body must declare it ``application/json`` (see
    service.api.middleware.RequestBodies for why)."""

    status_code = 415

    def __init__(self) -> None:
        super().__init__("content-type: must be application/json for a request with a body")


class TokenRequired(RequestError):
    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}


class AdminTokenRequired(TokenRequired):
    def __init__(self) -> None:
        super().__init__("admin token required")


class CatalogueTokenRequired(TokenRequired):
    """A catalogue write without the catalogue token, the admin token or a key with the
    ``catalogue:write`` scope."""

    def __init__(self) -> None:
        super().__init__(
            "catalogue writes need the catalogue or admin token, or an X-API-Key with the "
            "catalogue:write scope"
        )


class MetricsTokenRequired(TokenRequired):
    def __init__(self) -> None:
        super().__init__("metrics token required")


class ApiKeyRequired(RequestError):
    status_code = 401
    headers = {"WWW-Authenticate": "ApiKey"}

    def __init__(self) -> None:
        super().__init__("X-API-Key: a valid API key is required")


class Forbidden(RequestError):
    """The caller may not do this; the message names the scope or the field."""

    status_code = 403


# --------------------------------------------------------------------------- messages

EXCERPT_CHARS = 200  # the most of any outside text a message or log line copies
_ESCAPES = {"'": "\\'", "\\": "\\\\"}


def excerpt(value: object, limit: int = EXCERPT_CHARS, *, quote: bool = True) -> str:
    """Outside text made fit for a log line or an error message: what is not printable
    (newlines, control and bidirectional-override characters) escaped as in a Python
    literal, cut to at most ``limit`` characters, quoted (unless ``quote`` is false), and
    followed by how many characters were left out: ``excerpt("a\\nb" + "x" * 300, 8)`` is
    ``'a\\nbxxxx' (+296 characters)``.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and text.isprintable() and not (quote and ("'" in text or "\\" in text)):
        return f"'{text}'" if quote else text
    pieces, size, used = [], 0, 0
    for char in text:
        if char.isprintable():
            piece = _ESCAPES.get(char, char) if quote else char
        else:
            piece = repr(char)[1:-1]
        if size + len(piece) > limit:
            break
        pieces.append(piece)
        size += len(piece)
        used += 1
    shown = "".join(pieces)
    if quote:
        shown = f"'{shown}'"
    if used < len(text):
        shown += f" (+{len(text) - used} characters)"
    return shown
