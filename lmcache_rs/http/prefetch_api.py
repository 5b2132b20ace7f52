"""`POST /cache/prefetches` and `GET /cache/prefetches/{request_id}` (LMCache 0.5.6): warm L1
from L2 for a prompt before its traffic arrives, then poll the job.

The work is `engine/warmup.py`'s: the prompt is hashed as a lookup hashes it, what L1 lacks of
its prefix is loaded from the L2 adapter holding the longest prefix for every kv rank, and the
loaded chunks stay in L1 as ordinary (evictable, unlocked) objects. Codes: 202 started (or
`noop`: no complete chunk); 400 bad input, more than 1,000,000 tokens, or no L2 adapter
configured; 422 a hybrid layout (not warmed); 503 no registered layout for (model, world
size), or the prefetch pool is full (retry). Both need the bearer token (they name a
tenant's prompt and move its KV).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from litestar import Router, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody

from lmcache_rs.engine.warmup import MAX_TOKENS, MAX_WORLD_SIZE, WarmupJob, WarmupRefused
from lmcache_rs.http.auth import ALWAYS, SENSITIVE
from lmcache_rs.http.errors import ApiError

if TYPE_CHECKING:
    from lmcache_rs.runtime import Runtime

#: 1,000,000 token ids of up to 10 digits fit (the server's default body limit is 1 MiB).
BODY_BYTES = 16 << 20

TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]

#: HTTP code per refusal (engine/warmup.py).
CODES = {"bad_request": 400, "no_l2": 400, "hybrid": 422, "no_layout": 503, "busy": 503}


class PrefetchRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A prompt to warm: its token ids, as the engine would see them in a lookup, for a model,
    a world size (every kv rank is warmed) and a salt. Only L2 -> L1."""

    model_name: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    world_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
    token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_TOKENS)]
    cache_salt: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    source_tier: Literal["l2"] = "l2"
    target_tier: Literal["l1"] = "l1"


class PrefetchSubmitted(msgspec.Struct, omit_defaults=True):
    """`submitted` with the id to poll and the prompt's complete chunks, or `noop` (`chunks`
    0, no id) when the prompt has no complete chunk."""

    status: Literal["submitted", "noop"]
    chunks: int
    request_id: str | None = None


class PrefetchStatus(msgspec.Struct, omit_defaults=True):
    """`pending`, `completed` or `failed`. Completed: `found_keys` of `total_keys` (chunks x
    kv ranks) are in L1: the prompt's prefix every rank now has, `found_chunks` long, of which
    `l1_chunks` were in L1 already (the rest were loaded). Failed: `error` says what raised
    (nothing of the job is held). Jobs are remembered for the last 1024 warm-ups."""

    request_id: str
    status: Literal["pending", "completed", "failed"]
    chunks: int | None = None
    found_keys: int | None = None
    total_keys: int | None = None
    found_chunks: int | None = None
    l1_chunks: int | None = None
    error: str | None = None

    @classmethod
    def of(cls, job: WarmupJob) -> PrefetchStatus:
        if job.status == "pending":
            return cls(request_id=job.request_id, status="pending")
        out = cls(request_id=job.request_id, status=job.status, chunks=job.chunks, total_keys=job.total_keys)
        if job.status == "failed":
            out.error = job.error
        else:
            out.found_keys = job.found_keys
            out.found_chunks = job.found_chunks
            out.l1_chunks = job.l1_chunks
        return out


def _spec(what: str) -> ResponseSpec:
    return ResponseSpec(data_container=dict[str, Any], description=what, generate_examples=False)


@post(
    "/cache/prefetches",
    status_code=202,
    sync_to_thread=True,
    opt={SENSITIVE: ALWAYS},
    request_max_body_size=BODY_BYTES,
    responses={
        422: _spec("A hybrid (sliding-window or several object groups) layout: not warmed"),
        503: _spec("No registered layout for (model, world size), or the prefetch pool is full"),
    },
)
def submit_prefetch(data: JSONBody[PrefetchRequest], runtime: NamedDependency[Runtime]) -> PrefetchSubmitted:
    """Starts warming L1 from L2 for a prompt (every kv rank); poll the returned id."""
    try:
        job = runtime.warmups.submit(data.model_name, data.world_size, data.token_ids, data.cache_salt)
    except WarmupRefused as e:
        headers = {"Retry-After": "1"} if e.kind == "busy" else None
        raise ApiError(CODES[e.kind], {"error": e.message}, headers=headers) from None
    if job is None:
        return PrefetchSubmitted(status="noop", chunks=0)
    return PrefetchSubmitted(status="submitted", chunks=job.chunks, request_id=job.request_id)


@get("/cache/prefetches/{request_id:str}", sync_to_thread=False, opt={SENSITIVE: ALWAYS})
def prefetch_status(request_id: FromPath[str], runtime: NamedDependency[Runtime]) -> PrefetchStatus:
    """A warm-up's state; 404 for an id never issued or forgotten (older than the last 1024)."""
    job = runtime.warmups.get(request_id)
    if job is None:
        raise ApiError(404, {"error": f"unknown prefetch request_id {request_id[:80]!r}"})
    return PrefetchStatus.of(job)


router = Router(path="/", route_handlers=[submit_prefetch, prefetch_status], tags=["cache"])
