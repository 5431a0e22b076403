"""Prometheus metrics of one app instance (its own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("encode", "retrieve", "rerank", "total")
STAGE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Latency per stage, requests and errors, cache outcomes, batch sizes, bundle info."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "recserve_requests_total", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "recserve_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "recserve_stage_seconds",
            "Latency of a pipeline stage",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.cache = Counter(
            "recserve_cache_total",
            "Cache outcomes (hit, miss, bypass; answer: reused whole)",
            ["result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "recserve_errors_total", "Errors by kind", ["kind"], registry=self.registry
        )
        self.fallbacks = Counter(
            "recserve_fallback_total",
            "Responses served by a fallback",
            ["kind"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "recserve_batch_size",
            "Requests per encoder/index call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.events = Counter(
            "recserve_events_total",
            "Events received by /events",
            ["outcome"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "recserve_reloads_total", "Bundle reloads", ["outcome"], registry=self.registry
        )
        self.bundle = Gauge(
            "recserve_bundle_info", "The bundle being served", ["bundle"], registry=self.registry
        )
        self.reload_signals = Counter(
            "recserve_reload_signals_total",
            "Messages heard on the reload channel (only 'accepted' ones re-read CURRENT)",
            ["outcome"],
            registry=self.registry,
        )
        self.catalogue_version = Gauge(
            "recserve_catalogue_version",
            "The catalogue version this worker serves (catalogue API writes applied)",
            registry=self.registry,
        )
        self.catalogue_writes = Counter(
            "recserve_catalogue_writes_total",
            "Items written by the catalogue API through this worker",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.impressions = Counter(
            "recserve_impressions_total",
            "Impressions logged (forced arms not counted)",
            ["experiment", "arm"],
            registry=self.registry,
        )
        self.impressions_dropped = Counter(
            "recserve_impressions_dropped_total",
            "Impressions not logged: queue_full, redis (unreachable), error or shutdown",
            ["reason"],
            registry=self.registry,
        )
        self.outcomes = Counter(
            "recserve_experiment_outcomes_total",
            "Impressions that earned an outcome: their first attributed event of a type, or "
            "a hit (a later event among their first hit_k items); divide by impressions",
            ["experiment", "arm", "outcome"],
            registry=self.registry,
        )
        self.attributed_events = Counter(
            "recserve_attributed_events_total",
            "Distinct items of an impression an event type was attributed to",
            ["experiment", "arm", "type"],
            registry=self.registry,
        )

        # The children /recommend touches on every request, resolved once.
        self._cache_outcomes = {
            r: self.cache.labels(result=r) for r in ("hit", "miss", "bypass", "answer")
        }
        self._stages = {s: self.stage.labels(stage=s) for s in STAGES}

    def recommended(self, cache: str, fallback: str | None, timings_ms: dict[str, float]) -> None:
        """Count and time one /recommend answer."""
        self._cache_outcomes[cache].inc()
        if fallback:
            self.fallbacks.labels(kind=fallback).inc()
        for stage, child in self._stages.items():
            child.observe(timings_ms[stage] / 1000.0)

    def serving(self, bundle: str) -> None:
        self.bundle.clear()
        self.bundle.labels(bundle=bundle).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
