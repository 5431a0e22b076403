"""Locust version of the load generator's traffic, for teams that run Locust.

    pip install locust
    locust -f bench/locustfile.py --host http://127.0.0.1:8000 \
        --users 16 --spawn-rate 16 --run-time 60s --headless \
        --traffic-data synthetic --repeat-share 0.3 --user-id-share 0.2 --events-share 0.1

Requests are drawn exactly as ``python -m bench.loadgen`` draws them (the
:class:`TrafficSampler` of bench/loadgen/traffic.py: real histories from
``--traffic-data``, repeats of earlier history bodies, user_id-only requests for users
whose events were acknowledged, /events continuing a user's history).
Each Locust user sends its next request as soon as the last one answered (a closed loop;
``--users`` is the concurrency). Request names say the kind, e.g. ``/recommend [history
repeat]``, so Locust's table splits latency by kind. The /recommend ``cache`` field is
tallied per process (and gathered on the master when distributed) and logged at the end
as a hit ratio. At start, the first user of each process stores ``--seed-users`` users'
histories through /events (named ``/events [seed]``).

Locust is not a dependency of this project: without it this module still imports (the
test suite compiles it) but defines no user class.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # locust puts only bench/ on the path
    sys.path.insert(0, _ROOT)

from bench.loadgen.traffic import (  # noqa: E402
    CACHE_VALUES,
    JSON_HEADERS,
    RECOMMEND,
    PlannedRequest,
    TrafficMix,
    TrafficSampler,
)

try:
    from locust import HttpUser, constant, events, task
except ImportError:  # locust is optional
    HttpUser = None

LOG = logging.getLogger("bench.locustfile")

CACHE_TALLY: Counter = Counter()  # this process's /recommend cache values
_state: dict = {"sampler": None, "seeded": False}


def mix_from_options(options) -> TrafficMix:
    """A TrafficMix from Locust's parsed options (the arguments added below)."""
    defaults = TrafficMix()
    return TrafficMix(
        events_share=getattr(options, "events_share", defaults.events_share),
        user_id_share=getattr(options, "user_id_share", defaults.user_id_share),
        repeat_share=getattr(options, "repeat_share", defaults.repeat_share),
        max_history=getattr(options, "max_history", defaults.max_history),
        seed_users=getattr(options, "seed_users", defaults.seed_users),
        k=getattr(options, "k_items", defaults.k),
        user_prefix=getattr(options, "user_prefix", defaults.user_prefix),
        seed=getattr(options, "traffic_seed", defaults.seed),
    )


def request_name(request: PlannedRequest) -> str:
    """Locust's name for a request: the endpoint and its kind."""
    kind = f"{request.kind} repeat" if request.repeat else request.kind
    return f"{request.endpoint} [{kind}]"


def record_response(sampler: TrafficSampler, request: PlannedRequest, response) -> str | None:
    """Book a 2xx response: the cache value of /recommend, stored users of /events.

    Returns why the response is a failure, or None when it is a success.
    """
    status = response.status_code
    if not 200 <= status < 300:
        return f"HTTP {status}"
    if request.endpoint == RECOMMEND:
        try:
            cache = response.json().get("cache")
        except (ValueError, AttributeError):
            cache = None
        CACHE_TALLY[cache if cache in CACHE_VALUES else "other"] += 1
    else:
        sampler.mark_stored(request)
    return None


def cache_summary(tally: Counter) -> str:
    served = sum(tally[v] for v in CACHE_VALUES)
    ratio = f"{tally['hit'] / served:.3f}" if served else "-"
    counts = ", ".join(f"{v} {tally[v]}" for v in (*CACHE_VALUES, "other"))
    return f"cache hit ratio {ratio} ({counts})"


if HttpUser is not None:

    @events.init_command_line_parser.add_listener
    def _add_arguments(parser) -> None:
        defaults = TrafficMix()
        group = parser.add_argument_group("recserve traffic (bench/loadgen/traffic.py)")
        group.add_argument("--traffic-data", default="synthetic", help="data spec of histories")
        group.add_argument("--events-share", type=float, default=defaults.events_share)
        group.add_argument("--user-id-share", type=float, default=defaults.user_id_share)
        group.add_argument("--repeat-share", type=float, default=defaults.repeat_share)
        group.add_argument("--max-history", type=int, default=defaults.max_history)
        group.add_argument("--seed-users", type=int, default=defaults.seed_users)
        group.add_argument("--k-items", type=int, default=defaults.k, help="k of /recommend")
        group.add_argument("--user-prefix", default=defaults.user_prefix)
        group.add_argument("--traffic-seed", type=int, default=defaults.seed)

    @events.init.add_listener
    def _build_sampler(environment, **_kwargs) -> None:
        options = environment.parsed_options
        mix = mix_from_options(options)
        # distributed workers must not all replay the same draws
        mix.seed += getattr(environment.runner, "worker_index", 0) or 0
        _state["sampler"] = TrafficSampler.from_spec(
            getattr(options, "traffic_data", "synthetic"), mix
        )

    @events.report_to_master.add_listener
    def _report_cache(client_id, data, **_kwargs) -> None:
        data["recserve_cache"] = dict(CACHE_TALLY)
        CACHE_TALLY.clear()

    @events.worker_report.add_listener
    def _gather_cache(client_id, data, **_kwargs) -> None:
        CACHE_TALLY.update(data.get("recserve_cache", {}))

    @events.quitting.add_listener
    def _log_cache(environment, **_kwargs) -> None:
        LOG.info(cache_summary(CACHE_TALLY))

    class RecserveUser(HttpUser):
        """One client in a closed loop over the recserve traffic mix."""

        wait_time = constant(0)

        def on_start(self) -> None:
            if _state["sampler"] is None:  # e.g. a test harness without the init event
                _state["sampler"] = TrafficSampler.from_spec("synthetic", TrafficMix())
            sampler = _state["sampler"]
            if _state["seeded"] or sampler.mix.user_id_share <= 0:
                return
            _state["seeded"] = True
            for request in sampler.seed_requests():
                self._send(request)

        @task
        def send_next(self) -> None:
            self._send(_state["sampler"].next())

        def _send(self, request: PlannedRequest) -> None:
            with self.client.post(
                request.endpoint,
                data=request.body,
                headers=JSON_HEADERS,
                name=request_name(request),
                catch_response=True,
            ) as response:
                failure = record_response(_state["sampler"], request, response)
                if failure is None:
                    response.success()
                else:
                    response.failure(failure)
