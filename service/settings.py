"""Service configuration: one pydantic-settings class, environment variables ``RECSERVE_*``.

    RECSERVE_MODELS_DIR=models RECSERVE_REDIS_URL=redis://127.0.0.1:6379/0 \
        python -m service.serve --port 8000

Settings are validated at start-up: an admin endpoint without a token is refused unless
``RECSERVE_DEV_MODE=1`` says this is a developer's machine.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.feedback_store import HIT, IMPRESSIONS

# What an API key may do (service/api/access.py): "recommend" for /recommend with a
# history in the body and /items/{id}/similar; "history:read" also for /recommend from a
# user's stored history; "events:write" for /events; "catalogue:write" for catalogue
# writes; "admin" for /admin/* (as the admin token).
# Names the experiment's counts use for themselves, so no event type may take them.
RESERVED_OUTCOMES = (HIT, IMPRESSIONS)
Scope = Literal["recommend", "history:read", "events:write", "catalogue:write", "admin"]


class ApiKey(BaseModel):
    """One client's key and what it may do; ``name`` labels it in logs, never the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key: SecretStr = Field(min_length=16)
    scopes: tuple[Scope, ...] = Field(min_length=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSERVE_", extra="ignore")

    models_dir: Path = Path("models")
    # One server (redis://, rediss:// for TLS) or a Redis Cluster (redis+cluster://,
    # rediss+cluster://, any node's host and port): docs/DEPLOYMENT.md, "Redis Cluster".
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", pattern=r"^(rediss?|rediss?\+cluster|unix)://"
    )
    key_prefix: str = Field("recserve", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    redis_timeout_seconds: float = Field(0.25, gt=0)
    default_encoder: str | None = None  # None: the bundle's default
    candidates: int = Field(200, ge=1, le=5000)
    device: str = Field("auto", pattern="^(auto|cpu|gpu)$")
    # Where the faiss index is searched when not where the ONNX models run (None: device),
    # e.g. a GPU index beside encoder and head on the CPU.
    index_device: str | None = Field(None, pattern="^(auto|cpu|gpu)$")
    onnx_threads: int = Field(1, ge=1, le=64)  # intra-op threads of each ONNX session
    native_threads: int = Field(1, ge=1, le=64)  # faiss OpenMP and BLAS threads
    # Where batches (ONNX, faiss, the head) are computed: a child process of the worker
    # (its own GIL; the fastest under load), one process shared by all the workers of the
    # host (one copy of the models, batches merged across workers), or a thread of the
    # worker (no second copy of the models). "auto": shared when service.serve runs
    # several workers, else a child per worker. See service/compute.py.
    compute: str = Field("auto", pattern="^(auto|process|shared|thread)$")
    # A batch arriving while nothing else computes (a lone request) runs in the worker
    # itself, which then holds a copy of the models too: no process hop on a quiet worker.
    # "auto": with a compute child of the worker's own; not with the shared process (one
    # copy of the models per host is its point). See service/compute.py, LoneInWorker.
    lone_in_worker: str = Field("auto", pattern="^(auto|on|off)$")
    # The shared compute process's socket: set by service.serve for its workers.
    compute_socket: Path | None = None
    compute_threads: int = Field(1, ge=1, le=64)  # threads running batches with "thread"
    compute_timeout_seconds: float = Field(30.0, gt=0)  # one compute call, at most
    # A compute process not heard from (it beats several times a second, busy or not) for
    # this long is killed and replaced; what it held is retried once on the new one.
    compute_stall_seconds: float = Field(1.0, ge=0.05, le=60)
    max_batch: int = Field(32, ge=1, le=1024)  # requests coalesced into one encoder call
    # A compute process merges the batches that queued for it, up to this many queries
    # per computation, and answers each computation at once (service/compute_host.py).
    compute_merge_limit: int = Field(32, ge=1, le=4096)
    # Merged computations a compute process runs at once, each in a thread of its own (the
    # encoder and the index release the GIL); 0: one per core it may use. One is best on
    # two cores, where merging more queries beats computing more runs at once; a host with
    # cores to spare beyond its workers may need more (docs/BENCHMARKS.md).
    compute_host_threads: int = Field(1, ge=0, le=64)
    batch_wait_ms: float = Field(0.0, ge=0, le=100)  # 0: never wait for company
    batches_in_flight: int = Field(4, ge=1, le=16)  # batches prepared, read or computing at once
    cache_ttl_seconds: int = Field(3600, ge=1)
    # Writes behind the answers (new cache entries, impressions) wait up to this long for
    # company when traffic is light, so that they cost one Redis round trip per batch
    # rather than one per answer (service/write_behind.py); 0: write each batch at once.
    write_linger_ms: float = Field(20.0, ge=0, le=1000)
    # Reuse the whole answer to an identical request (same events and parameters) for this
    # long, per worker; 0: never. Repeats then skip batching and Redis entirely, at the
    # price of item-age and user-gap features up to this old (see service.recommender).
    answer_ttl_seconds: float = Field(0.0, ge=0, le=3600)
    # The memo's budget per worker, in items: an answer of k items counts k (about 0.4 kB
    # an item), so it stays bounded whatever k the requests ask for.
    answer_cache_items: int = Field(200_000, ge=1, le=100_000_000)
    history_cap: int = Field(200, ge=1, le=100_000)  # events kept per user in Redis
    # A history write (and the item codes it uses) is acknowledged only once this many
    # replicas of its primary hold it (Redis WAIT), so that a failover cannot lose it; 0:
    # once the primary holds it (docs/DEPLOYMENT.md, "Redis Cluster", says what that risks).
    history_wait_replicas: int = Field(0, ge=0, le=16)
    # How long a write waits for those replicas; fewer by then: 503, the client retries.
    history_wait_ms: int = Field(100, ge=1, le=10_000)
    # Item ids whose history codes a worker keeps in memory (both ways; about 200 bytes
    # each for short ids): a read or write naming only those asks Redis nothing more.
    item_code_cache: int = Field(100_000, ge=0, le=100_000_000)
    request_history_cap: int = Field(1000, ge=1, le=100_000)  # events read from a request
    max_events_per_request: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    admin_enabled: bool = True
    admin_token: SecretStr | None = None
    dev_mode: bool = False
    reload_poll_seconds: float = Field(5.0, ge=0)  # 0: no polling of models/CURRENT
    cors_origins: list[str] = []
    # Clients and their scopes, as JSON: [{"name": "web", "key": "...", "scopes":
    # ["recommend", "history:read"]}]. Empty: every endpoint but /admin is open, for a
    # service behind an application that authenticates its users (docs/RELIABILITY.md).
    api_keys: list[ApiKey] = []
    # Refuse exclude_seen=false on a stored history: with it, comparing answers recovers
    # items of the user's history (docs/RELIABILITY.md, who may read a history).
    stored_history_excludes_seen: bool = False
    opentelemetry: bool = False  # FastAPI's native OpenTelemetry (global providers, OTEL_*)
    # Scopes the reload channel ({key_prefix}:reload:{deployment}): the workers of one
    # deployment hear each other's reloads and no other deployment's. None: a digest of
    # models_dir's resolved path (set it where deployments share Redis, prefix and path).
    deployment: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Re-reads of models/CURRENT that signals on the reload channel trigger: at most one
    # per this many seconds (signals meanwhile are merged into the next).
    reload_signal_interval_seconds: float = Field(1.0, ge=0, le=60)
    # -- the living catalogue (service/live_catalogue.py, docs/ARCHITECTURE.md)
    # Writes (PUT/DELETE /items...) need this bearer token, the admin token, or an API key
    # with the "catalogue:write" scope.
    catalogue_token: SecretStr | None = None
    catalogue_bulk_limit: int = Field(1000, ge=1, le=100_000)  # items per bulk write
    # How often a worker asks Redis for the catalogue's version, besides hearing its
    # channel: the backstop of the visibility bound for a lost notification.
    catalogue_poll_seconds: float = Field(0.5, gt=0, le=60)
    # Metadata-derived vectors of added items are scaled by this: longer vectors win more
    # inner products, so it sets how much exposure a new item gets until the next training
    # learns it (docs/BENCHMARKS.md, "Cold start", measures the trade-off).
    cold_start_exposure: float = Field(1.0, gt=0, le=10)
    # -- experiments and feedback (service/experiments.py, service/attribution.py)
    # A JSON file of arms and weights, read at start-up and on every reload; None: none.
    experiment_file: Path | None = None
    # Log what each /recommend answer showed to a Redis stream, for attribution and the
    # experiment's counts (off: no impressions, /events attributes nothing).
    impressions_enabled: bool = True
    impressions_stream_cap: int = Field(100_000, ge=1000, le=100_000_000)  # entries, about
    # Impressions awaiting Redis per worker; more are dropped (and counted), never waited for.
    impressions_queue: int = Field(10_000, ge=1, le=1_000_000)
    # How long after an impression an event may still answer it (and Redis keeps it).
    attribution_window_seconds: int = Field(3600, ge=1, le=30 * 86_400)
    # How far an event's time may lie before the impression it answers (client clocks).
    attribution_clock_skew_seconds: int = Field(60, ge=0, le=3600)
    # The event types /events accepts; "click" feeds the click-through rate, the rest are
    # counted alike (impressions with one, and distinct items).
    event_types: list[str] = ["view", "click", "purchase"]
    hit_k: int = Field(10, ge=1, le=1000)  # hit rate at k: the first k items shown
    # -- how the server is started (service/serve.py, the one entry point of every start path)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    # HTTP limits of the server (service/http_protocol.py; docs/RELIABILITY.md, "HTTP limits").
    # The request line and headers together, in bytes: larger is answered 431 and closed.
    max_header_bytes: int = Field(16_384, ge=1024, le=1_048_576)
    max_headers: int = Field(100, ge=8, le=1000)  # header fields per request; more: 431
    # A request's line and headers must arrive within this from its first byte (or from the
    # connection's opening): else 408 and the connection is closed.
    header_timeout_seconds: float = Field(10.0, gt=0, le=600)
    # Its body within this from the end of its headers: else 408 and closed.
    body_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    # An idle connection between requests is closed after this (uvicorn's keep-alive timeout).
    keepalive_timeout_seconds: float = Field(5.0, gt=0, le=600)
    # -- what is published besides the API
    docs_enabled: bool = True  # /docs, /redoc, /openapi.json; off: 404
    metrics_enabled: bool = True  # /metrics; off: 404
    demo_enabled: bool = True  # the demo page at / and /demo; off: 404
    # With a token /metrics answers only `Authorization: Bearer <token>` (401 otherwise).
    metrics_token: SecretStr | None = None

    @model_validator(mode="after")
    def _admin_needs_a_token(self) -> Settings:
        token = self.admin_token.get_secret_value() if self.admin_token else ""
        if self.admin_enabled and not token and not self.dev_mode:
            raise ValueError(
                "RECSERVE_ADMIN_TOKEN is required while admin endpoints are enabled; set it, "
                "or RECSERVE_ADMIN_ENABLED=0, or RECSERVE_DEV_MODE=1 on a developer machine"
            )
        if token and len(token) < 16 and not self.dev_mode:
            raise ValueError("RECSERVE_ADMIN_TOKEN must be at least 16 characters")
        names = [key.name for key in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError("RECSERVE_API_KEYS: every key needs a name of its own")
        secrets = [key.key.get_secret_value() for key in self.api_keys]
        if len(set(secrets)) != len(secrets):
            raise ValueError("RECSERVE_API_KEYS: two keys are the same")
        return self

    @model_validator(mode="after")
    def _event_types_are_names(self) -> Settings:
        for name in self.event_types:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name) or name in RESERVED_OUTCOMES:
                raise ValueError(
                    f"RECSERVE_EVENT_TYPES: {name!r} is not a type name (1-32 of A-Z a-z 0-9 "
                    f"_ . -, not {' or '.join(RESERVED_OUTCOMES)})"
                )
        if len(set(self.event_types)) != len(self.event_types):
            raise ValueError("RECSERVE_EVENT_TYPES: a type is listed twice")
        return self

    @model_validator(mode="after")
    def _tokens_are_long_enough(self) -> Settings:
        for name in ("metrics_token", "catalogue_token"):
            secret = getattr(self, name)
            token = secret.get_secret_value() if secret else None
            if token is not None and len(token) < 16 and not self.dev_mode:
                raise ValueError(f"RECSERVE_{name.upper()} must be at least 16 characters")
        return self


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
