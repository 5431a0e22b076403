"""The rerank gate against the test events: one row per retriever of each bundle given.

    .venv/bin/python bench/rerank_gate.py --bundle runs/gate/models/ml100k-gate \
        --bundle models/quickstart-20260101-000000 --results docs/rerank_gate.json

Reads what the export recorded in each bundle's manifest (``training.export``): the
gate's decision and its numbers on held-out validation users (``ctr_head.gate``), and the
exported head's effect on the test events at the same depth with its paired bootstrap
interval (``ctr_head.rerank_quality``). Prints a Markdown table of test NDCG@10 in
retrieval order and reranked, the gate's decision, and whether it was right on the test
(``training.rerank_gate.verdict_on_test``); writes the rows to ``--results`` as JSON.
Nothing is trained or recomputed: the table is the bundles' own record.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    parser.add_argument("--results", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    try:
        rows = [row for bundle in args.bundle for row in gate_rows(bundle)]
    except RecserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("error: no retriever of these bundles has a gated CTR head", file=sys.stderr)
        return 2
    print(table(rows))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
