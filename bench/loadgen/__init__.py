"""Load generator for a running recserve deployment: realistic traffic, latency percentiles.

    .venv/bin/python -m bench.loadgen --url http://127.0.0.1:8000 --concurrency 16

(from the repository root; ``--help`` describes the traffic, the modes and the measures).

- ``traffic``: what is sent (TrafficMix, PlannedRequest, TrafficSampler); bench/locustfile.py
  sends the same;
- ``run``: sending it and measuring (LoadConfig, LoadRun, run_load, Measurements);
- ``report``: statistics and output (latency_summary, timeline, summarise, format_summary,
  plot_timeline);
- ``__main__``: the CLI.

The CLI is not imported here: ``python -m bench.loadgen`` imports this package before it
runs ``__main__``, and runpy warns when the package has imported that module already.
"""

from bench.loadgen.report import (
    PERCENTILES,
    format_summary,
    latency_summary,
    plot_timeline,
    summarise,
    timeline,
)
from bench.loadgen.run import (
    DEFAULT_URL,
    LoadConfig,
    LoadRun,
    Measurements,
    check_reachable,
    check_url,
    quiet_http_logs,
    run_load,
)
from bench.loadgen.traffic import (
    CACHE_VALUES,
    ENDPOINTS,
    EVENTS,
    JSON_HEADERS,
    KINDS,
    RECOMMEND,
    PlannedRequest,
    TrafficMix,
    TrafficSampler,
)

__all__ = [
    "CACHE_VALUES",
    "DEFAULT_URL",
    "ENDPOINTS",
    "EVENTS",
    "JSON_HEADERS",
    "KINDS",
    "PERCENTILES",
    "RECOMMEND",
    "LoadConfig",
    "LoadRun",
    "Measurements",
    "PlannedRequest",
    "TrafficMix",
    "TrafficSampler",
    "check_reachable",
    "check_url",
    "format_summary",
    "latency_summary",
    "plot_timeline",
    "quiet_http_logs",
    "run_load",
    "summarise",
    "timeline",
]
