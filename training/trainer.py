"""Train a user encoder: epochs with a progress bar on a terminal (``training.console``)
and one line per epoch, early stopping on valid NDCG@10 (or a time limit), a checkpoint
that carries its config, a JSON report and a PNG training curve.

Run it through the CLI::

    python -m training train --data synthetic --model sasrec --out runs/default
    python -m training train --data ml-1m:../shared/data/ml-1m --max-len 200 --out runs/ml1m

The sequential objective trains on every position: the state after each prefix of a
user's training events predicts the next event.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.console import progress_bar, report_epoch
from training.data import SequenceData, left_padded_window
from training.errors import CheckpointError, ConfigError
from training.evaluate import evaluate, model_scorer, popularity_scorer
from training.losses import Objective, build_objective
from training.models import build_encoder, encoder_config
from training.models.base import UserEncoder
from training.optimizers import build_optimizer

LOG = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """Optimisation settings; the model's own settings live in its config dataclass."""

    model: str = "sasrec"
    loss: str = "full_softmax"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5  # evaluations without a better valid NDCG@10 before stopping
    eval_every: int = 1
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    max_seconds: float = 0.0  # stop after the epoch that passes this many seconds (0: none)
    model_options: dict = field(default_factory=dict)
    loss_options: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    model: UserEncoder
    report: dict
    checkpoint: Path


def training_windows(data: SequenceData) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of the training events of users that have at least one transition."""
    starts, ends = data.offsets[:-1], data.train_end()
    keep = ends - starts >= 2
    return starts[keep], ends[keep]


def batches(
    data: SequenceData,
    starts: np.ndarray,
    ends: np.ndarray,
    max_len: int,
    *,
    batch_size: int,
    rng: np.random.Generator,
):
    """Shuffled batches of (item_ids, time_deltas, targets), each (b, L), left-padded."""
    order = rng.permutation(len(starts))
    for lo in range(0, len(order), batch_size):
        chosen = order[lo : lo + batch_size]
        s, e = starts[chosen], ends[chosen]
        inputs, deltas = left_padded_window(data.items, data.timestamps, s, e - 1, max_len)
        targets, _ = left_padded_window(data.items, data.timestamps, s + 1, e, max_len)
        yield (
            torch.from_numpy(inputs),
            torch.from_numpy(deltas),
            torch.from_numpy(targets),
        )


def sequence_loss(
    model: UserEncoder,
    objective: Objective,
    item_ids: torch.Tensor,
    time_deltas: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """The objective over every position that has a next item."""
    states = model.hidden_states(item_ids, time_deltas)  # (b, L, d)
    has_target = targets > 0
    return objective(states[has_target], targets[has_target], model.item_embedding.weight)


def train(data: SequenceData, config: TrainConfig, out_dir: str | Path) -> TrainResult:
    """Train, early-stop on valid NDCG@10, evaluate on test, and write the run folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)

    objective = build_objective(config.loss, data.train_item_counts(), **config.loss_options)
    objective = objective.to(device)
    model = build_encoder(config.model, data.n_items, **config.model_options).to(device)
    model.normalize_items = objective.cosine
    optimizer = build_optimizer(
        "adam", model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    starts, ends = training_windows(data)
    if len(starts) == 0:
        raise ConfigError("no user has two training events: nothing to learn from")
    n_batches = math.ceil(len(starts) / config.batch_size)
    LOG.info(
        "training %s on %d sequences, %d batches per epoch", config.model, len(starts), n_batches
    )

    history: list[dict] = []
    best = {"ndcg@10": -1.0, "epoch": 0, "state": None}
    stale = 0
    stopped = "epochs"
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses = []
        progress = progress_bar(
            batches(data, starts, ends, model.max_len, batch_size=config.batch_size, rng=rng),
            total=n_batches,
            desc=f"{config.model} epoch {epoch}/{config.epochs}",
            unit="batch",
        )
        for item_ids, deltas, targets in progress:
            loss = sequence_loss(
                model, objective, item_ids.to(device), deltas.to(device), targets.to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        record = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "seconds": time.perf_counter() - started,
        }
        out_of_time = (
            bool(config.max_seconds)
            and record["seconds"] >= config.max_seconds
            and epoch < config.epochs
        )
        if epoch % config.eval_every == 0 or epoch == config.epochs or out_of_time:
            model.eval()
            valid = evaluate(model_scorer(model), data, "valid", model.max_len, device=str(device))
            record["valid"] = valid
            if valid["ndcg@10"] > best["ndcg@10"]:
                best = {
                    "ndcg@10": valid["ndcg@10"],
                    "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                }
                stale = 0
                # A long run that is cut off still leaves its best model behind; the final
                # checkpoint below replaces this one with the full report.
                partial = {"model": config.model, "best_epoch": epoch, "history": history}
                save_checkpoint(model, config, data, partial, out_dir / "checkpoint.pt")
            else:
                stale += 1
        history.append(record)
        report_epoch(config.model, record, config.epochs)
        if stale >= config.patience:
            LOG.info("early stop: no better valid NDCG@10 for %d evaluations", stale)
            stopped = "patience"
            break
        if out_of_time:
            LOG.info("stopped at the time limit of %.0fs", config.max_seconds)
            stopped = "time limit"
            break
    train_seconds = time.perf_counter() - started

    model.load_state_dict(best["state"])
    model.eval()
    report = {
        "model": config.model,
        "data": data.summary(),
        "train_config": asdict(config),
        "model_config": encoder_config(model),
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "stopped_by": stopped,
        "train_seconds": train_seconds,
        "history": history,
        "metrics": evaluation_report(model, data),
    }
    checkpoint = out_dir / "checkpoint.pt"
    save_checkpoint(model, config, data, report, checkpoint)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_training_curve(
        history, out_dir / "training_curve.png", title=f"{config.model} on {data.source}"
    )
    return TrainResult(model=model, report=report, checkpoint=checkpoint)


def evaluation_report(model: UserEncoder, data: SequenceData) -> dict:
    """Valid and test metrics of the model with the popularity baseline beside them."""
    device = str(next(model.parameters()).device)
    scorers = {"model": model_scorer(model), "popularity": popularity_scorer(data)}
    return {
        name: {
            split: evaluate(scorer, data, split, model.max_len, device=device)
            for split in ("valid", "test")
        }
        for name, scorer in scorers.items()
    }


def save_checkpoint(
    model: UserEncoder, config: TrainConfig, data: SequenceData, report: dict, path: Path
) -> None:
    """Weights with everything needed to rebuild and export the model, loadable without pickle."""
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": config.model,
            "model_config": encoder_config(model),
            "normalize_items": model.normalize_items,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "train_config": json.dumps(asdict(config)),
            "report": json.dumps(report),
            "item_ids": data.item_map.raw.tolist(),
            "item_counts": torch.from_numpy(data.train_item_counts()),
        },
        path,
    )


def load_checkpoint(path: str | Path) -> tuple[UserEncoder, dict]:
    """Rebuild the encoder from a checkpoint (``weights_only``: no pickle is executed).

    A missing or unreadable file, another format, or fields that do not rebuild a model
    raise ``CheckpointError`` naming the file.
    """
    payload = read_checkpoint(path)
    try:
        options = dict(payload["model_config"])
        n_items = options.pop("n_items")
        model = build_encoder(payload["model"], n_items, **options)
        model.load_state_dict(payload["state_dict"])
        model.normalize_items = bool(payload["normalize_items"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: checkpoint has no field {exc.args[0]!r}") from exc
    except (ConfigError, RuntimeError) as exc:  # RuntimeError: weights of other shapes
        raise CheckpointError(f"{path}: {first_line(exc)}") from exc
    model.eval()
    return model, payload


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's payload, checked to be a dict of this ``CHECKPOINT_FORMAT``."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such file") from exc
    except Exception as exc:  # torch raises several unrelated types for a file of another kind
        problem = f"{type(exc).__name__}: {first_line(exc)}"
        raise CheckpointError(f"{path}: not a readable checkpoint ({problem})") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(payload).__name__})")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {payload.get('format')} is not {CHECKPOINT_FORMAT}"
        )
    return payload


def check_same_items(path: str | Path, payload: dict, data: SequenceData) -> None:
    """Refuse a checkpoint trained on other items than ``data`` has (ids or order)."""
    if payload["item_ids"] != data.item_map.raw.tolist():
        raise CheckpointError(f"{path}: trained on other items than {data.source or 'the data'}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (some libraries write paragraphs)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plot_training_curve(history: list[dict], path: Path, title: str) -> None:
    """Loss and valid NDCG@10 per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(epochs, [h["loss"] for h in history], marker="o")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    evaluated = [h for h in history if "valid" in h]
    right.plot(
        [h["epoch"] for h in evaluated],
        [h["valid"]["ndcg@10"] for h in evaluated],
        marker="o",
        color="tab:green",
    )
    right.set_xlabel("epoch")
    right.set_ylabel("valid NDCG@10")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
