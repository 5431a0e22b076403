"""Experiments: arms that split the traffic, and which arm a request is served by.

An experiment is a JSON file (``RECSERVE_EXPERIMENT_FILE``), read at start-up and again
on every reload (``POST /admin/reload``, a reload signal, a new CURRENT)::

    {"name": "rerank-2026-12",
     "arms": [{"name": "control", "weight": 1, "rerank": false},
              {"name": "head", "weight": 1, "rerank": true}]}

An arm sets any of the bundle (``bundle``: another bundle of the models dir, served beside
CURRENT's), the retriever (``encoder``), the rerank and the retrieval depth
(``candidates``); what it sets wins over the request's own fields, so that a client that
always sends ``rerank`` cannot leave the experiment. What it leaves unset the request (or
the bundle's default) decides.

Assignment is a stable hash of the experiment's salt and the user id (of the request id
for a request without a user), so a user keeps an arm across requests, workers and
replicas, and a new salt (or name) reshuffles everyone. A request may name its arm
(``"arm": "head"``) for debugging; such a request is served and logged as forced and never
counted in the experiment's figures.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ExperimentError, InvalidField, excerpt

NAME = r"^[A-Za-z0-9_.-]{1,64}$"
NO_EXPERIMENT = "none"  # the experiment and arm of the traffic when none is configured
_UNIT_SPACE = float(2**64)


class Arm(BaseModel):
    """One way of serving, and its share of the traffic (``weight``, relative)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    weight: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    bundle: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$",
        description="a bundle of the models dir (default: the one CURRENT names)",
    )
    encoder: str | None = Field(None, min_length=1, max_length=256, description="the retriever")
    rerank: bool | None = None
    candidates: int | None = Field(None, ge=1, le=5000, description="retrieval depth")


class Experiment(BaseModel):
    """Arms with weights; ``salt`` (default: the name) seeds the assignment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    salt: str | None = Field(None, min_length=1, max_length=256)
    arms: tuple[Arm, ...] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _names_are_distinct(self) -> Experiment:
        if self.name == NO_EXPERIMENT:
            raise ValueError(f"the name {NO_EXPERIMENT!r} stands for no experiment")
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError("two arms have the same name")
        return self

    def share(self, arm: Arm) -> float:
        """The fraction of units assigned to ``arm``."""
        return arm.weight / sum(a.weight for a in self.arms)

    def assign(self, unit: str) -> Arm:
        """The arm of ``unit`` (a user id, or a request id), the same wherever it is asked."""
        seed = f"{self.salt or self.name}\x00{unit}".encode("utf-8", "surrogatepass")
        draw = int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "big")
        point = draw / _UNIT_SPACE * sum(arm.weight for arm in self.arms)
        for arm in self.arms:
            point -= arm.weight
            if point < 0:
                return arm
        return self.arms[-1]  # rounding at the very top of the range

    def arm(self, name: str) -> Arm:
        """The arm called ``name``; InvalidField naming ``body.arm`` if there is none."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise InvalidField(
            f"body.arm: no arm {excerpt(name)} in experiment {self.name} "
            f"(arms: {', '.join(a.name for a in self.arms)})"
        )

    def bundles(self) -> list[str]:
        """The bundles the arms name, in order, each once."""
        return list(dict.fromkeys(arm.bundle for arm in self.arms if arm.bundle is not None))


def check_arm(arm: Arm, heads: dict[str, bool], default: str) -> None:
    """ExperimentError unless ``arm``'s retriever is in its bundle and, if it asks for the
    rerank, has a CTR head; ``heads``: the bundle's retrievers -> whether each has one,
    ``default`` the retriever of a request that names none."""
    retriever = arm.encoder or default
    if retriever not in heads:
        raise ExperimentError(f"arm {arm.name}: the bundle has no retriever {excerpt(retriever)}")
    if arm.rerank and not heads[retriever]:
        raise ExperimentError(
            f"arm {arm.name}: rerank asked, but retriever {excerpt(retriever)} has no CTR head"
        )


@dataclass(frozen=True)
class Assignment:
    """Which experiment and arm serve a request, and whether the request chose the arm."""

    experiment: str
    arm: Arm | None
    forced: bool = False

    @property
    def arm_name(self) -> str:
        return self.arm.name if self.arm is not None else NO_EXPERIMENT


NO_ASSIGNMENT = Assignment(NO_EXPERIMENT, None)


def assign(experiment: Experiment | None, unit: str, asked: str | None) -> Assignment:
    """The assignment of a request whose unit is ``unit``; ``asked``: the arm the request
    names, if any (InvalidField without an experiment or for an unknown arm)."""
    if experiment is None:
        if asked is not None:
            raise InvalidField("body.arm: no experiment is running")
        return NO_ASSIGNMENT
    if asked is not None:
        return Assignment(experiment.name, experiment.arm(asked), forced=True)
    return Assignment(experiment.name, experiment.assign(unit))


def load_experiment(path: Path | None) -> Experiment | None:
    """The experiment in ``path`` (None: no experiment); ExperimentError naming the file
    and the field for anything it cannot accept."""
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentError(f"{path}: cannot read the experiment: {exc}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExperimentError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from exc
    try:
        return Experiment.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the document"
        raise ExperimentError(f"{path}: {where}: {first['msg']}") from exc
