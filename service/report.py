"""The experiment report: per-arm rates with confidence intervals, from Redis.

    python -m service.report                      # the running experiment (or each one)
    python -m service.report --experiment rerank-2026-12 --png runs/rerank.png

Reads the counts every worker of the deployment keeps in Redis (``service.feedback_store``;
the same ``RECSERVE_*`` settings as the service find them) and prints, per arm, the
impressions, and for each outcome (each event type, and ``hit``: a later event of the user
among the first ``hit_k`` items) the share of impressions that earned it with a 95% Wilson
interval, and its difference to the control arm (the first arm of the experiment file, or
``--control``) with a 95% normal-approximation interval. Forced impressions (a request
naming its arm) are never counted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from service.cache import connect_redis
from service.errors import RecserveError
from service.experiments import load_experiment
from service.feedback_store import HIT, IMPRESSIONS, FeedbackStore
from service.reload_signals import deployment_id
from service.settings import Settings

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Rate:
    """``count`` of ``n`` impressions, with a 95% interval."""

    count: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.count / self.n if self.n else float("nan")


@dataclass(frozen=True)
class ArmFigures:
    arm: str
    impressions: int
    rates: dict[str, Rate]  # outcome -> share of impressions that earned it
    events: dict[str, int]  # event type -> distinct attributed items


def wilson(count: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (nan for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = count / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference(a: Rate, b: Rate, z: float = Z95) -> tuple[float, float, float]:
    """``a - b`` and its normal-approximation interval."""
    if not a.n or not b.n:
        return float("nan"), float("nan"), float("nan")
    pa, pb = a.value, b.value
    half = z * math.sqrt(pa * (1 - pa) / a.n + pb * (1 - pb) / b.n)
    return pa - pb, pa - pb - half, pa - pb + half


def arm_figures(counts: dict[str, int], outcomes: list[str], arms: list[str]) -> list[ArmFigures]:
    """Per arm (in ``arms`` order, then any other arm counted), its rates and events."""
    counted = sorted({field.partition("|")[0] for field in counts} - set(arms))
    result = []
    for arm in [*arms, *counted]:
        n = counts.get(f"{arm}|{IMPRESSIONS}", 0)
        rates = {}
        for outcome in outcomes:
            count = counts.get(f"{arm}|{outcome}", 0)
            rates[outcome] = Rate(count, n, *wilson(count, n))
        events = {o: counts.get(f"{arm}|{o}:events", 0) for o in outcomes if o != HIT}
        result.append(ArmFigures(arm, n, rates, events))
    return result


def table(name: str, figures: list[ArmFigures], hit_k: int) -> str:
    """The report of one experiment as text: one block per outcome."""
    control = figures[0]
    lines = [f"experiment {name}: control arm {control.arm}"]
    lines.append(f"{'arm':<20} {'impressions':>11}")
    lines += [f"{f.arm:<20} {f.impressions:>11}" for f in figures]
    for outcome in control.rates:
        title = f"hit rate at {hit_k}" if outcome == HIT else f"impressions with a {outcome}"
        lines += ["", f"{title}: rate [95% CI], vs {control.arm} [95% CI]"]
        for f in figures:
            rate = f.rates[outcome]
            row = f"{f.arm:<20} {rate.count:>7} / {rate.n:<7} {rate.value:.4f} "
            row += f"[{rate.low:.4f}, {rate.high:.4f}]"
            if f is not control:
                delta, low, high = difference(rate, control.rates[outcome])
                row += f"  {delta:+.4f} [{low:+.4f}, {high:+.4f}]"
            if outcome != HIT:
                row += f"  ({f.events[outcome]} items)"
            lines.append(row)
    return "\n".join(lines)


def plot(name: str, figures: list[ArmFigures], path: Path) -> None:
    """Bars of each arm's rates with their intervals, one group per outcome, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RecserveError(f"--png needs matplotlib ({exc}); pip install matplotlib") from exc
    outcomes = list(figures[0].rates)
    width = 0.8 / len(figures)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(outcomes), 4))
    for i, f in enumerate(figures):
        xs = [j + i * width for j in range(len(outcomes))]
        values = [f.rates[o].value for o in outcomes]
        errors = [
            [f.rates[o].value - f.rates[o].low for o in outcomes],
            [f.rates[o].high - f.rates[o].value for o in outcomes],
        ]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=f"{f.arm} (n={f.impressions})")
    ax.set_xticks([j + width * (len(figures) - 1) / 2 for j in range(len(outcomes))], outcomes)
    ax.set_ylabel("share of impressions (95% CI)")
    ax.set_title(f"experiment {name}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def read_counts(store: FeedbackStore, names: list[str]) -> dict[str, dict[str, int]]:
    """Each named experiment's counts (all experiments with counts when ``names`` is
    empty)."""
    try:
        names = names or await store.experiments()
        return {name: await store.counts(name) for name in names}
    finally:
        await store.client.aclose()


def _parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--experiment",
        action="append",
        default=[],
        help="its name (repeatable; default: the experiment file's, else every one counted)",
    )
    parser.add_argument("--control", help="the arm the others are compared with")
    parser.add_argument("--png", type=Path, help="also draw the rates here")
    parser.add_argument("--redis-url", default=settings.redis_url)
    parser.add_argument("--key-prefix", default=settings.key_prefix)
    parser.add_argument("--deployment", default=deployment_id(settings))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        # The report reads; the admin endpoints' rules do not concern it.
        settings = Settings(admin_enabled=False)
        args = _parser(settings).parse_args(argv)
        experiment = load_experiment(settings.experiment_file)
        names = args.experiment or ([experiment.name] if experiment else [])
        client = connect_redis(args.redis_url)
        store = FeedbackStore(client, args.key_prefix, args.deployment, window=1, stream_cap=1)
        counts = asyncio.run(read_counts(store, names))
        outcomes = [*settings.event_types, HIT]
        blocks = []
        for name, stored in counts.items():
            if not stored:
                raise RecserveError(f"experiment {name}: nothing counted yet")
            arms = (
                [arm.name for arm in experiment.arms]
                if experiment and experiment.name == name
                else []
            )
            if args.control:
                arms = [args.control, *(a for a in arms if a != args.control)]
            figures = arm_figures(stored, outcomes, arms)
            blocks.append(table(name, figures, settings.hit_k))
            if args.png is not None:
                path = (
                    args.png if len(counts) == 1 else args.png.with_stem(f"{args.png.stem}-{name}")
                )
                plot(name, figures, path)
        if not blocks:
            raise RecserveError("no experiment has counts in Redis yet")
    except RecserveError as exc:
        sys.stderr.write(f"recserve report: {exc}\n")
        return 2
    sys.stdout.write("\n\n".join(blocks) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
