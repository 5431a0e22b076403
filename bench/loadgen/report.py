"""What a load test measured: statistics of the measurements, a summary, a plot."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.loadgen.traffic import CACHE_VALUES, ENDPOINTS, KINDS, RECOMMEND

if TYPE_CHECKING:
    from bench.loadgen.run import Measurements

PERCENTILES = (50, 95, 99)


def latency_summary(latencies_s) -> dict:
    """count, mean, p50/p95/p99 (numpy's linear interpolation) and max, in milliseconds."""
    values = np.asarray(latencies_s, dtype=np.float64)
    keys = ["mean_ms", *(f"p{p}_ms" for p in PERCENTILES), "max_ms"]
    if values.size == 0:
        return {"count": 0, **dict.fromkeys(keys)}
    quantiles = np.percentile(values, PERCENTILES) * 1000.0
    return {
        "count": int(values.size),
        "mean_ms": float(values.mean() * 1000.0),
        **{f"p{p}_ms": float(q) for p, q in zip(PERCENTILES, quantiles, strict=True)},
        "max_ms": float(values.max() * 1000.0),
    }


def timeline(finished_s, latencies_s, failed, elapsed_s: float) -> list[dict]:
    """Per second of the run (by completion time): completions/s, p50, p99, errors.

    ``latencies_s`` is NaN for requests without a response (left out of the percentiles);
    ``failed`` marks errors of either sort. The last, partial second is scaled to a rate.
    """
    finished = np.asarray(finished_s, dtype=np.float64)
    latencies = np.asarray(latencies_s, dtype=np.float64)
    failed = np.asarray(failed, dtype=bool)
    seconds = max(1, math.ceil(elapsed_s)) if elapsed_s > 0 else 1
    bins = np.clip(np.floor(finished).astype(np.int64), 0, seconds - 1)
    rows = []
    for second in range(seconds):
        here = bins == second
        width = min(1.0, elapsed_s - second) if elapsed_s > second else 1.0
        answered = latencies[here & ~np.isnan(latencies)]
        p50, p99 = (np.percentile(answered, (50, 99)) * 1000.0) if answered.size else (None, None)
        rows.append(
            {
                "second": second,
                "completed": int(here.sum()),
                "rps": float(here.sum() / width) if width > 0 else 0.0,
                "errors": int((here & failed).sum()),
                "p50_ms": None if p50 is None else float(p50),
                "p99_ms": None if p99 is None else float(p99),
            }
        )
    return rows


def summarise(m: Measurements, elapsed_s: float) -> dict:
    """The result's statistics (everything but config and metadata) from the measurements."""
    status = np.asarray(m.status, dtype=np.int64)
    latency = np.asarray(m.latency, dtype=np.float64)
    endpoint = np.asarray(m.endpoint, dtype=object)
    answered = status > 0
    ok = (status >= 200) & (status < 300)
    by_status = Counter(str(s) for s in status[answered & ~ok].tolist())
    by_exception = Counter(e for e in m.error if e is not None)
    completed = len(m)
    latency_ms = {"overall": latency_summary(latency[answered])}
    for name in ENDPOINTS:
        latency_ms[name] = latency_summary(latency[answered & (endpoint == name)])
    recommend_ok = ok & (endpoint == RECOMMEND)
    served_cache = Counter(c for c, keep in zip(m.cache, recommend_ok, strict=True) if keep)
    with_cache = sum(served_cache[v] for v in CACHE_VALUES)
    cache = {v: int(served_cache[v]) for v in CACHE_VALUES}
    other = sum(served_cache.values()) - with_cache  # missing or unexpected values
    cache["other"] = int(other)
    cache["hit_ratio"] = (served_cache["hit"] / with_cache) if with_cache else None
    fallbacks = Counter(f for f, keep in zip(m.fallback, recommend_ok, strict=True) if keep and f)
    finished = np.asarray(m.started, dtype=np.float64) + np.nan_to_num(latency)
    return {
        "elapsed_s": float(elapsed_s),
        "completed": completed,
        "ok": int(ok.sum()),
        "errors": int(completed - ok.sum()),
        "throughput_rps": completed / elapsed_s if elapsed_s > 0 else 0.0,
        "ok_rps": float(ok.sum()) / elapsed_s if elapsed_s > 0 else 0.0,
        "latency_ms": latency_ms,
        "errors_by_status": dict(sorted(by_status.items())),
        "errors_by_exception": dict(sorted(by_exception.items())),
        "cache": cache,
        "fallback": dict(fallbacks),
        "kinds": {k: int(sum(1 for x in m.kind if x == k)) for k in KINDS},
        "repeats": int(sum(m.repeat)),
        "timeline": timeline(finished, np.where(answered, latency, np.nan), ~ok, elapsed_s),
    }


def format_summary(result: dict) -> str:
    """A few lines for the terminal."""
    config = result["config"]
    how = (
        f"closed loop, concurrency {config['concurrency']}"
        if result["mode"] == "closed"
        else f"open loop, {config['rate']:g} req/s ({config['arrivals']}), "
        f"max in flight {config['max_in_flight']}"
    )
    errors = dict(result["errors_by_status"], **result["errors_by_exception"])
    error_text = ", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"
    lines = [
        f"target {result['target']}  {how}  elapsed {result['elapsed_s']:.1f} s",
        f"completed {result['completed']}  ok {result['ok']}  errors {result['errors']} "
        f"({error_text})  dropped {result['dropped']}",
        f"throughput {result['throughput_rps']:.1f} req/s  (ok {result['ok_rps']:.1f} req/s)",
        f"{'latency ms':<14}{'count':>8}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}",
    ]
    for name, row in result["latency_ms"].items():
        cells = [row[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")]
        text = "".join(f"{c:>9.1f}" if c is not None else f"{'-':>9}" for c in cells)
        lines.append(f"  {name:<12}{row['count']:>8}{text}")
    cache = result["cache"]
    ratio = "-" if cache["hit_ratio"] is None else f"{cache['hit_ratio']:.3f}"
    lines.append(
        f"cache hit ratio {ratio} (hit {cache['hit']}, miss {cache['miss']}, "
        f"bypass {cache['bypass']})  fallback {result['fallback'] or 0}"
    )
    kinds = result["kinds"]
    mix = ", ".join(f"{k} {v}" for k, v in kinds.items())
    lines.append(f"requests: {mix} (repeats {result['repeats']})  seed {result['traffic']['seed']}")
    return "\n".join(lines)


def plot_timeline(result: dict, path: str | Path) -> Path:
    """PNG: per-second p50/p99 latency above, throughput and errors below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["timeline"]
    seconds = [r["second"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        top.plot(seconds, values, marker=".", label=label)
    top.set_ylabel("latency (ms)")
    top.legend(loc="best")
    top.grid(alpha=0.3)
    bottom.plot(seconds, [r["rps"] for r in rows], marker=".", label="completed/s")
    bottom.plot(seconds, [r["errors"] for r in rows], color="tab:red", label="errors/s")
    bottom.set_ylabel("requests / s")
    bottom.set_xlabel("second of the run")
    bottom.legend(loc="best")
    bottom.grid(alpha=0.3)
    config = result["config"]
    how = (
        f"concurrency {config['concurrency']}"
        if result["mode"] == "closed"
        else f"{config['rate']:g} req/s offered"
    )
    fig.suptitle(f"{result['target']}: {how}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
