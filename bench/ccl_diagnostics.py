"""Geometry and gradients of a training run, per epoch: why a cosine objective does or does
not train an encoder.

    ML=ml-100k:../shared/data/ml-100k
    OMP_NUM_THREADS=1 .venv/bin/python bench/ccl_diagnostics.py --data $ML --model sasrec \
        --loss ccl --epochs 10 --threads 1 --out runs/diag/sasrec-ccl.json

The loop is the trainer's (``epoch_batches``, ``sequence_loss``'s selection
of positions), with the same seeds, so a run here trains as ``python -m training train``
would; it adds, per epoch, averages over every ``--probe-every``-th batch of:

- ``state_norm`` and ``item_norm``: the lengths of the states the objective scores and of
  the item table's rows (every item, and the batch's targets: tied tables feed both the
  encoder's input and its output);
- ``cos_pos``, ``cos_neg``: mean cosine of a state with its target and with uniform items;
  ``cos_neg_p99``: the 99th percentile of the latter; ``cos_items``: mean cosine between
  uniform pairs of items and ``cos_states``: between states of one batch (both near 1
  when everything has collapsed onto one direction);
- ``active``: share of (state, uniform item) pairs with cosine above the CCL margin (0
  for another objective), the hinge terms that give a gradient;
- ``rank_pos``: the mean share of uniform items that score above the target by cosine
  (0.5 is chance);
- ``grad_items_out``, ``grad_items_in``: the norm of the item table's gradient through the
  objective (the output side) and through the encoder's input; ``grad_encoder``: of every
  other parameter;
- ``loss`` and the valid NDCG@10 of the epoch;
- with a cross-batch memory (``cbns_softmax``), as the step finds it before using it:
  ``memory_share``, the share of the negatives' softmax mass on the memory's columns
  (the in-batch items get only the rest of the push-down gradient: memory entries are
  constants unless refreshed); ``memory_drift``, the mean distance of a stored vector
  from its item's row in the current table, relative to that row's length (0 when
  refreshed), and ``memory_logit_drift``, what that moves a state's logit by (mean
  absolute value). 0 before the warm-up ends.

Any objective can be probed (cosines are measured with the same uniform items for
``full_softmax`` too), so a collapsing run can be held against one that trains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import cli_options  # noqa: E402
from training.data import build_sequences  # noqa: E402
from training.datasets import load_dataset  # noqa: E402
from training.evaluate import evaluate, model_scorer  # noqa: E402
from training.losses import CosineContrastiveLoss, build_objective  # noqa: E402
from training.models import build_encoder  # noqa: E402
from training.optimizers import build_optimizer  # noqa: E402
from training.trainer import epoch_batches  # noqa: E402

PROBE_NEGATIVES = 1000


def probe(states, targets, table, margin: float) -> dict:
    """The geometry of one batch (no gradient): see the module docstring."""
    with torch.no_grad():
        uniform = torch.randint(1, table.shape[0], (PROBE_NEGATIVES,))
        users = F.normalize(states, dim=-1)
        items = F.normalize(table, dim=-1)
        pos = (users * items[targets]).sum(-1)  # (p,)
        neg = users @ items[uniform].T  # (p, n)
        pairs = (items[uniform] * items[uniform.roll(1)]).sum(-1)
        sample = users[torch.randperm(len(users))[:256]]
        cos_states = sample @ sample.T
        off_diagonal = ~torch.eye(len(sample), dtype=torch.bool)
        return {
            "state_norm": states.norm(dim=-1).mean().item(),
            "item_norm": table[1:].norm(dim=-1).mean().item(),
            "target_norm": table[targets].norm(dim=-1).mean().item(),
            "cos_pos": pos.mean().item(),
            "cos_neg": neg.mean().item(),
            "cos_neg_p99": torch.quantile(neg.flatten()[:1_000_000], 0.99).item(),
            "cos_items": pairs.mean().item(),
            "cos_states": cos_states[off_diagonal].mean().item(),
            "active": (neg > margin).float().mean().item(),
            "rank_pos": (neg > pos[:, None]).float().mean().item(),
        }


def memory_probe(objective, states, targets, table) -> dict:
    """The cross-batch memory as this step finds it (see the module docstring); {} without."""
    memory = getattr(objective, "memory", None)
    if memory is None:
        return {}
    with torch.no_grad():
        stored = memory.negatives(table)
        if stored is None:
            return {"memory_share": 0.0, "memory_drift": 0.0, "memory_logit_drift": 0.0}
        vectors, ids = stored
        now = table[ids]
        logits, _, batch_ids = objective.logits(states, targets, table)
        n_batch = len(batch_ids)
        mass = logits.softmax(-1)
        share = mass[:, 1 + n_batch :].sum(-1) / mass[:, 1:].sum(-1).clamp(min=1e-12)
        sample = states[torch.randperm(len(states))[:256]]
        return {
            "memory_share": share.mean().item(),
            "memory_drift": ((vectors - now).norm(dim=-1) / now.norm(dim=-1)).mean().item(),
            "memory_logit_drift": (sample @ (vectors - now).T).abs().mean().item(),
        }


def grad_norms(model, out_table) -> dict:
    """The item table's gradient split into its output and input sides, and the rest's."""
    total = model.item_embedding.weight.grad
    out = out_table.grad
    others = [
        p.grad.norm() ** 2
        for name, p in model.named_parameters()
        if p.grad is not None and name != "item_embedding.weight"
    ]
    return {
        "grad_items_out": out.norm().item(),
        "grad_items_in": (total - out).norm().item(),
        "grad_encoder": torch.stack(others).sum().sqrt().item() if others else 0.0,
    }


def run(args) -> list[dict]:
    """Train as the trainer does and return one record of averaged probes per epoch."""
    config = cli_options.train_config(args)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    data = build_sequences(load_dataset(args.data))
    objective = build_objective(config.loss, data.train_item_counts(), **config.loss_options)
    model = build_encoder(config.model, data.n_items, **config.model_options)
    model.normalize_items = objective.cosine
    optimizer = build_optimizer(
        "adam", model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    margin = objective.margin if isinstance(objective, CosineContrastiveLoss) else 0.0
    history = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        probes, losses = [], []
        _, epoch_batch = epoch_batches(data, config, model.max_len, rng)
        for step, (item_ids, deltas, targets) in enumerate(epoch_batch):
            states = model.hidden_states(item_ids, deltas)
            has_target = targets > 0
            states, targets = states[has_target], targets[has_target]
            # A copy of the table on the output side only, so its gradient can be told
            # apart from the one the encoder's input sends to the same rows.
            out_table = model.item_embedding.weight * 1.0
            out_table.retain_grad()
            if step % args.probe_every == 0:  # before the step pushes into the memory
                memory = memory_probe(objective, states, targets, out_table)
            loss = objective(states, targets, out_table)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step % args.probe_every == 0:
                probes.append(
                    {
                        **probe(states, targets, out_table, margin),
                        **grad_norms(model, out_table),
                        **memory,
                    }
                )
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        valid = evaluate(model_scorer(model), data, "valid", model.max_len)
        record = {
            "epoch": epoch,
            "seconds": round(time.perf_counter() - started, 1),
            "loss": float(np.mean(losses)),
            "valid_ndcg@10": valid["ndcg@10"],
            **{k: float(np.mean([p[k] for p in probes])) for k in probes[0]},
        }
        history.append(record)
        print(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
        )
        sys.stdout.flush()
    return history


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli_options.add_data_flags(parser)
    cli_options.add_model_flags(parser)
    cli_options.add_training_flags(
        parser,
        "--loss",
        "--loss-option",
        "--epochs",
        "--batch-size",
        "--lr",
        "--weight-decay",
        "--windows",
        "--window-stride",
        "--seed",
        "--threads",
    )
    parser.add_argument("--probe-every", type=int, default=10, help="batches between probes")
    parser.add_argument("--out", type=Path, help="write the per-epoch records here (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    history = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"argv": argv or sys.argv[1:], "history": history}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
