"""GET /bundle: what the served bundle holds, for clients that adapt to it (the demo page)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.access import require
from service.api.deps import CurrentRecommender
from service.api.schemas import MAX_LISTED_CATEGORIES, BundleInfo, RetrieverInfo

router = APIRouter(tags=["bundle"], dependencies=[Depends(require("recommend"))])


def _test_metrics(entry: dict, scorer: str) -> dict[str, float]:
    """The test split's metrics of ``scorer`` ("model" or "popularity") in a retriever's
    manifest entry, where the export recorded them."""
    metrics = ((entry.get("offline_metrics") or {}).get(scorer) or {}).get("test") or {}
    return {name: float(value) for name, value in metrics.items()}


@router.get("/bundle", response_model=BundleInfo)
async def bundle_info(recommender: CurrentRecommender) -> BundleInfo:
    """The served bundle: its name, catalogue size, default encoder, and per retriever its
    size, index kind, whether it has a CTR head and whether (and why) the head reranks
    requests that do not say, and the offline test metrics recorded at export. No file
    paths or provenance: those are for the operator (/readyz)."""
    bundle = recommender.bundle
    return BundleInfo(
        name=bundle.name,
        created_at=bundle.manifest.get("created_at"),
        items=bundle.catalogue.n_items,
        added_items=len(recommender.served.catalogue.added_lookup),
        catalogue_version=recommender.served.version,
        titles=bundle.catalogue.titles is not None,
        default_encoder=recommender.default_encoder,
        retrievers=[
            RetrieverInfo(
                name=name,
                dim=int(retriever.item_vectors.shape[1]),
                max_len=retriever.max_len,
                index=str(retriever.info["index"]["spec"]["factory"]),
                # From the files: where a compute process serves, this worker loads no model.
                reranks="ctr_head" in retriever.paths,
                rerank_by_default=retriever.rerank_default,
                rerank_reason=retriever.rerank_reason,
                test_metrics=_test_metrics(retriever.info, "model"),
                popularity_test_metrics=_test_metrics(retriever.info, "popularity"),
            )
            for name, retriever in bundle.retrievers.items()
        ],
        categories=dict(
            sorted(
                ((name, len(ids)) for name, ids in recommender.served.catalogue.categories.items()),
                key=lambda pair: (-pair[1], pair[0]),
            )[:MAX_LISTED_CATEGORIES]
        ),
    )
