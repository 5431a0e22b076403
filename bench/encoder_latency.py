"""Serving latency of exported user encoders: one ONNX call at batch 1 and at batch 32, CPU.

    .venv/bin/python bench/encoder_latency.py --model sasrec --model hstu --max-len 50 \
        --results docs/encoder_latency.json
    .venv/bin/python bench/encoder_latency.py --checkpoint runs/ml1m-hstu/checkpoint.pt ...

Each encoder (``--model KIND``: built from the model flags with fresh weights, or
``--checkpoint PATH``: a trained one) is written by the project's export path
(``export_user_encoder``) and parity checked (``check_encoder_parity``), then run by the
service's ``OnnxUserEncoder`` with the service's default of one intra-op thread on full
windows (``max_len`` events each, whole-second gaps from one second to four months): the
case of users with long histories. The weights' values do not change the work an ONNX
graph does, so a fresh encoder times what a trained one of the same shape would.

The encoders are timed in alternating rounds, so a change of load on a shared machine
falls on all of them alike; per batch size the script prints the median and 90th
percentile of the wall time of one call, and the process CPU time per call (the work,
which another process's load does not stretch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.encoder import OnnxUserEncoder  # noqa: E402
from service.settings import Settings  # noqa: E402
from training import cli_options  # noqa: E402
from training.console import text_table  # noqa: E402
from training.models import build_encoder  # noqa: E402
from training.onnx_export import check_encoder_parity, export_user_encoder  # noqa: E402
from training.trainer import load_checkpoint  # noqa: E402

ITEMS = 1682  # the catalogue of fresh encoders (MovieLens-100k's); it only sizes the table


def histories(batch: int, max_len: int, n_items: int, rng: np.random.Generator):
    """Full windows of random items with log-uniform whole-second gaps."""
    ids = rng.integers(1, n_items + 1, size=(batch, max_len), dtype=np.int64)
    deltas = np.floor(10 ** rng.uniform(0, 7, size=(batch, max_len))).astype(np.float32)
    return ids, deltas


def encoders(args) -> dict:
    """Label -> trained or fresh model, each in eval mode."""
    models = {}
    for kind in args.model:
        options = cli_options.model_options(args, kind)
        torch.manual_seed(args.seed)
        models[f"{kind} (fresh)"] = build_encoder(kind, ITEMS, **options).eval()
    for path in args.checkpoint:
        model, payload = load_checkpoint(path)
        models[f"{payload['model']} ({path})"] = model.eval()
    return models


def time_calls(session: OnnxUserEncoder, inputs, calls: int) -> tuple[list[float], float]:
    """Wall seconds of each of ``calls`` calls, and process CPU seconds per call."""
    walls = []
    cpu = time.process_time()
    for i in range(calls):
        ids, deltas = inputs[i % len(inputs)]
        started = time.perf_counter()
        session.encode(ids, deltas)
        walls.append(time.perf_counter() - started)
    return walls, (time.process_time() - cpu) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli_options.add_model_flags(
        parser, "--max-len", "--dim", "--layers", "--heads", "--no-time", "--model-option"
    )
    parser.add_argument("--model", action="append", default=[], help="a fresh encoder kind")
    parser.add_argument("--checkpoint", action="append", default=[], type=Path)
    parser.add_argument("--batch", type=int, action="append", default=[])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=50, help="calls per round and batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, help="JSON file for the figures")
    args = parser.parse_args(argv)
    batch_sizes = args.batch or [1, 32]
    models = encoders(args)
    if not models:
        parser.error("name at least one --model or --checkpoint")
    threads = Settings.model_fields["onnx_threads"].default
    rng = np.random.default_rng(args.seed)
    sessions, inputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, model) in enumerate(models.items()):
            path = Path(tmp) / f"encoder-{i}.onnx"
            export_user_encoder(model, path)
            parity = check_encoder_parity(model, path)
            print(f"{label}: exported, parity {parity:.1e}", flush=True)
            sessions[label] = OnnxUserEncoder(path, "cpu", threads=threads)
            n_items = model.item_embedding.num_embeddings - 1
            inputs[label] = {
                b: [histories(b, model.max_len, n_items, rng) for _ in range(8)]
                for b in batch_sizes
            }
        for label, session in sessions.items():  # warm-up, untimed
            for b in batch_sizes:
                time_calls(session, inputs[label][b], 5)
        walls = {(label, b): [] for label in sessions for b in batch_sizes}
        cpus = {(label, b): [] for label in sessions for b in batch_sizes}
        for _ in range(args.rounds):
            for label, session in sessions.items():
                for b in batch_sizes:
                    wall, cpu = time_calls(session, inputs[label][b], args.calls)
                    walls[label, b].extend(wall)
                    cpus[label, b].append(cpu)
    rows, results = [], []
    for (label, b), wall in walls.items():
        ms = sorted(1e3 * w for w in wall)
        entry = {
            "encoder": label,
            "batch": b,
            "calls": len(ms),
            "median_ms": statistics.median(ms),
            "p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "cpu_ms_per_call": 1e3 * statistics.median(cpus[label, b]),
        }
        results.append(entry)
        rows.append([label, b, entry["median_ms"], entry["p90_ms"], entry["cpu_ms_per_call"]])
    print(text_table(["encoder", "batch", "median ms", "p90 ms", "CPU ms / call"], rows))
    if args.results:
        settings = {
            "max_len": args.max_len,
            "dim": args.dim,
            "layers": args.layers,
            "heads": args.heads,
            "onnx_threads": threads,
            "rounds": args.rounds,
            "calls": args.calls,
        }
        args.results.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
