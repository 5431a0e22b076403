"""The catalogue over HTTP: GET /items (search), GET /items/{item_id}, GET
/items/{item_id}/similar, and the writes: PUT and DELETE /items/{item_id}, POST /items/bulk.

A write is stored in Redis as one catalogue version (``service.catalogue_store``), served by
the worker that took it before it answers, and by every other worker within the
visibility bound (docs/ARCHITECTURE.md, "The living catalogue").
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.api.access import require
from service.api.deps import CatalogueWrite, CurrentRecommender, CurrentSettings, State
from service.api.schemas import (
    BulkWrite,
    CatalogueItem,
    CatalogueWriteResponse,
    Filter,
    ItemResponse,
    ItemSearchResponse,
    ItemWrite,
    SimilarResponse,
)
from service.catalogue import ItemFilter, ItemRecord
from service.errors import InvalidField, UnknownItem, excerpt
from service.live_catalogue import checked_record
from service.recommender import Recommender

MAX_FILTER_PARAMETER = 8192  # characters of JSON; the request head's limit bounds it too

router = APIRouter(prefix="/items", tags=["items"], dependencies=[Depends(require("recommend"))])
writes = APIRouter(prefix="/items", tags=["catalogue"], dependencies=[CatalogueWrite])
ItemId = Annotated[str, Path(min_length=1, max_length=256)]


@router.get("", response_model=ItemSearchResponse)
async def search_items(
    recommender: CurrentRecommender,
    q: Annotated[str, Query(max_length=200, description="an item id, or part of a title")] = "",
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ItemSearchResponse:
    """Items of the served catalogue: the item whose id is ``q`` first, then those whose
    title contains ``q`` (case-insensitive), most popular first; the most popular items
    when ``q`` is empty."""
    catalogue = recommender.served.catalogue
    ids, matched = catalogue.search(q, limit)
    return ItemSearchResponse(
        bundle=recommender.bundle.name,
        query=q,
        matched=matched,
        items=[CatalogueItem(**catalogue.describe(i)) for i in ids.tolist()],
    )


@router.get("/{item_id}", response_model=ItemResponse)
async def get_item(item_id: ItemId, recommender: CurrentRecommender) -> ItemResponse:
    """What the served catalogue holds of ``item_id``; 404 for an item it does not have
    or that was withdrawn."""
    catalogue = recommender.served.catalogue
    internal = catalogue.internal_id(item_id)
    if internal is None:
        raise unknown_item(recommender, item_id)
    return ItemResponse(
        bundle=recommender.bundle.name, item=CatalogueItem(**catalogue.describe(internal))
    )


@router.get("/{item_id}/similar", response_model=SimilarResponse)
async def similar_items(
    item_id: ItemId,
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
        raise unknown_item(recommender, item_id)
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


def unknown_item(recommender: Recommender, item_id: str) -> UnknownItem:
    """404 for an item the served catalogue does not have, or has withdrawn."""
    record = recommender.served.records.get(item_id)
    if record is not None and record.withdrawn:
        return UnknownItem(f"item {excerpt(item_id)} was withdrawn")
    return UnknownItem(
        f"item {excerpt(item_id)} is not in bundle {recommender.bundle.name} nor added since"
    )


def record_of(recommender: Recommender, item_id: str, body: ItemWrite, where: str) -> ItemRecord:
    """The record ``body`` writes for ``item_id``, checked against the served bundle."""
    return checked_record(
        recommender.bundle,
        recommender.served.catalogue,
        item_id,
        where=where,
        **body.model_dump(exclude={"item_id"}),
    )


def withdrawal(recommender: Recommender, item_id: str, where: str) -> ItemRecord:
    """The record that withdraws ``item_id``; 404 for an item never known here."""
    catalogue = recommender.served.catalogue
    if item_id not in catalogue.lookup and item_id not in catalogue.added_lookup:
        raise UnknownItem(f"{where}: {unknown_item(recommender, item_id)}")
    return ItemRecord(available=False, withdrawn=True)


@writes.put("/{item_id}", response_model=CatalogueWriteResponse)
async def put_item(
    item_id: ItemId, body: ItemWrite, state: State, recommender: CurrentRecommender
) -> CatalogueWriteResponse:
    """Create or replace an item: its metadata (what is not given is cleared), its
    availability and, for an item the bundle does not have, optionally a ready vector per
    retriever (else each retriever's metadata encoder derives one). 503 with Retry-After
    when Redis cannot take the write: then nothing was written."""
    record = record_of(recommender, item_id, body, "body")
    version = await state.write_catalogue({item_id: record})
    state.metrics.catalogue_writes.labels(operation="put", outcome="written").inc()
    return CatalogueWriteResponse(version=version, put=[item_id])


@writes.delete("/{item_id}", response_model=CatalogueWriteResponse)
async def delete_item(
    item_id: ItemId, state: State, recommender: CurrentRecommender
) -> CatalogueWriteResponse:
    """Withdraw an item: never served again, by any retriever, fallback or cache, until a
    PUT brings it back. 404 for an item the catalogue never had."""
    version = await state.write_catalogue({item_id: withdrawal(recommender, item_id, "item_id")})
    state.metrics.catalogue_writes.labels(operation="delete", outcome="written").inc()
    return CatalogueWriteResponse(version=version, deleted=[item_id])


@writes.post("/bulk", response_model=CatalogueWriteResponse)
async def bulk_write(
    body: BulkWrite, state: State, recommender: CurrentRecommender, settings: CurrentSettings
) -> CatalogueWriteResponse:
    """Items to create or replace and items to withdraw, as one write: every item is
    checked first, and either all are applied (one catalogue version) or none."""
    count = len(body.put) + len(body.delete)
    if count > settings.catalogue_bulk_limit:
        raise InvalidField(
            f"body: {count} items; a bulk write takes at most {settings.catalogue_bulk_limit} "
            "(RECSERVE_CATALOGUE_BULK_LIMIT)"
        )
    records = {
        item.item_id: record_of(recommender, item.item_id, item, f"body.put[{i}]")
        for i, item in enumerate(body.put)
    }
    for i, item_id in enumerate(body.delete):
        records[item_id] = withdrawal(recommender, item_id, f"body.delete[{i}]")
    version = await state.write_catalogue(records)
    for operation, items in (("put", body.put), ("delete", body.delete)):
        if items:
            state.metrics.catalogue_writes.labels(operation=operation, outcome="written").inc(
                len(items)
            )
    return CatalogueWriteResponse(
        version=version, put=[item.item_id for item in body.put], deleted=list(body.delete)
    )
