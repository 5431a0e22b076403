"""The quickstart: every retriever kind on the default data, one bundle, one table.

    python -m training quickstart --data synthetic --out runs/quickstart --models-dir models

``scripts/start.sh`` runs it when there is no bundle yet. It trains the SASRec-kind and
the two-tower retrievers, and the NextItNet-kind when the time budget has room for it
(``training.trainer.train``, one run folder each under ``--out``), exports them into one
bundle with a CTR head per retriever (``training.export.export_bundle``; the SASRec-kind
stays the bundle's default encoder) and returns what was measured: every retriever's test
metrics beside popularity's, and each head's effect on the test events at the served
depth (NDCG@10 in retrieval order vs reranked, the manifest's ``ctr_head.rerank_quality``)
and whether the head reranks by default (the gate of ``training.rerank_gate``, decided on
held-out validation users: ``ctr_head.gate``). ``summary_table`` puts them in one table.

The recipes' epochs are those after which valid NDCG@10 on the default data gains little
more; each run also has a time limit, so a slow or busy machine gets a weaker model
rather than a start that never ends (the report says which limit stopped each run).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from service.bundle import read_manifest
from service.settings import Settings
from training.console import PROGRESS, text_table
from training.ctr import CtrConfig
from training.data import SequenceData
from training.errors import ConfigError
from training.export import export_bundle
from training.trainer import TrainConfig, train

# The depth the service retrieves and reranks by default: the head is trained and judged there.
SERVED_DEPTH = Settings.model_fields["candidates"].default

METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr")


@dataclass
class Recipe:
    """How the quickstart trains one retriever."""

    train: TrainConfig
    optional: bool = False  # trained only when the budget left has room for it


def default_recipes() -> tuple[Recipe, ...]:
    """SASRec-kind and two-tower always, NextItNet-kind when there is time; SASRec-kind first
    (the bundle's default encoder). On the default data each recipe's valid NDCG@10 gains
    little after its epochs (a higher learning rate than the CLI's reaches that sooner); a
    time limit of about one and a half times a run's time on an idle 2-core machine keeps
    a busy machine's start from running on.

    The SASRec-kind trains on sliding windows (every training event a target): on the
    default data five such epochs cost about what six of the newest window did and reach
    the same valid NDCG@10, and on data with longer histories they score events the newest
    window never reaches. The NextItNet-kind keeps the newest window its recipe was tuned
    with (``TrainConfig.windows``)."""
    return (
        Recipe(
            TrainConfig(
                model="sasrec", epochs=5, lr=2e-3, patience=2, max_seconds=75, windows="sliding"
            )
        ),
        Recipe(TrainConfig(model="two_tower", epochs=6, lr=3e-3, patience=2, max_seconds=35)),
        Recipe(
            TrainConfig(
                model="nextitnet", epochs=6, lr=5e-3, patience=2, max_seconds=60, windows="last"
            ),
            optional=True,
        ),
    )


def default_ctr() -> CtrConfig:
    """The CTR head of every retriever, trained at the served depth on the positive and 20
    sampled negatives per user and batch, which keeps its training short."""
    return CtrConfig(candidates=SERVED_DEPTH, epochs=6, negatives=20)


@dataclass
class QuickstartConfig:
    """What the quickstart trains and how long it may take."""

    recipes: tuple[Recipe, ...] = field(default_factory=default_recipes)
    # Seconds for the training of every retriever together: an optional one starts only
    # with at least ``optional_min_seconds`` of it left (the NextItNet-kind needs about
    # five epochs before it beats the others' first), and stops when it is spent.
    budget_seconds: float = 110.0
    optional_min_seconds: float = 35.0
    ctr: CtrConfig = field(default_factory=default_ctr)
    # Torch threads. One: on a 2-core machine that something else keeps busy, two threads
    # that wait for each other made an epoch several times slower than one thread did.
    threads: int = 1

    def with_limits(
        self, *, epochs: int = 0, head_epochs: int = 0, models: list[str] | None = None
    ) -> QuickstartConfig:
        """This config with ``epochs`` for every retriever and ``head_epochs`` for every CTR
        head (0: the recipes'), and only the retrievers named in ``models`` (None: all), in
        the recipes' order."""
        known = [recipe.train.model for recipe in self.recipes]
        unknown = sorted(set(models or []) - set(known))
        if unknown:
            raise ConfigError(
                f"the quickstart has no recipe for {', '.join(unknown)} (it has {', '.join(known)})"
            )
        recipes = tuple(
            replace(recipe, train=replace(recipe.train, epochs=epochs or recipe.train.epochs))
            for recipe in self.recipes
            if models is None or recipe.train.model in models
        )
        ctr = replace(self.ctr, epochs=head_epochs or self.ctr.epochs)
        return replace(self, recipes=recipes, ctr=ctr)


@dataclass
class QuickstartResult:
    """The bundle written and what was measured on the way."""

    bundle: Path
    manifest: dict
    seconds: dict[str, float]  # per step: each retriever's training, "export", "total"
    skipped: list[str]  # optional retrievers the budget had no room for
    stopped_by: dict[str, str]  # per retriever: "epochs", "patience" or "time limit"

    def to_json(self) -> dict:
        """The summary written beside the run folders (``summary.json``)."""
        retrievers = self.manifest["retrievers"]
        return {
            "bundle": str(self.bundle),
            "seconds": self.seconds,
            "skipped": self.skipped,
            "stopped_by": self.stopped_by,
            "test": {
                **{
                    name: entry["offline_metrics"]["model"]["test"]
                    for name, entry in retrievers.items()
                },
                "popularity": popularity_metrics(self.manifest),
            },
            "rerank_quality": {
                name: entry["ctr_head"]["rerank_quality"]
                for name, entry in retrievers.items()
                if "ctr_head" in entry
            },
            "rerank_gate": {
                name: entry["ctr_head"].get("gate")
                for name, entry in retrievers.items()
                if "ctr_head" in entry
            },
        }


def run_quickstart(
    data: SequenceData,
    out_dir: str | Path,
    models_dir: str | Path,
    config: QuickstartConfig | None = None,
) -> QuickstartResult:
    """Train the recipes' retrievers on ``data`` (run folders under ``out_dir``), export
    them with a CTR head each into one new bundle of ``models_dir`` and make it CURRENT."""
    config = config or QuickstartConfig()
    if not config.recipes:
        raise ConfigError("the quickstart has no retriever to train")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    checkpoints, skipped, stopped_by = [], [], {}
    for recipe in config.recipes:
        name = recipe.train.model
        left = config.budget_seconds - (time.perf_counter() - started)
        limit = time_limit(recipe, left, config.optional_min_seconds)
        if limit is None:
            PROGRESS.info("%s: left out, %.0fs of the training budget left", name, left)
            skipped.append(name)
            continue
        PROGRESS.info("== training %s", name)
        step = time.perf_counter()
        train_config = replace(recipe.train, max_seconds=limit, threads=config.threads)
        result = train(data, train_config, out_dir / name)
        seconds[name] = time.perf_counter() - step
        stopped_by[name] = result.report["stopped_by"]
        checkpoints.append(result.checkpoint)
    PROGRESS.info("== exporting %s with a CTR head each", ", ".join(stopped_by))
    step = time.perf_counter()
    name = datetime.now(timezone.utc).strftime("quickstart-%Y%m%d-%H%M%S")
    bundle = export_bundle(checkpoints, data, models_dir, name=name, ctr=config.ctr)
    seconds["export"] = time.perf_counter() - step
    seconds["total"] = time.perf_counter() - started
    result = QuickstartResult(
        bundle=bundle,
        manifest=read_manifest(bundle),
        seconds=seconds,
        skipped=skipped,
        stopped_by=stopped_by,
    )
    (out_dir / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


def time_limit(recipe: Recipe, left: float, optional_min_seconds: float) -> float | None:
    """The time limit of a recipe's training (0: none) with ``left`` seconds of the budget
    left; None when it is optional and less than ``optional_min_seconds`` are left."""
    if not recipe.optional:
        return recipe.train.max_seconds
    if left < optional_min_seconds:
        return None
    return min(recipe.train.max_seconds, left) if recipe.train.max_seconds else left


def popularity_metrics(manifest: dict) -> dict:
    """Popularity's test metrics (the same beside every retriever: one data set)."""
    first = next(iter(manifest["retrievers"].values()))
    return first["offline_metrics"]["popularity"]["test"]


def summary_table(result: QuickstartResult) -> str:
    """Per retriever its test metrics, its CTR head's NDCG@10 in retrieval order and
    reranked, and whether the head reranks by default (the gate's decision); popularity
    last."""
    header = ["retriever", *METRICS, "head: retrieval order", "reranked", "rerank by default"]
    rows = []
    for name in result.stopped_by:  # the order they were trained in, the default first
        entry = result.manifest["retrievers"][name]
        test = entry["offline_metrics"]["model"]["test"]
        head_entry = entry.get("ctr_head", {})
        quality = head_entry.get("rerank_quality")
        head = (
            [quality["retrieval"]["ndcg@10"], quality["reranked"]["ndcg@10"]]
            if quality
            else [None, None]
        )
        gate = head_entry.get("gate")
        default = None if gate is None else ("yes" if gate["rerank_by_default"] else "no")
        rows.append([name, *(test[m] for m in METRICS), *head, default])
    popularity = popularity_metrics(result.manifest)
    rows.append(["popularity", *(popularity[m] for m in METRICS), None, None, None])
    return text_table(header, rows)
