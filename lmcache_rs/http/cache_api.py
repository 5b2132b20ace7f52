"""`POST /clear-cache` (seed) and `POST /cache/clear` (LMCache 0.5.6 name; here also of L2,
per adapter, which LMCache refuses)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Response, Router, post
from litestar.di import NamedDependency

from lmcache_rs.http.auth import ALWAYS, SENSITIVE
from lmcache_rs.http.errors import ApiError
from lmcache_rs.http.state import HttpState

if TYPE_CHECKING:
    from lmcache_rs._core import ClearReport
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
    def of(cls, tier: str, report: ClearReport) -> Cleared:
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
    #: With tier l2 or all: clear only the L2 adapter of this name.
    adapter: str | None = None


class L2Cleared(msgspec.Struct):
    """One L2 adapter's clear: objects and bytes (headers included) deleted; `error` when the
    adapter could not be cleared (nothing counted)."""

    adapter: str
    objects: int
    bytes: int
    ok: bool
    error: str | None = None


class ClearResponse(msgspec.Struct, omit_defaults=True):
    """`cleared`: what left, over the tiers cleared (`tier` as asked); with l2 or all, `l1`
    (all only) and `l2` (per adapter) break it down. `status` is `partial` when an adapter
    could not be cleared."""

    status: str
    cleared: Cleared
    l1: Cleared | None = None
    l2: list[L2Cleared] | None = None


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
async def cache_clear(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> ClearResponse:
    """Clears L1, L2 or both. Body (optional): {"tier": "l1" | "l2" | "all", "force": false,
    "adapter": null}. L1 without force keeps locked and in-flight objects; forced, they leave
    the index and their bytes follow when their transfers end (see `/clear-cache`). L2: every
    object of every adapter (or of `adapter`), with the count per adapter."""
    raw = await request.body()
    try:
        body = msgspec.json.decode(raw, type=ClearRequest) if raw.strip() else ClearRequest()
    except msgspec.DecodeError as e:
        raise ApiError(400, {"detail": f"invalid body: {e}"}) from None
    if body.tier not in ("l1", "l2", "all"):
        raise ApiError(400, {"detail": f"tier '{body.tier}' not supported; l1, l2 or all"})
    if body.tier == "l1":
        if body.adapter is not None:
            raise ApiError(400, {"detail": "adapter names an L2 adapter: use tier l2 or all"})
        return ClearResponse(status="ok", cleared=Cleared.of("l1", runtime.engine.clear(body.force)))
    l2 = runtime.l2
    names = [a.name for a in l2.adapters] if l2 is not None else []
    if body.tier == "l2" and not names:
        raise ApiError(400, {"detail": "tier 'l2': no L2 adapters configured"})
    if body.adapter is not None and body.adapter not in names:
        raise ApiError(404, {"detail": f"no L2 adapter named {body.adapter!r} (GET /config/adapters)"})
    l1 = Cleared.of("l1", runtime.engine.clear(body.force)) if body.tier == "all" else None
    done = await asyncio.to_thread(l2.clear, body.adapter) if l2 is not None else []
    per = [L2Cleared(name, n, b, err is None, err) for name, n, b, err in done]
    total = Cleared(
        tier=body.tier,
        objects=sum(x.objects for x in per) + (l1.objects if l1 else 0),
        bytes=sum(x.bytes for x in per) + (l1.bytes if l1 else 0),
        pending_objects=l1.pending_objects if l1 else 0,
        pending_bytes=l1.pending_bytes if l1 else 0,
    )
    status = "ok" if all(x.ok for x in per) else "partial"
    return ClearResponse(status=status, cleared=total, l1=l1, l2=per)


router = Router(path="/", route_handlers=[clear_cache, cache_clear], tags=["cache"])
