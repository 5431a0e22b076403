"""Request and response bodies of the HTTP API, with the limits that protect the service."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Identifier = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=256)]
Timestamp = Annotated[int, Field(strict=True, ge=0, le=2**40, description="Unix seconds")]
MAX_HISTORY_IN_REQUEST = 10_000


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
    rerank: bool = True

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
    timings_ms: Timings


class Event(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": "42", "item_id": "7", "ts": 1700000000}]},
    )

    user_id: Identifier
    item_id: Identifier
    ts: Timestamp


class EventsResponse(BaseModel):
    received: int
    added: int = Field(description="events that were new (a retried event adds nothing)")


class SimilarResponse(BaseModel):
    item_id: str
    encoder: str
    bundle: str
    items: list[RecommendedItem]


class CatalogueItem(BaseModel):
    item_id: str
    title: str | None = None
    genres: list[str] = Field(default_factory=list)
    popularity: int = Field(description="training events of the item in the bundle's data")


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
    reranks: bool = Field(description="whether a CTR head reranks this retriever's candidates")
    test_metrics: dict[str, float] = Field(
        default_factory=dict, description="offline test metrics recorded at export"
    )
    popularity_test_metrics: dict[str, float] = Field(default_factory=dict)


class BundleInfo(BaseModel):
    name: str
    created_at: str | None = None
    items: int
    titles: bool = Field(description="whether the catalogue has titles")
    default_encoder: str
    retrievers: list[RetrieverInfo]
