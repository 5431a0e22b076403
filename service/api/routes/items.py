"""GET /items (search the catalogue), GET /items/{item_id} and GET /items/{item_id}/similar."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.api.access import require
from service.api.deps import CurrentRecommender
from service.api.schemas import (
    CatalogueItem,
    Filter,
    ItemResponse,
    ItemSearchResponse,
    SimilarResponse,
)
from service.catalogue import ItemFilter
from service.errors import UnknownItem, excerpt

MAX_FILTER_PARAMETER = 8192  # characters of JSON; the request head's limit bounds it too

router = APIRouter(prefix="/items", tags=["items"], dependencies=[Depends(require("recommend"))])


@router.get("", response_model=ItemSearchResponse)
async def search_items(
    recommender: CurrentRecommender,
    q: Annotated[str, Query(max_length=200, description="an item id, or part of a title")] = "",
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ItemSearchResponse:
    """Items of the served catalogue: the item whose id is ``q`` first, then those whose
    title contains ``q`` (case-insensitive), most popular first; the most popular items
    when ``q`` is empty."""
    catalogue = recommender.bundle.catalogue
    ids, matched = catalogue.search(q, limit)
    return ItemSearchResponse(
        bundle=recommender.bundle.name,
        query=q,
        matched=matched,
        items=[CatalogueItem(**catalogue.describe(i)) for i in ids.tolist()],
    )


@router.get("/{item_id}", response_model=ItemResponse)
async def get_item(
    item_id: Annotated[str, Path(min_length=1, max_length=256)],
    recommender: CurrentRecommender,
) -> ItemResponse:
    """What the served catalogue holds of ``item_id``; 404 for an item it does not have."""
    catalogue = recommender.bundle.catalogue
    internal = catalogue.lookup.get(item_id)
    if internal is None:
        raise UnknownItem(f"item {excerpt(item_id)} is not in bundle {recommender.bundle.name}")
    return ItemResponse(
        bundle=recommender.bundle.name, item=CatalogueItem(**catalogue.describe(internal))
    )


@router.get("/{item_id}/similar", response_model=SimilarResponse)
async def similar_items(
    item_id: Annotated[str, Path(min_length=1, max_length=256)],
    recommender: CurrentRecommender,
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
    encoder: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    item_filter: Annotated[
        str | None,
        Query(
            alias="filter",
            max_length=MAX_FILTER_PARAMETER,
            description="a JSON object, as /recommend's filter (default: available items)",
        ),
    ] = None,
) -> SimilarResponse:
    """Items closest to ``item_id`` in the chosen retriever's item space that the filter
    keeps."""
    found = await recommender.similar(item_id, k, encoder, similar_filter(item_filter))
    if found is None:
        raise UnknownItem(f"item {excerpt(item_id)} is not in bundle {recommender.bundle.name}")
    return SimilarResponse(
        item_id=item_id,
        encoder=found.encoder,
        bundle=found.bundle,
        items=found.items,
        filtered=found.filtered,
    )


def similar_filter(text: str | None) -> ItemFilter | None:
    """The ``filter`` query parameter, validated as /recommend's body field is; its errors
    are located under ``query.filter``."""
    if text is None:
        return None
    try:
        return Filter.model_validate_json(text).item_filter()
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for error in errors:
            error["loc"] = ("query", "filter", *error["loc"])
        raise RequestValidationError(errors) from None
