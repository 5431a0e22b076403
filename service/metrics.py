"""Prometheus metrics of one app instance (its own registry, so tests can build many apps).

A server of several workers must answer /metrics for all of them, whichever worker the
scrape reaches: ``service.serve`` then points prometheus_client's multiprocess mode at a
directory of its own (``PROMETHEUS_MULTIPROC_DIR``, which the library reads when it is
imported, so it is set before the workers start), every worker's values are kept in files
there, and /metrics adds them up (counters and histograms summed; the gauges as each one's
``multiprocess_mode`` says). A worker that exits cleanly marks its gauges dead; one that
crashes leaves its last gauge values until the server restarts, its counts for good.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own switch


def multiprocess_dir() -> str | None:
    """Where this process's metrics are kept with its siblings', or None. prometheus_client
    decides once, when it is imported (from the variable then set): its decision counts."""
    if prometheus_values.ValueClass is prometheus_values.MutexValue:
        return None
    return os.environ.get(MULTIPROCESS_DIR) or os.environ.get(MULTIPROCESS_DIR.lower())


STAGES = ("encode", "retrieve", "rerank", "total")
STAGE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Latency per stage, requests and errors, cache outcomes, batch sizes, bundle info."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.shared_dir = multiprocess_dir()
        self._bundle_name: str | None = None
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
            "recserve_bundle_info",
            "The bundle being served (1 while a live worker serves it)",
            ["bundle"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.reload_signals = Counter(
            "recserve_reload_signals_total",
            "Messages heard on the reload channel (only 'accepted' ones re-read CURRENT)",
            ["outcome"],
            registry=self.registry,
        )
        self.catalogue_version = Gauge(
            "recserve_catalogue_version",
            "The catalogue version each worker serves (catalogue API writes applied; "
            "a pid label per worker when the server has several)",
            registry=self.registry,
            multiprocess_mode="liveall",
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
        """Mark ``bundle`` as the one this worker serves."""
        if self._bundle_name is not None and self._bundle_name != bundle:
            # A worker's file keeps every child it ever had (prometheus_client cannot
            # remove one there): zeroed, the old bundle reads 0 once no live worker serves it.
            self.bundle.labels(bundle=self._bundle_name).set(0)
            if self.shared_dir is None:
                self.bundle.remove(self._bundle_name)
        self._bundle_name = bundle
        self.bundle.labels(bundle=bundle).set(1)

    def render(self) -> bytes:
        """The exposition text: this app's metrics, or every worker's of the server."""
        if self.shared_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.shared_dir)
        return generate_latest(registry)

    def close(self) -> None:
        """At the worker's exit: its live gauges leave the server's figures."""
        if self.shared_dir is not None:
            mark_process_dead(os.getpid(), self.shared_dir)
