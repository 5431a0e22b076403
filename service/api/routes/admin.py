"""POST /admin/reload: serve the bundle in models/CURRENT on every worker."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import Admin, State
from service.errors import BundleError, ReloadRefused, StoreUnavailable

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Admin])


@router.post("/reload")
async def reload(state: State) -> JSONResponse:
    """Load CURRENT here, then tell the other workers over Redis (they also poll CURRENT).

    A bundle that fails verification is refused with 409 naming the file; the old bundle
    keeps serving.
    """
    previous = state.bundle_name
    try:
        name = await state.reload()
    except BundleError as exc:
        raise ReloadRefused(str(exc), serving=previous) from exc
    notified = None
    if state.cache is not None:
        try:
            notified = await state.cache.publish_reload(name)
        except StoreUnavailable:
            notified = None  # the other workers still pick it up by polling CURRENT
    return JSONResponse({"serving": name, "previous": previous, "workers_notified": notified})
