"""The reload channel's messages: a signed "re-read models/CURRENT", for one deployment.

``POST /admin/reload`` loads CURRENT in the worker that got it, then publishes a signal on
the Redis channel ``{prefix}:reload:{deployment}`` so that the deployment's other workers
load it too (they also poll CURRENT). Anyone who can reach that Redis can publish there,
so the channel is trusted for nothing:

- a signal names no bundle: a worker that accepts one re-reads models/CURRENT, exactly as
  its poll would, so the most a message can cause is a re-read of the file the operator
  controls (and re-reads are rate-limited by ``RECSERVE_RELOAD_SIGNAL_INTERVAL_SECONDS``);
- a signal is signed: an HMAC-SHA256, keyed from the admin token, of the deployment id, a
  timestamp and a nonce. A worker acts only on a signal with a valid MAC for its own
  deployment, at most ``MAX_AGE_SECONDS`` old, whose nonce it has not seen; everything
  else is ignored and counted (``recserve_reload_signals_total{outcome=...}``);
- the channel is scoped by a deployment id (``RECSERVE_DEPLOYMENT``, by default derived
  from the models directory's resolved path), so two deployments that share a Redis and a
  key prefix do not hear each other, and the id inside the MAC keeps a signal copied from
  one deployment's channel to another's from being accepted there.

Without an admin token (``RECSERVE_DEV_MODE=1`` only, where /admin/reload is open too)
nothing can sign, and every well-formed signal for the deployment is accepted unsigned.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from service.settings import Settings

VERSION = 1
MAX_AGE_SECONDS = 60.0  # a signal older (or newer: clocks differ) than this is ignored
MAX_MESSAGE_BYTES = 1024
KEY_CONTEXT = b"recserve reload channel v1"
OUTCOMES = ("accepted", "unsigned", "bad_signature", "other_deployment", "stale", "replayed")


def deployment_id(settings: Settings) -> str:
    """``RECSERVE_DEPLOYMENT``, or a digest of the models directory's resolved path: the
    workers of one deployment serve one models directory."""
    return deployment_of(settings.models_dir, settings.deployment)


def deployment_of(models_dir: str | Path, deployment: str | None = None) -> str:
    """``deployment`` when given, else the id derived from ``models_dir`` (as the service
    derives it), for tools that address a deployment's keys from outside."""
    if deployment:
        return deployment
    path = str(Path(models_dir).resolve())
    return "m" + hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def reload_channel(prefix: str, deployment: str) -> str:
    return f"{prefix}:reload:{deployment}"


class ReloadSignals:
    """Signs the signals this deployment's workers publish and checks those they hear."""

    def __init__(
        self,
        prefix: str,
        deployment: str,
        token: str | None,
        *,
        dev_mode: bool = False,
        max_age: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        self.deployment = deployment
        self.channel = reload_channel(prefix, deployment)
        self._key = (
            hmac.new(token.encode("utf-8", "surrogatepass"), KEY_CONTEXT, hashlib.sha256).digest()
            if token
            else None
        )
        self.dev_mode = dev_mode
        self.max_age = max_age
        self.clock = clock
        self._nonces: dict[str, float] = {}  # accepted nonces -> when they expire

    @classmethod
    def from_settings(cls, settings: Settings) -> ReloadSignals:
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        return cls(settings.key_prefix, deployment_id(settings), token, dev_mode=settings.dev_mode)

    @property
    def enabled(self) -> bool:
        """Whether signals can be signed (or, in dev mode, go unsigned): otherwise nothing
        is published and nothing heard is acted on."""
        return self._key is not None or self.dev_mode

    def _mac(self, deployment: str, timestamp: float, nonce: str) -> str:
        text = f"{VERSION}\n{deployment}\n{timestamp!r}\n{nonce}".encode()
        return hmac.new(self._key or b"", text, hashlib.sha256).hexdigest()

    def sign(self) -> bytes:
        """A new signal: re-read CURRENT, from this deployment, now."""
        timestamp = float(self.clock())
        nonce = secrets.token_hex(16)
        mac = self._mac(self.deployment, timestamp, nonce) if self._key is not None else ""
        message = {"v": VERSION, "deployment": self.deployment, "ts": timestamp, "nonce": nonce}
        return json.dumps({**message, "mac": mac}, separators=(",", ":")).encode()

    def check(self, data: bytes | str | None) -> str:
        """What to make of a message heard on the channel: ``accepted`` (re-read CURRENT)
        or why it is ignored (one of ``OUTCOMES``)."""
        if not self.enabled:
            return "unsigned"
        message = _parse(data)
        if message is None:
            return "unsigned"
        if message["deployment"] != self.deployment:
            return "other_deployment"
        if self._key is not None:
            expected = self._mac(message["deployment"], message["ts"], message["nonce"])
            if not hmac.compare_digest(expected.encode(), message["mac"].encode()):
                return "bad_signature" if message["mac"] else "unsigned"
        now = float(self.clock())
        if abs(now - message["ts"]) > self.max_age:
            return "stale"
        self._nonces = {n: until for n, until in self._nonces.items() if until > now}
        if message["nonce"] in self._nonces:
            return "replayed"
        self._nonces[message["nonce"]] = now + 2 * self.max_age
        return "accepted"


def _parse(data: bytes | str | None) -> dict | None:
    """The fields of a signal, or None for anything that is not one."""
    if data is None or len(data) > MAX_MESSAGE_BYTES:
        return None
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(message, dict) or message.get("v") != VERSION:
        return None
    deployment, timestamp = message.get("deployment"), message.get("ts")
    nonce, mac = message.get("nonce"), message.get("mac")
    if not all(isinstance(value, str) for value in (deployment, nonce, mac)):
        return None
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        return None
    if not math.isfinite(timestamp) or not nonce:
        return None
    return {"deployment": deployment, "ts": float(timestamp), "nonce": nonce, "mac": mac}
