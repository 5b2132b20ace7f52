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


class Cleared(msgspec.Struct):
    """What a clear did. `objects`/`bytes` left the index now (no lookup finds them); of those,
    `pending_objects`/`pending_bytes` are still being copied in or out by transfers in flight,
    and return to free memory when those transfers end (a writer cut this way is told its store
    failed; a reader finishes reading the bytes it was promised)."""

    tier: str
    objects: int
    bytes: int
    pending_objects: int
    pending_bytes: int

    @classmethod
    def of(cls, tier: str, report: dict[str, int]) -> Cleared:
        return cls(
            tier=tier,
            objects=report["objects"],
            bytes=report["bytes"],
            pending_objects=report["pending_objects"],
            pending_bytes=report["pending_bytes"],
        )


class ClearStatus(msgspec.Struct, omit_defaults=True):
    status: str
    reason: str | None = None
    cleared: Cleared | None = None


class ClearRequest(msgspec.Struct, forbid_unknown_fields=True):
    tier: str = "l1"
    force: bool = False


class ClearResponse(msgspec.Struct):
    status: str
    cleared: Cleared


@post("/clear-cache", status_code=200, sync_to_thread=False, opt={SENSITIVE: ALWAYS})
def clear_cache(http_state: NamedDependency[HttpState]) -> Response[ClearStatus]:
    """Force-clears L1 (seed document): every object leaves the index at once, locked and
    in-flight ones included. Unlike LMCache it never corrupts a transfer in flight: their bytes
    stay until the transfer ends (`cleared.pending_*`), a store cut this way fails, a retrieve
    completes with the right bytes. The body is ignored."""
    runtime = http_state.runtime
    if runtime is None:
        return Response(ClearStatus(status="error", reason="engine not initialized"), status_code=503)
    report = runtime.engine.clear(True)
    return Response(ClearStatus(status="ok", cleared=Cleared.of("l1", report)), status_code=200)


@post("/cache/clear", status_code=200, opt={SENSITIVE: ALWAYS})
async def cache_clear(request: Request, runtime: NamedDependency[Runtime]) -> ClearResponse:  # type: ignore[type-arg]
    """Clears one tier. Body (optional): {"tier": "l1", "force": false}; without force,
    locked and in-flight objects stay; forced, they leave the index and their bytes follow when
    their transfers end (see `/clear-cache`)."""
    raw = await request.body()
    try:
        body = msgspec.json.decode(raw, type=ClearRequest) if raw.strip() else ClearRequest()
    except msgspec.DecodeError as e:
        raise ApiError(400, {"detail": f"invalid body: {e}"}) from None
    if body.tier != "l1":
        raise ApiError(400, {"detail": f"tier '{body.tier}' not supported; only 'l1'"})
    return ClearResponse(status="ok", cleared=Cleared.of("l1", runtime.engine.clear(body.force)))


router = Router(path="/", route_handlers=[clear_cache, cache_clear], tags=["cache"])
