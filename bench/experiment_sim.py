"""The experiment loop end to end: held-out users of a real dataset, a real server, two arms.

    .venv/bin/python bench/experiment_sim.py --data ml-100k:../shared/data/ml-100k \
        --models-dir runs/sim/models [--arms rerank] [--out runs/experiment-sim.json]

1. A real server (``python -m service.serve``) serves the bundle named by the models dir's
   CURRENT with an experiment of two arms: ``--arms rerank`` (retrieval order against the
   CTR head's rerank, same retriever) or ``--arms retrievers`` (the bundle's first two
   retrievers, each in its bundle default). Its Redis keys live under a private prefix.
2. Every test user of the data (leave-last-out: the history is every event but the last,
   which is held out) asks ``/recommend`` with its user id and history, ranked as of the
   held-out event's time. When the held-out item is among the ten items shown, the user
   clicks it: ``/events`` with type ``click`` and the answer's request id. Nothing else is
   sent, and nothing in the service knows it is a simulation.
3. The experiment's figures are read back as ``python -m service.report`` reads them, per
   arm: impressions, the click-through rate and the hit rate at 10 with 95% intervals.
4. Each arm's offline figures: Recall@10 of the same users and bundle computed without
   the server (``offline_hits``: the bundle's encoder, index and head in process), on the
   arm's own users and on all of them, and the test Recall@10 the export's evaluation
   recorded in the manifest for all users (``export_recall``). The online rate must equal
   the in-process one on the arm's users (the same ranking, replayed through HTTP, the
   log and attribution), and the all-users figures should lie within its 95% interval
   (sampling error: the arm serves about half of the users).

The printed table and the JSON (``--out``) hold both; docs/BENCHMARKS.md ("Experiments:
the simulation") records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.bundle import current_name, load_bundle, read_manifest  # noqa: E402
from service.feedback_store import HIT, FeedbackStore  # noqa: E402
from service.recommender import Recommender  # noqa: E402
from service.reload_signals import deployment_id  # noqa: E402
from service.report import arm_figures, read_counts, table, wilson  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.servers import UvicornService  # noqa: E402
from training.data import SequenceData, build_sequences  # noqa: E402
from training.datasets import load_dataset  # noqa: E402

K = 10
ADMIN_TOKEN = "experiment-sim-" + "x" * 24


def test_cases(data: SequenceData, limit: int | None) -> list[dict]:
    """Each test user's id, history (all but the last event) and held-out item and time."""
    users, history_end, targets = data.eval_examples("test")
    cases = []
    for user, end, target in zip(users, history_end, targets, strict=True):
        start = int(data.offsets[user])
        history = [
            {"item_id": str(data.item_map.raw[i]), "ts": int(t)}
            for i, t in zip(data.items[start:end], data.timestamps[start:end], strict=True)
        ]
        cases.append(
            {
                "user_id": str(data.user_map.raw[user + 1]),
                "history": history,
                "target": str(data.item_map.raw[target]),
                "at": int(data.timestamps[end]),
            }
        )
    return cases[:limit] if limit else cases


def experiment_arms(bundle, kind: str) -> list[dict]:
    """The two arms of ``kind`` for this bundle."""
    names = list(bundle.retrievers)
    if kind == "rerank":
        heads = [n for n in names if "ctr_head" in bundle.retrievers[n].paths]
        if not heads:
            raise SystemExit("--arms rerank needs a bundle with a CTR head (export --ctr-head)")
        return [
            {"name": "retrieval", "weight": 1, "encoder": heads[0], "rerank": False},
            {"name": "rerank", "weight": 1, "encoder": heads[0], "rerank": True},
        ]
    if len(names) < 2:
        raise SystemExit("--arms retrievers needs a bundle with two retrievers")
    return [{"name": n, "weight": 1, "encoder": n} for n in names[:2]]


def post(client: httpx.Client, path: str, body: dict, attempts: int = 5) -> httpx.Response:
    """POST as a client should: a 503 (Redis briefly slow on a loaded machine) is retried
    after its Retry-After; /recommend and /events are both safe to repeat."""
    for _ in range(attempts - 1):
        response = client.post(path, json=body)
        if response.status_code != 503:
            break
        time.sleep(float(response.headers.get("retry-after", 1)))
    else:
        response = client.post(path, json=body)
    response.raise_for_status()
    return response


def replay(url: str, cases: list[dict]) -> dict[str, dict]:
    """Ask for every case and click the held-out item where shown; per user: arm, shown."""
    served = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for case in cases:
            asked = {"user_id": case["user_id"], "history": case["history"], "k": K}
            body = post(client, "/recommend", {**asked, "at": case["at"]}).json()
            shown = [item["item_id"] for item in body["items"]]
            if case["target"] in shown:
                click = {
                    "user_id": case["user_id"],
                    "item_id": case["target"],
                    "ts": case["at"],
                    "type": "click",
                    "request_id": body["request_id"],
                }
                post(client, "/events", click)
            served[case["user_id"]] = {"arm": body["arm"], "hit": case["target"] in shown}
    return served


async def offline_hits(models_dir: Path, arms: list[dict], cases: list[dict]) -> dict:
    """Per arm, whether each case's held-out item is in the top ten: the bundle's encoder,
    index and head in process (thread compute, no server, no Redis, no experiment)."""
    settings = Settings(models_dir=models_dir, dev_mode=True, compute="thread", device="cpu")
    bundle = load_bundle(models_dir, current_name(models_dir), device="cpu")
    recommender = Recommender.from_settings(bundle, settings)
    await recommender.start()
    try:
        hits = {}
        for arm in arms:
            row = []
            for case in cases:
                events = [(e["item_id"], e["ts"]) for e in case["history"]]
                answer = await recommender.recommend(
                    events, k=K, encoder=arm["encoder"], rerank=arm.get("rerank"), at=case["at"]
                )
                row.append(case["target"] in [item["item_id"] for item in answer.items])
            hits[arm["name"]] = np.array(row)
        return hits
    finally:
        await recommender.close()


def export_recall(manifest: dict, arms: list[dict]) -> dict[str, float]:
    """Per arm, the test Recall@10 the export's own evaluation recorded for all users (the
    head's ``rerank_quality``: retrieval order and reranked, at the head's depth); only
    for arms of a retriever with a head and the service's default depth."""
    found = {}
    for arm in arms:
        head = manifest["retrievers"][arm["encoder"]].get("ctr_head") or {}
        quality = head.get("rerank_quality") or {}
        order = "reranked" if arm.get("rerank") else "retrieval"
        if order in quality and quality.get("depth") == Settings.model_fields["candidates"].default:
            found[arm["name"]] = quality[order]["recall@10"]
    return found


def simulate(
    data: SequenceData,
    models_dir: Path,
    *,
    arms_kind: str = "rerank",
    limit: int | None = None,
    redis_url: str = "redis://127.0.0.1:6379/0",
    salts: list[str | None] = (None,),
) -> list[dict]:
    """Run the loop once per salt (each draws another split of the users; ``None``: the
    experiment's name); per split, the per-arm online and offline figures. The offline
    hits depend only on bundle, arms and users, so they are computed once."""
    models_dir = Path(models_dir).resolve()
    bundle = load_bundle(models_dir, current_name(models_dir), models=False)
    arms = experiment_arms(bundle, arms_kind)
    cases = test_cases(data, limit)
    offline = asyncio.run(offline_hits(models_dir, arms, cases))
    recorded = export_recall(read_manifest(models_dir / bundle.name), arms)
    return [
        _split(
            models_dir,
            name=f"sim-{arms_kind}",
            bundle_name=bundle.name,
            arms=arms,
            cases=cases,
            offline=offline,
            recorded=recorded,
            redis_url=redis_url,
            salt=salt,
        )
        for salt in salts
    ]


def _split(
    models_dir: Path,
    *,
    name: str,
    bundle_name: str,
    arms: list[dict],
    cases: list[dict],
    offline: dict,
    recorded: dict,
    redis_url: str,
    salt: str | None,
) -> dict:
    """One split: serve the experiment, replay every case, read the report's counts."""
    prefix = f"sim{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as scratch:
        experiment_file = Path(scratch) / "experiment.json"
        experiment = {"name": name, "arms": arms, **({"salt": salt} if salt else {})}
        experiment_file.write_text(json.dumps(experiment))
        settings = {
            "RECSERVE_MODELS_DIR": str(models_dir),
            "RECSERVE_REDIS_URL": redis_url,
            "RECSERVE_KEY_PREFIX": prefix,
            "RECSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
            "RECSERVE_RELOAD_POLL_SECONDS": "0",
            "RECSERVE_DEVICE": "cpu",
            "RECSERVE_EXPERIMENT_FILE": str(experiment_file),
            "RECSERVE_HIT_K": str(K),
        }
        service = UvicornService(settings, log_path=Path(scratch) / "server.log")
        service.start(timeout=120)
        started = time.perf_counter()
        try:
            served = replay(service.url, cases)
            wall = time.perf_counter() - started
            time.sleep(1.0)  # the last impressions are written behind their answers
        finally:
            service.stop()
        store = FeedbackStore(
            aioredis.Redis.from_url(redis_url),
            prefix,
            deployment_id(Settings(models_dir=models_dir, key_prefix=prefix, admin_enabled=False)),
            window=1,
            stream_cap=1,
        )
        counts = asyncio.run(read_counts(store, [name]))[name]
    figures = arm_figures(counts, ["click", HIT], [arm["name"] for arm in arms])
    result = {
        "bundle": bundle_name,
        "experiment": name,
        "salt": salt or name,
        "arms": arms,
        "users": len(cases),
        "replay_seconds": round(wall, 1),
        "report": table(name, figures, K),
        "per_arm": {},
    }
    index = {case["user_id"]: i for i, case in enumerate(cases)}
    for f in figures:
        mine = np.array([index[u] for u, s in served.items() if s["arm"] == f.arm], dtype=int)
        everyone = offline[f.arm]
        on_mine = float(everyone[mine].mean()) if len(mine) else float("nan")
        hit = f.rates[HIT]
        low, high = wilson(hit.count, hit.n)
        result["per_arm"][f.arm] = {
            "impressions": f.impressions,
            "online_hit_rate": hit.value,
            "online_ci": [low, high],
            "online_ctr": f.rates["click"].value,
            "offline_recall_on_arm_users": on_mine,
            "offline_recall_all_users": float(everyone.mean()),
            "export_recall_all_users": recorded.get(f.arm),
            "equal_on_arm_users": bool(hit.count == int(everyone[mine].sum())),
            "all_users_within_ci": bool(low <= everyone.mean() <= high),
        }
    return result


def render(result: dict) -> str:
    lines = [f"salt {result['salt']}", result["report"], ""]
    lines.append(
        f"{'arm':<12} {'n':>5} {'online HR@10':>13} {'95% CI':>17} "
        f"{'offline (arm users)':>20} {'offline (all)':>14} {'export (all)':>13}  checks"
    )
    for arm, r in result["per_arm"].items():
        low, high = r["online_ci"]
        recorded = r.get("export_recall_all_users")
        exported = "-" if recorded is None else f"{recorded:.4f}"
        checks = (
            ("equal" if r["equal_on_arm_users"] else "DIFFERENT")
            + ", "
            + ("within CI" if r["all_users_within_ci"] else "OUTSIDE CI")
        )
        lines.append(
            f"{arm:<12} {r['impressions']:>5} {r['online_hit_rate']:>13.4f} "
            f"[{low:.4f}, {high:.4f}] {r['offline_recall_on_arm_users']:>20.4f} "
            f"{r['offline_recall_all_users']:>14.4f} {exported:>13}  {checks}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="KIND:PATH, as the training CLI takes")
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--arms", choices=("rerank", "retrievers"), default="rerank")
    parser.add_argument("--users", type=int, help="only the first N test users")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--salt",
        action="append",
        default=[],
        help="run once per salt (repeatable): each draws another split of the users",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    data = build_sequences(load_dataset(args.data))
    results = simulate(
        data,
        args.models_dir,
        arms_kind=args.arms,
        limit=args.users,
        redis_url=args.redis_url,
        salts=args.salt or [None],
    )
    for result in results:
        sys.stdout.write(render(result) + "\n\n")
    arms = [r for result in results for r in result["per_arm"].values()]
    within = sum(r["all_users_within_ci"] for r in arms)
    sys.stdout.write(
        f"{len(results)} split(s): {within} of {len(arms)} arms hold the all-users offline "
        "figure in their 95% interval (about 95% expected)\n"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if all(r["equal_on_arm_users"] for r in arms) else 1


if __name__ == "__main__":
    raise SystemExit(main())
