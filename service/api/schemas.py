"""Request and response bodies of the HTTP API, with the limits that protect the service."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.catalogue import ItemFilter

Identifier = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=256)]
Timestamp = Annotated[int, Field(strict=True, ge=0, le=2**40, description="Unix seconds")]
Bound = Annotated[float, Field(allow_inf_nan=False, description="inclusive, finite")]
MAX_HISTORY_IN_REQUEST = 10_000
MAX_LISTED_CATEGORIES = 1000  # GET /bundle lists the largest categories, up to this many
# A filter's lists and maps: enough for any real page, small enough to compile at once.
MAX_FILTER_CATEGORIES = 256
MAX_FILTER_ITEMS = 1000
MAX_FILTER_ATTRIBUTES = 32


class Range(BaseModel):
    """Bounds on a numeric attribute; an item without a value is outside every range."""

    model_config = ConfigDict(extra="forbid")

    min: Bound | None = None
    max: Bound | None = None

    @field_validator("max")
    @classmethod
    def _max_is_not_below_min(cls, value: float | None, info: ValidationInfo) -> float | None:
        low = info.data.get("min")
        if value is not None and low is not None and value < low:
            raise ValueError(f"max {value} is below min {low}")
        return value

    @model_validator(mode="after")
    def _bounds_something(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        return self


class Filter(BaseModel):
    """Which items may be served: every condition given must hold."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "include_categories": ["Comedy", "Drama"],
                    "exclude_items": ["7"],
                    "attributes": {"language": "en"},
                    "ranges": {"price": {"min": 0, "max": 20}},
                }
            ]
        },
    )

    include_categories: list[Identifier] | None = Field(
        None,
        min_length=1,
        max_length=MAX_FILTER_CATEGORIES,
        description="items in at least one of these categories (the catalogue's genres)",
    )
    exclude_categories: list[Identifier] = Field(
        default_factory=list,
        max_length=MAX_FILTER_CATEGORIES,
        description="no item in any of these categories",
    )
    exclude_items: list[Identifier] = Field(
        default_factory=list, max_length=MAX_FILTER_ITEMS, description="item ids never to serve"
    )
    attributes: dict[Identifier, Identifier] = Field(
        default_factory=dict,
        max_length=MAX_FILTER_ATTRIBUTES,
        description="string attributes and the value each must equal",
    )
    ranges: dict[Identifier, Range] = Field(
        default_factory=dict,
        max_length=MAX_FILTER_ATTRIBUTES,
        description="numeric attributes and the range each must fall in",
    )
    available_only: bool = Field(True, description="only items the catalogue marks available")

    def item_filter(self) -> ItemFilter:
        """The service's form of this filter."""
        return ItemFilter(
            include_categories=(
                tuple(self.include_categories) if self.include_categories is not None else None
            ),
            exclude_categories=tuple(self.exclude_categories),
            exclude_items=tuple(self.exclude_items),
            attributes=tuple(self.attributes.items()),
            ranges=tuple((name, bounds.min, bounds.max) for name, bounds in self.ranges.items()),
            available_only=self.available_only,
        )


class HistoryEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Identifier
    ts: Timestamp


class RecommendRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "42",
                    "history": [
                        {"item_id": "7", "ts": 1700000000},
                        {"item_id": "9", "ts": 1700000600},
                    ],
                    "k": 10,
                },
                {"user_id": "42", "k": 5},
            ]
        },
    )

    user_id: Identifier | None = None
    history: list[HistoryEvent] | None = Field(
        None,
        max_length=MAX_HISTORY_IN_REQUEST,
        description="Events to recommend from; when absent the user's history is read from Redis",
    )
    k: int = Field(10, strict=True, ge=1, le=1000)
    encoder: Identifier | None = None
    exclude_seen: bool = True
    candidates: int | None = Field(None, strict=True, ge=1, le=5000, description="retrieval depth")
    rerank: bool | None = Field(
        None,
        description="true: rerank with the retriever's CTR head (where it has one); false: "
        "retrieval order; absent or null: the bundle's default for the retriever, which "
        "GET /bundle and /readyz show with the reason the export recorded",
    )
    at: Timestamp | None = Field(
        None,
        description="rank as of this time (Unix seconds; default: now): the time the CTR "
        "head's recency features measure to, for replays and reproducible comparisons",
    )
    filter: Filter | None = Field(
        None, description="which items may be served (default: available items only)"
    )
    arm: Identifier | None = Field(
        None,
        description="serve this arm of the running experiment instead of the user's own "
        "(debugging: the answer is logged as forced and never counted in the experiment)",
    )

    @model_validator(mode="after")
    def _needs_user_or_history(self) -> RecommendRequest:
        if self.history is None and self.user_id is None:
            raise ValueError("give a history, a user_id, or both")
        return self


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(
        description="what orders the list: the CTR head's logit or, "
        "without a rerank, the retrieval score"
    )
    retrieval_score: float
    retrieval_rank: int = Field(
        description="1-based position in retrieval order (seen items removed); where it "
        "differs from the position in the list, the rerank moved the item"
    )
    title: str | None = None


class Timings(BaseModel):
    encode: float
    retrieve: float
    rerank: float
    total: float


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    bundle: str
    encoder: str
    reranked: bool
    cache: str = Field(
        description="hit, miss or bypass (the retrieval cache); answer: the whole answer to "
        "an identical recent request, reused (RECSERVE_ANSWER_TTL_SECONDS)"
    )
    fallback: str | None = Field(None, description="popularity when no history was usable")
    unknown_items: int
    history_truncated: bool
    at: int = Field(description="the request time the answer was ranked for (Unix seconds)")
    filtered: int = Field(
        description="how many of the candidates retrieved for the request the filter "
        "removed: those ranked ahead of the last one kept, or all it removed when it left "
        "too few and the eligible items were searched on their own"
    )
    timings_ms: Timings
    request_id: str = Field(
        description="this answer's id: send it with the events that answer it (/events)"
    )
    experiment: str = Field(description="the running experiment ('none' without one)")
    arm: str = Field(
        description="the experiment's arm that served the answer ('none' without one); an "
        "arm's retriever, rerank and depth win over the request's"
    )


class Event(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"user_id": "42", "item_id": "7", "ts": 1700000000},
                {
                    "user_id": "42",
                    "item_id": "7",
                    "ts": 1700000000,
                    "type": "click",
                    "request_id": "3f2a9c0d8e7b4a1f9c2d3e4f5a6b7c8d",
                },
            ]
        },
    )

    user_id: Identifier
    item_id: Identifier
    ts: Timestamp
    type: Identifier | None = Field(
        None,
        description="what the user did (one of RECSERVE_EVENT_TYPES: view, click, purchase "
        "by default); typed events are attributed to the impression that showed the item",
    )
    request_id: Identifier | None = Field(
        None,
        description="the /recommend answer this event answers; without it, the user's "
        "impressions within the attribution window",
    )


class EventsResponse(BaseModel):
    received: int
    added: int = Field(description="events that were new (a retried event adds nothing)")
    attributed: int = Field(
        0, description="typed events that answer an impression (retried ones too)"
    )


class SimilarResponse(BaseModel):
    item_id: str
    encoder: str
    bundle: str
    items: list[RecommendedItem]
    filtered: int = Field(description="candidates the filter removed, as in /recommend")


class CatalogueItem(BaseModel):
    item_id: str
    title: str | None = None
    genres: list[str] = Field(
        default_factory=list, description="its categories (what a filter's categories name)"
    )
    attributes: dict[str, str] = Field(
        default_factory=dict, description="string attributes (a filter's attributes)"
    )
    numbers: dict[str, float] = Field(
        default_factory=dict, description="numeric attributes (a filter's ranges)"
    )
    available: bool = Field(True, description="false: never served")
    popularity: int = Field(description="training events of the item in the bundle's data")
    added: bool = Field(False, description="added by the catalogue API since the export")


class ItemResponse(BaseModel):
    bundle: str
    item: CatalogueItem


class ItemSearchResponse(BaseModel):
    bundle: str
    query: str
    matched: int = Field(description="items that match in all (the list holds up to limit)")
    items: list[CatalogueItem]


class RetrieverInfo(BaseModel):
    name: str
    dim: int
    max_len: int = Field(description="history events the encoder reads")
    index: str = Field(description="the faiss index kind")
    reranks: bool = Field(
        description="whether this retriever has a CTR head, so that a request can ask for "
        "its rerank"
    )
    rerank_by_default: bool = Field(
        description="whether a request that does not say rerank is reranked by the head"
    )
    rerank_reason: str = Field(
        description="why: the export's gate (the head's measured effect on NDCG@10 of "
        "held-out validation users), the export's override, or no head"
    )
    test_metrics: dict[str, float] = Field(
        default_factory=dict, description="offline test metrics recorded at export"
    )
    popularity_test_metrics: dict[str, float] = Field(default_factory=dict)


class BundleInfo(BaseModel):
    name: str
    created_at: str | None = None
    items: int = Field(description="items the bundle was exported with")
    added_items: int = Field(0, description="items the catalogue API added since (withdrawn too)")
    catalogue_version: int = Field(0, description="the catalogue API's writes served")
    titles: bool = Field(description="whether the catalogue has titles")
    default_encoder: str
    retrievers: list[RetrieverInfo]
    categories: dict[str, int] = Field(
        default_factory=dict,
        description="the catalogue's categories (what a filter's include_categories and "
        "exclude_categories name) and their item counts, largest first; at most "
        "MAX_LISTED_CATEGORIES of them",
    )


# --------------------------------------------------------------------------- catalogue writes

MAX_ITEM_GENRES = 100
MAX_ITEM_ATTRIBUTES = 100
MAX_EMBEDDING_DIM = 4096
Text = Annotated[str, StringConstraints(strict=True, max_length=1000)]
Name = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=200)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class ItemWrite(BaseModel):
    """An item's metadata as ``PUT /items/{item_id}`` writes it: it replaces whatever the
    catalogue held of the item (what is not given is cleared)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "title": "Heat (1995)",
                    "genres": ["Action", "Crime"],
                    "numbers": {"price": 9.99},
                    "available": True,
                }
            ]
        },
    )

    title: Text | None = None
    genres: list[Name] = Field(
        default_factory=list,
        max_length=MAX_ITEM_GENRES,
        description="its categories (what a filter's categories name)",
    )
    attributes: dict[Name, Text] = Field(
        default_factory=dict,
        max_length=MAX_ITEM_ATTRIBUTES,
        description="string attributes, each one the catalogue has",
    )
    numbers: dict[Name, Finite] = Field(
        default_factory=dict,
        max_length=MAX_ITEM_ATTRIBUTES,
        description="numeric attributes, each one the catalogue has",
    )
    available: bool = Field(True, description="false: kept in the catalogue, never served")
    year: int | None = Field(
        None, strict=True, ge=1000, le=3000, description="else read from a title's '(1995)'"
    )
    embeddings: dict[Name, list[Finite]] | None = Field(
        None,
        max_length=64,
        description="a ready vector per retriever, for an item the bundle does not have "
        "(else the retriever's metadata encoder derives one)",
    )

    @field_validator("embeddings")
    @classmethod
    def _vectors_are_bounded(cls, value: dict | None) -> dict | None:
        for name, vector in (value or {}).items():
            if len(vector) > MAX_EMBEDDING_DIM:
                raise ValueError(f"{name}: more than {MAX_EMBEDDING_DIM} values")
        return value


class BulkItem(ItemWrite):
    item_id: Identifier


class BulkWrite(BaseModel):
    """Items to create or replace and items to withdraw, applied together or not at all."""

    model_config = ConfigDict(extra="forbid")

    put: list[BulkItem] = Field(default_factory=list)
    delete: list[Identifier] = Field(default_factory=list)

    @model_validator(mode="after")
    def _each_item_once(self) -> BulkWrite:
        ids = [item.item_id for item in self.put] + list(self.delete)
        if not ids:
            raise ValueError("give items to put, to delete, or both")
        counts = Counter(ids)
        if len(counts) != len(ids):
            twice = next(i for i, n in counts.items() if n > 1)
            raise ValueError(f"item {twice!r} is named twice")
        return self


class CatalogueWriteResponse(BaseModel):
    """A write served by the worker that answers; every other worker serves it within the
    visibility bound (docs/ARCHITECTURE.md, "The living catalogue")."""

    version: int = Field(description="the catalogue version the write made")
    put: list[str] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
