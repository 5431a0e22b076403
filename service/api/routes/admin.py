"""POST /admin/reload: serve the bundle in models/CURRENT on every worker."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import Admin, State
from service.errors import BundleError, ReloadRefused

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Admin])


@router.post("/reload")
async def reload(state: State) -> JSONResponse:
    """Load CURRENT here, then signal the deployment's other workers over Redis to re-read
    CURRENT (they also poll it). The signal names no bundle and is signed with a key derived
    from the admin token (``service.reload_signals``).

    A bundle that fails verification is refused with 409 naming the file; the old bundle
    keeps serving.
    """
    previous = state.bundle_name
    try:
        name = await state.reload()
    except BundleError as exc:
        raise ReloadRefused(str(exc), serving=previous) from exc
    notified = await state.announce_reload()
    return JSONResponse({"serving": name, "previous": previous, "workers_notified": notified})
