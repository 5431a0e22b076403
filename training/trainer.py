"""Train a user encoder: epochs with a progress bar on a terminal (``training.console``)
and one line per epoch, early stopping on valid NDCG@10 (or a time limit), a checkpoint
that carries its config, a JSON report and a PNG training curve.

Run it through the CLI::

    python -m training train --data synthetic --model sasrec --out runs/default
    python -m training train --data ml-1m:../shared/data/ml-1m --max-len 200 --out runs/ml1m

The sequential objective trains on every position of a window: the state after each
prefix of the window predicts the next event. ``TrainConfig.windows`` says which windows of
a user's training events an epoch covers (``epoch_windows``): ``last``, the newest
``max_len`` events; ``crop``, a random ``max_len`` of a longer history, drawn again each
epoch; ``sliding``, windows that make every training event a target exactly once.
``TrainConfig.augmentation`` adds a contrastive term between two augmented views of each
window to the next-item loss (``training.augment``).
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

from training.augment import augment_settings, build_augmentation
from training.console import progress_bar, report_epoch
from training.data import SequenceData, left_padded_window
from training.errors import CheckpointError, ConfigError
from training.evaluate import evaluate, model_scorer, popularity_scorer
from training.losses import Objective, build_objective, is_count
from training.models import build_encoder, encoder_config
from training.models.base import UserEncoder
from training.optimizers import build_optimizer

LOG = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1

# How an epoch covers each user's training events (see ``epoch_windows``).
WINDOW_MODES = ("last", "crop", "sliding")
# Each encoder's mode when none is named. Sliding windows score every training event and
# beat the newest window alone on MovieLens-100k (docs/BENCHMARKS.md, "Windows per
# epoch"); the HSTU-kind trains as the SASRec-kind it is measured against; the two-tower
# model keeps the newest window until it is measured too.
DEFAULT_WINDOWS = {"sasrec": "sliding", "nextitnet": "sliding", "hstu": "sliding"}


def default_windows(model: str) -> str:
    """The window mode ``model`` trains with when none is named."""
    return DEFAULT_WINDOWS.get(model, "last")


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
    windows: str | None = None  # one of WINDOW_MODES; None: default_windows(model)
    # sliding: new targets per window (0: max_len). Below max_len each window also reads
    # max_len - stride earlier events as context without scoring them again.
    window_stride: int = 0
    # The encoder reads each batch in up to this many groups of windows of similar width
    # (UserEncoder.states_by_width): the same batch and loss, less padding computed where
    # histories are short and uneven; 1: one pass at the batch's widest window.
    width_groups: int = 1
    model_options: dict = field(default_factory=dict)
    loss_options: dict = field(default_factory=dict)
    # training.augment.AUGMENTATIONS; None or "none": the next-item loss alone.
    augmentation: str | None = None
    augment_options: dict = field(default_factory=dict)  # training.augment.TiCoSeRecConfig

    def __post_init__(self) -> None:
        if self.windows is None:
            self.windows = default_windows(self.model)
        check_windows(self.windows, self.window_stride)
        if not is_count(self.width_groups, 1):
            raise ConfigError(
                "width_groups (--width-groups) must be a positive count (1: one pass), "
                f"not {self.width_groups!r}"
            )
        if self.augmentation == "none":
            self.augmentation = None
        augment_settings(self.augmentation, self.augment_options)


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


@dataclass
class Windows:
    """One epoch's training windows, one row each, as indices into ``SequenceData.items``.

    A window reads the last ``max_len`` events of ``[start, end - 1)`` and predicts the
    last ``max_len`` of ``[start + 1, end)``; only targets at ``first_target`` or later are
    scored. ``start`` stays the user's first event so that the first event of a window
    keeps the time gap to the event before it.
    """

    starts: np.ndarray  # int64 [W]
    ends: np.ndarray  # int64 [W], at most the user's training end
    first_targets: np.ndarray  # int64 [W]

    def __len__(self) -> int:
        return len(self.starts)

    def targets(self) -> int:
        """How many targets these windows score (padding and masked positions left out)."""
        return int((self.ends - self.first_targets).sum())


def check_windows(mode: str, stride: int = 0) -> None:
    """Refuse an unknown window mode or a negative stride, naming the option."""
    if mode not in WINDOW_MODES:
        raise ConfigError(
            f"windows (--windows) must be one of {', '.join(WINDOW_MODES)}, not {mode!r}"
        )
    if not is_count(stride, 0):
        raise ConfigError(
            f"window_stride (--window-stride) must be 0 (max_len) or a positive count, "
            f"not {stride!r}"
        )


def epoch_windows(
    data: SequenceData,
    mode: str,
    max_len: int,
    rng: np.random.Generator,
    stride: int = 0,
) -> Windows:
    """The windows one epoch trains on, per user with at least one training transition.

    - ``last``: the newest ``max_len`` targets of each user (earlier events are only
      context, and of a history longer than ``max_len + 1`` never read at all);
    - ``crop``: for a user with more than ``max_len`` targets, ``max_len`` consecutive
      ones at a placement drawn uniformly from ``rng`` (so every event is a target in some
      epochs, those within ``max_len`` of either end of the history less often than the
      middle ones); shorter histories whole;
    - ``sliding``: each user's targets cut into runs of ``stride`` (default ``max_len``)
      from the newest back, one window per run, so every training event after a user's
      first is a target exactly once per epoch. A window reads the ``max_len`` events
      before its last target; with ``stride < max_len`` the earlier of those are context
      only.

    Only training events (``SequenceData.train_end``) are ever read.
    """
    check_windows(mode, stride)
    starts, ends = training_windows(data)
    targets = ends - starts - 1  # (U,) transitions per user, each >= 1
    if mode == "last":
        return Windows(starts, ends, np.maximum(starts + 1, ends - max_len))
    if mode == "crop":
        spare = np.maximum(targets - max_len, 0)  # how far back the window may start
        # rng.integers(0, spare + 1) is uniform over the spare + 1 placements of each user.
        back = rng.integers(0, spare + 1)
        crop_ends = ends - back
        return Windows(starts, crop_ends, np.maximum(starts + 1, crop_ends - max_len))
    stride = min(stride or max_len, max_len)
    runs = -(-targets // stride)  # (U,) windows per user
    user = np.repeat(np.arange(len(starts)), runs)  # (W,)
    # k-th window of its user, counted from the newest (0) back.
    k = np.arange(len(user)) - np.repeat(np.cumsum(runs) - runs, runs)
    window_ends = ends[user] - k * stride
    first = np.maximum(starts[user] + 1, window_ends - stride)
    return Windows(starts[user], window_ends, first)


def epoch_batches(data: SequenceData, config: TrainConfig, max_len: int, rng: np.random.Generator):
    """One epoch of ``config``'s windows (``epoch_windows``) as shuffled batches
    (``batches``), and how many windows they hold."""
    windows = epoch_windows(data, config.windows, max_len, rng, config.window_stride)
    return len(windows), batches(
        data,
        windows.starts,
        windows.ends,
        max_len,
        batch_size=config.batch_size,
        rng=rng,
        first_targets=windows.first_targets,
    )


def batches(
    data: SequenceData,
    starts: np.ndarray,
    ends: np.ndarray,
    max_len: int,
    *,
    batch_size: int,
    rng: np.random.Generator,
    first_targets: np.ndarray | None = None,
):
    """Shuffled batches of (item_ids, time_deltas, targets), each (b, L), left-padded.

    Row i reads the last ``max_len`` events of ``[starts[i], ends[i] - 1)`` and predicts
    the next event at each position; a target before ``first_targets[i]`` (when given)
    is set to padding, so the loss leaves it out.
    """
    order = rng.permutation(len(starts))
    for lo in range(0, len(order), batch_size):
        chosen = order[lo : lo + batch_size]
        s, e = starts[chosen], ends[chosen]
        inputs, deltas = left_padded_window(data.items, data.timestamps, s, e - 1, max_len)
        targets, _ = left_padded_window(data.items, data.timestamps, s + 1, e, max_len)
        if first_targets is not None:
            width = targets.shape[1]
            # Column c of row i predicts event e_i - width + c (padding columns are 0 already).
            position = e[:, None] - width + np.arange(width)  # (b, L)
            targets = np.where(position >= first_targets[chosen][:, None], targets, 0)
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
    *,
    groups: int = 1,
) -> torch.Tensor:
    """The objective over every position that has a next item, the encoder reading the
    batch in up to ``groups`` width groups (``UserEncoder.states_by_width``)."""
    states, scored = [], []
    for rows, width, group_states in model.states_by_width(item_ids, time_deltas, groups):
        group_targets = (targets if rows is None else targets[rows])[:, -width:]
        has_target = group_targets > 0
        states.append(group_states[has_target])
        scored.append(group_targets[has_target])
    return objective(torch.cat(states), torch.cat(scored), model.item_embedding.weight)


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
    augmentation = build_augmentation(
        config.augmentation, config.augment_options, data, model.max_len, config.seed
    )
    optimizer = build_optimizer(
        "adam", model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    starts, _ = training_windows(data)
    if len(starts) == 0:
        raise ConfigError("no user has two training events: nothing to learn from")
    LOG.info("training %s on %d sequences, windows: %s", config.model, len(starts), config.windows)

    history: list[dict] = []
    best = {"ndcg@10": -1.0, "epoch": 0, "state": None}
    stale = 0
    stopped = "epochs"
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses, contrastive_losses = [], []  # the latter: the part of losses --augment adds
        count, epoch_batch = epoch_batches(data, config, model.max_len, rng)
        progress = progress_bar(
            epoch_batch,
            total=math.ceil(count / config.batch_size),
            desc=f"{config.model} epoch {epoch}/{config.epochs}",
            unit="batch",
        )
        for item_ids, deltas, targets in progress:
            loss = sequence_loss(
                model,
                objective,
                item_ids.to(device),
                deltas.to(device),
                targets.to(device),
                groups=config.width_groups,
            )
            if augmentation is not None:
                contrastive = augmentation.loss(
                    model, item_ids, deltas, device, groups=config.width_groups
                )
                loss = loss + contrastive
                contrastive_losses.append(contrastive.item())
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
        if augmentation is not None:
            record["contrastive_loss"] = float(np.mean(contrastive_losses))
            record["augment_seconds"] = augmentation.take_seconds()
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
