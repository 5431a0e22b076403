"""The rerank gate against the test events: one row per retriever of each bundle given.

    .venv/bin/python bench/rerank_gate.py --bundle runs/gate/models/ml100k-gate \
        --bundle models/quickstart-20260101-000000 --results docs/rerank_gate.json

Reads what the export recorded in each bundle's manifest (``training.export``): the
gate's decision and its numbers on held-out validation users (``ctr_head.gate``), and the
exported head's effect on the test events at the same depth with its paired bootstrap
interval (``ctr_head.rerank_quality``). Prints a Markdown table of test NDCG@10 in
retrieval order and reranked, the gate's decision, and whether it was right on the test
(``training.rerank_gate.verdict_on_test``); writes the rows (and the diagnostic below)
to ``--results`` as JSON.
Nothing is trained or recomputed: the table is the bundles' own record.

``--data SPEC`` (once per ``--bundle``, in the same order; the data each was exported
from) adds one diagnostic, recomputed: the test difference of the users the gate measured
on (those held out of the head's training) apart from the others', which tells whether
the validation events or the users make the gate's numbers differ from the test's.

    .venv/bin/python bench/rerank_gate.py --bundle runs/gate/models/ml1m-gate \
        --data ml-1m:../shared/data/ml-1m
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.bundle import read_manifest  # noqa: E402
from service.errors import RecserveError  # noqa: E402
from training.rerank_gate import verdict_on_test  # noqa: E402


def gate_rows(bundle: Path) -> list[dict]:
    """One row per retriever of ``bundle`` that has a gated CTR head."""
    manifest = read_manifest(bundle)
    rows = []
    for name, entry in manifest["retrievers"].items():
        head = entry.get("ctr_head") or {}
        gate, test = head.get("gate"), head.get("rerank_quality")
        if gate is None or test is None or "ci" not in test:
            continue
        rows.append(
            {
                "bundle": bundle.name,
                "data": manifest["dataset"].get("source"),
                "retriever": name,
                "depth": test["depth"],
                "test_users": test["users"],
                "test_ndcg_retrieval": test["retrieval"]["ndcg@10"],
                "test_ndcg_reranked": test["reranked"]["ndcg@10"],
                "test_delta": test["delta"],
                "test_ci": test["ci"],
                "validation_users": gate["validation_users"],
                "valid_delta": gate["delta"],
                "valid_ci": gate["ci"],
                "rerank_by_default": gate["rerank_by_default"],
                "decided_by": gate["decided_by"],
                "verdict": verdict_on_test(gate["rerank_by_default"], test["delta"], test["ci"]),
            }
        )
    return rows


def test_by_users(bundle: Path, spec: str) -> dict:
    """The exported head's test difference (mean, 95% paired bootstrap interval) on the
    first retriever's users held out of its training and on the others."""
    from service.ranking import CtrHead
    from training.ctr import CtrConfig, prepare_ctr_data
    from training.data import build_sequences
    from training.datasets import load_dataset
    from training.rerank_gate import GateConfig, paired_bootstrap, per_user_ndcg

    manifest = read_manifest(bundle)
    (name, entry), *_ = manifest["retrievers"].items()
    head = entry["ctr_head"]
    depth = head["gate"]["depth"]
    # The users are drawn as the export drew them: the default seed and shares of the
    # head's config (what ``python -m training export --ctr-head`` uses).
    config = CtrConfig(candidates=depth, encoder=name)
    data = build_sequences(load_dataset(spec))
    prepared = prepare_ctr_data(data, bundle, config)
    served = CtrHead(bundle / head["file"], device="cpu", feature_names=head["feature_names"])
    gate = GateConfig()
    result = {"retriever": name}
    held_out = np.isin(prepared.test.users, prepared.holdout_users)
    for label, rows in (("held_out", held_out), ("trained_on", ~held_out)):
        subset = prepared.test.take(np.flatnonzero(rows)).first(depth)
        vectors = prepared.retriever.index.vectors
        retrieval, reranked = per_user_ndcg(served.score, subset, vectors, gate.cutoff)
        differences = reranked - retrieval
        result[label] = {
            "users": int(len(differences)),
            "delta": float(differences.mean()),
            "ci": list(paired_bootstrap(differences, gate.resamples, gate.seed, gate.confidence)),
        }
    return result


def interval(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def table(rows: list[dict]) -> str:
    lines = [
        "| bundle | retriever | test NDCG@10 retrieval | reranked | test difference (95% CI) | "
        "validation users | validation difference (95% CI) | rerank by default | "
        "right on test |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        valid = (
            "-"
            if row["valid_delta"] is None
            else f"{row['valid_delta']:+.4f} {interval(row['valid_ci'])}"
        )
        lines.append(
            f"| {row['bundle']} | {row['retriever']} | {row['test_ndcg_retrieval']:.4f} | "
            f"{row['test_ndcg_reranked']:.4f} | {row['test_delta']:+.4f} "
            f"{interval(row['test_ci'])} | {row['validation_users']} | {valid} | "
            f"{'yes' if row['rerank_by_default'] else 'no'} ({row['decided_by']}) | "
            f"{row['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle", action="append", type=Path, required=True, help="a bundle folder (repeat)"
    )
    parser.add_argument(
        "--data", action="append", default=[], help="the data of each --bundle, in order"
    )
    parser.add_argument("--results", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if args.data and len(args.data) != len(args.bundle):
        parser.error("--data: give one per --bundle, or none")
    try:
        rows = [row for bundle in args.bundle for row in gate_rows(bundle)]
        split = [test_by_users(b, spec) for b, spec in zip(args.bundle, args.data, strict=False)]
    except RecserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for bundle, users in zip(args.bundle, split, strict=False):
        for label in ("held_out", "trained_on"):
            entry = users[label]
            print(
                f"{bundle.name} {users['retriever']}: test difference of the {entry['users']} "
                f"users {label.replace('_', ' ')} {entry['delta']:+.4f} {interval(entry['ci'])}"
            )
    if not rows:
        print("error: no retriever of these bundles has a gated CTR head", file=sys.stderr)
        return 2
    print(table(rows))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        by_users = {bundle.name: users for bundle, users in zip(args.bundle, split, strict=False)}
        args.results.write_text(json.dumps({"rows": rows, "test_by_users": by_users}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
