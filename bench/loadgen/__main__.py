"""Load generator for a running recserve deployment: realistic traffic, latency percentiles.

    .venv/bin/python -m bench.loadgen --url http://127.0.0.1:8000 --data synthetic \
        --concurrency 16 --requests 20000 --duration 60 --out result.json --plot latency.png
    .venv/bin/python -m bench.loadgen --url http://127.0.0.1:8000 --rate 200 --duration 30

(from the repository root). It talks only to the ``--url`` it is given.

Traffic. Histories are drawn from a dataset (``--data``: any spec that
``training.datasets.load_dataset`` understands; use the data the served bundle was trained
on, or most items are unknown to it). Each request is one of

- ``events`` (share ``--events-share``): POST /events with the next ``--events-batch``
  events of a user's real history, continuing where that user's stored history stops;
- ``user_id``  (share ``--user-id-share`` of /recommend): POST /recommend with only a
  ``user_id``; the service reads the history from Redis. Only users whose events the
  service acknowledged are asked for, so before the run ``--seed-users`` users get the
  first half of their history posted to /events (not measured). Without any stored user
  these requests fall back to carrying a history;
- ``history`` (the rest of /recommend): a ``user_id`` and a chronological window of at
  most ``--max-history`` consecutive events of that user, ending at a random point of
  their history. A share ``--repeat-share`` of these are repeats: the exact body of an
  earlier history request, sent again, which is what exercises the embedding cache.

User ids sent are ``--user-prefix`` + the dataset's raw user id, so load-test users do not
mix with real ones in Redis. The draws are seeded: ``--seed`` replays a run's requests
(the seed is in the result), but against a warm cache a replay finds every history it
sent before already cached, so the CLI draws a fresh seed unless one is given.

Modes. ``--concurrency N`` (default): a closed loop, N workers each sending the next
request as soon as the last one answered. ``--rate R``: an open loop, arrivals at R per
second (``--arrivals poisson`` or ``uniform``) whatever the latency; at most
``--max-in-flight`` requests are outstanding and an arrival that finds them all busy is
dropped and counted (``dropped``), so a saturated target shows up instead of silently
slowing the schedule. Either way the run stops after ``--requests`` requests (arrivals,
in the open loop) or ``--duration`` seconds, whichever comes first; requests in flight
at that moment are awaited (they are bounded by ``--timeout``).

Measures. Throughput; latency count/mean/p50/p95/p99/max overall and per endpoint, over
every request that got an HTTP response (errors included, as a client sees them;
timeouts and connection errors have no latency); errors by status code and by exception
type; the /recommend ``cache`` field (hit/miss/bypass and the hit ratio) and ``fallback``;
a per-second timeline (completions, p50, p99, errors). A progress line goes to stderr
about once a second; a summary to stdout; ``--out`` writes the JSON result and ``--plot``
a PNG of latency and throughput over time. The CLI first checks that GET /healthz answers
(``--no-check`` skips it) and exits 1 when no request succeeded.

One Python process can only send so many requests a second (its ceiling:
docs/BENCHMARKS.md, "The load generator's own ceiling"); when the loadgen's own CPU is
saturated, latencies include its queueing. Run it on another machine than the service,
or several copies, for higher rates.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
from dataclasses import fields
from pathlib import Path

from bench.loadgen.report import format_summary, plot_timeline
from bench.loadgen.run import DEFAULT_URL, LoadConfig, check_reachable, quiet_http_logs, run_load
from bench.loadgen.traffic import TrafficMix, TrafficSampler
from training.data import DataError


def _parser() -> argparse.ArgumentParser:
    defaults, mix = LoadConfig(), TrafficMix()
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="the deployment (default %(default)s)")
    parser.add_argument("--data", default="synthetic", help="data spec for histories")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=defaults.concurrency, help="closed loop")
    mode.add_argument("--rate", type=float, help="open loop: arrivals per second")
    parser.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight)
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default=defaults.arrivals)
    parser.add_argument("--requests", type=int, default=defaults.requests, help="at most")
    parser.add_argument(
        "--duration", type=float, default=defaults.duration_s, help="seconds, at most"
    )
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="per request")
    parser.add_argument("--events-share", type=float, default=mix.events_share)
    parser.add_argument("--user-id-share", type=float, default=mix.user_id_share)
    parser.add_argument("--repeat-share", type=float, default=mix.repeat_share)
    parser.add_argument("--max-history", type=int, default=mix.max_history)
    parser.add_argument("--events-batch", type=int, default=mix.events_batch)
    parser.add_argument("--seed-users", type=int, default=mix.seed_users)
    parser.add_argument("--k", type=int, default=mix.k)
    parser.add_argument("--encoder", default=None, help="default: the service's")
    parser.add_argument("--user-prefix", default=mix.user_prefix)
    parser.add_argument(
        "--seed", type=int, help="seed of the draws (default: a fresh one, saved in the result)"
    )
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--plot", type=Path, help="write a PNG of latency over time here")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--no-check", action="store_true", help="skip the GET /healthz check")
    return parser


def _from_flags(cls, args: argparse.Namespace, **values):
    """A ``cls`` dataclass from the flags named as its fields; ``values`` take precedence."""
    names = {f.name for f in fields(cls)}
    flagged = {name: value for name, value in vars(args).items() if name in names}
    return cls(**{**flagged, **values})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_http_logs()
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    try:
        mix = _from_flags(TrafficMix, args, seed=seed)
        config = _from_flags(
            LoadConfig,
            args,
            duration_s=args.duration,
            timeout_s=args.timeout,
            progress=not args.quiet,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_check:
        problem = check_reachable(config.url, config.timeout_s)
        if problem:
            print(f"error: {problem} (--no-check skips this check)", file=sys.stderr)
            return 1
    try:
        sampler = TrafficSampler.from_spec(args.data, mix)
    except (DataError, ValueError) as exc:
        print(f"error: --data {args.data}: {exc}", file=sys.stderr)
        return 2
    result = run_load(config, sampler, handle_sigint=True)
    print(format_summary(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {plot_timeline(result, args.plot)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
