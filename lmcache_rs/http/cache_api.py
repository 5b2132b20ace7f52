"""`POST /clear-cache` (seed) and `POST /cache/clear` (LMCache 0.5.6 name)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from litestar import Request, Response, Router, post
from litestar.di import NamedDependency

from lmcache_rs.http.auth import ALWAYS, SENSITIVE
from lmcache_rs.http.errors import ApiError
from lmcache_rs.http.state import HttpState

if TYPE_CHECKING:
    from lmcache_rs.runtime import Runtime


class ClearStatus(msgspec.Struct, omit_defaults=True):
    status: str
    reason: str | None = None


class ClearRequest(msgspec.Struct, forbid_unknown_fields=True):
    tier: str = "l1"
    force: bool = False


class Cleared(msgspec.Struct):
    tier: str
    objects: int
    bytes: int


class ClearResponse(msgspec.Struct):
    status: str
    cleared: Cleared


@post("/clear-cache", status_code=200, sync_to_thread=False, opt={SENSITIVE: ALWAYS})
def clear_cache(http_state: NamedDependency[HttpState]) -> Response[ClearStatus]:
    """Force-clears L1 (seed document): bypasses read and write locks, so transfers in flight
    may be cut; use when idle or to recover from a bad cache state. The body is ignored."""
    runtime = http_state.runtime
    if runtime is None:
        return Response(ClearStatus(status="error", reason="engine not initialized"), status_code=503)
    runtime.l1.index.clear(True)
    return Response(ClearStatus(status="ok"), status_code=200)


@post("/cache/clear", status_code=200, opt={SENSITIVE: ALWAYS})
async def cache_clear(request: Request, runtime: NamedDependency[Runtime]) -> ClearResponse:  # type: ignore[type-arg]
    """Clears one tier. Body (optional): {"tier": "l1", "force": false}; without force,
    locked and in-flight objects stay."""
    raw = await request.body()
    try:
        body = msgspec.json.decode(raw, type=ClearRequest) if raw.strip() else ClearRequest()
    except msgspec.DecodeError as e:
        raise ApiError(400, {"detail": f"invalid body: {e}"}) from None
    if body.tier != "l1":
        raise ApiError(400, {"detail": f"tier '{body.tier}' not supported; only 'l1'"})
    report = runtime.l1.index.clear(body.force)
    return ClearResponse(
        status="ok", cleared=Cleared(tier="l1", objects=report["objects"], bytes=report["bytes"])
    )


router = Router(path="/", route_handlers=[clear_cache, cache_clear], tags=["cache"])
