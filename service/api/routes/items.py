"""GET /items/{item_id}/similar."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from service.api.access import require
from service.api.deps import CurrentRecommender
from service.api.schemas import SimilarResponse
from service.errors import UnknownItem, excerpt

router = APIRouter(prefix="/items", tags=["items"], dependencies=[Depends(require("recommend"))])


@router.get("/{item_id}/similar", response_model=SimilarResponse)
async def similar_items(
    item_id: Annotated[str, Path(min_length=1, max_length=256)],
    recommender: CurrentRecommender,
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
    encoder: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
) -> SimilarResponse:
    """Items closest to ``item_id`` in the chosen retriever's item space."""
    items = await recommender.similar(item_id, k, encoder)
    if items is None:
        raise UnknownItem(f"item {excerpt(item_id)} is not in bundle {recommender.bundle.name}")
    return SimilarResponse(
        item_id=item_id,
        encoder=recommender.retriever(encoder).name,
        bundle=recommender.bundle.name,
        items=items,
    )
