"""The service package's exceptions, in one place so the API maps them to HTTP once.

RecserveError
├── BundleError          a bundle is missing, malformed or fails its checksums
├── DeviceError          an accelerator was asked for but is not available
└── RequestError         the request cannot be served as asked (4xx)
    ├── UnknownEncoder   the encoder named in the request is not in the bundle (422)
    ├── UnknownItem      an item id is not in the catalogue (404)
    └── NoHistory        no history in the request and none stored (404)
"""

from __future__ import annotations


class RecserveError(Exception):
    """Base class of everything the service raises on purpose."""


class BundleError(RecserveError):
    """A bundle cannot be loaded; the message names the file and the reason."""


class DeviceError(RecserveError):
    """An accelerator was requested explicitly but cannot be used."""


class StoreUnavailable(RecserveError):
    """The behaviour store (Redis) is unreachable; reads degrade, writes answer 503."""


class RequestError(RecserveError):
    """The request is well-formed but cannot be served as asked."""

    status_code = 400


class UnknownEncoder(RequestError):
    status_code = 422


class UnknownItem(RequestError):
    status_code = 404


class NoHistory(RequestError):
    status_code = 404
